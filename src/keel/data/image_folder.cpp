// ImageFolderDataset: folder scan, and the per-sample decode -> crop region -> resize of a worker.
#include "keel/data/image_folder.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <set>
#include <stdexcept>

#include "keel/data/image_io.h"

namespace keel::data {
namespace fs = std::filesystem;
namespace {

bool is_image_file(const fs::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext == ".jpg" || ext == ".jpeg" || ext == ".png";
}

// The sorted names of dir's sub-directories.
std::vector<std::string> class_dirs(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.is_directory()) out.push_back(e.path().filename().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// A worker thread's reusable state: one decoder and buffers that stop growing after a few files.
struct Scratch {
  ImageDecoder decoder;
  std::vector<uint8_t> bytes, hwc;
  Pixels pixels;
};

}  // namespace

ImageFolderDataset::ImageFolderDataset(const std::string& dir, ImageFolderOptions options,
                                       std::vector<std::string> classes)
    : dir_(dir), opts_(options), classes_(std::move(classes)) {
  if (opts_.size < 1 || (opts_.channels != 1 && opts_.channels != 3)) {
    throw std::invalid_argument("ImageFolderDataset: size must be >= 1 and channels 1 or 3, got size " +
                                std::to_string(opts_.size) + ", channels " + std::to_string(opts_.channels));
  }
  if (!fs::is_directory(dir)) throw std::runtime_error(dir + ": image folder not found (not a directory)");
  if (classes_.empty()) {
    classes_ = class_dirs(dir);
    if (classes_.empty()) throw std::runtime_error(dir + ": no class sub-folders (expected " + dir + "/<class>/*.jpg)");
  }
  for (size_t c = 0; c < classes_.size(); ++c) {
    const fs::path cdir = fs::path(dir) / classes_[c];
    if (!fs::is_directory(cdir)) {
      throw std::runtime_error(cdir.string() + ": class folder missing (the training split has class '" +
                               classes_[c] + "')");
    }
    std::vector<std::string> files;
    for (const auto& e : fs::recursive_directory_iterator(cdir, fs::directory_options::follow_directory_symlink)) {
      if (!e.is_directory() && is_image_file(e.path())) files.push_back(e.path().string());
    }
    std::sort(files.begin(), files.end());
    for (auto& f : files) {
      paths_.push_back(std::move(f));
      labels_.push_back(static_cast<int64_t>(c));
    }
  }
  if (paths_.empty()) throw std::runtime_error(dir + ": no .jpg, .jpeg or .png files in any class folder");
}

void ImageFolderDataset::read_sample(size_t index, int64_t epoch, uint8_t* dst) const {
  thread_local Scratch s;
  const std::string& path = paths_.at(index);
  read_file(path, s.bytes);
  int w = 0, h = 0;
  s.decoder.header(s.bytes.data(), s.bytes.size(), &w, &h);
  const int size = static_cast<int>(opts_.size), channels = static_cast<int>(opts_.channels);
  if (!opts_.train) {
    const CenterCrop cc = center_crop(w, h, static_cast<int>(opts_.eval_resize), size);
    // A DCT-scaled decode is fine while it keeps at least the resized size.
    const double min_scale = std::max(static_cast<double>(cc.resized_w) / w, static_cast<double>(cc.resized_h) / h);
    s.decoder.decode(s.bytes.data(), s.bytes.size(), channels, min_scale, s.pixels);
    resize_center_crop_to_chw(s.pixels, cc, dst, s.hwc);
    return;
  }
  const CropBox box = random_resized_crop_box(w, h, opts_.scale_lo, opts_.scale_hi, opts_.ratio_lo, opts_.ratio_hi,
                                              mix_seed(opts_.seed, static_cast<uint64_t>(epoch), index));
  // The decode may shrink by 1/2, 1/4, 1/8 as long as the crop keeps at least `size` pixels, and
  // decodes only the crop's rows and columns.
  const double min_scale = std::max(size / box.w, size / box.h);
  const CropBox local = s.decoder.decode_crop(s.bytes.data(), s.bytes.size(), channels, min_scale, box, s.pixels);
  crop_resize_to_chw(s.pixels, local, size, size, dst, s.hwc);
}

std::unique_ptr<ImageFolderDataset> make_image_folder_split(const std::string& root, ImageFolderOptions options,
                                                            bool train) {
  const fs::path train_dir = fs::path(root) / "train";
  if (!fs::is_directory(train_dir)) {
    throw std::runtime_error(root + ": expected the ImageNet layout " + train_dir.string() +
                             "/<class>/*.jpg (and val/<class>/...), but " + train_dir.string() + " is not a directory");
  }
  options.train = train;
  if (train) return std::make_unique<ImageFolderDataset>(train_dir.string(), options);
  for (const char* name : {"val", "test"}) {
    const fs::path d = fs::path(root) / name;
    if (fs::is_directory(d)) return std::make_unique<ImageFolderDataset>(d.string(), options, class_dirs(train_dir));
  }
  throw std::runtime_error(root + ": no evaluation split; expected " + (fs::path(root) / "val").string() + " or " +
                           (fs::path(root) / "test").string());
}

}  // namespace keel::data
