// ImageFolderDataset: folder scan, and the per-sample decode -> crop region -> resize of a worker.
#include "keel/data/image_folder.h"

#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <set>
#include <stdexcept>
#include <utility>

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

// A directory's identity, (device, inode), following links: how a loop is recognised whatever path leads to it.
using DirId = std::pair<dev_t, ino_t>;
std::optional<DirId> dir_id(const fs::path& p) {
  struct stat st {};
  if (::stat(p.c_str(), &st) != 0) return std::nullopt;
  return DirId{st.st_dev, st.st_ino};
}

// Whether canonical path p lies in (or is) canonical folder root, compared component by component.
bool inside(const fs::path& p, const fs::path& root) {
  auto q = p.begin();
  for (auto r = root.begin(); r != root.end(); ++r, ++q) {
    if (q == p.end() || *q != *r) return false;
  }
  return true;
}

// One split's scan under the symbolic-link rule (docs/data.md): links are followed when their target lies
// inside one of `roots`, a link out of them is an error, and a directory already on the path being
// scanned (a loop) is not entered again.
struct LinkScan {
  std::vector<fs::path> roots;        // canonical
  std::vector<DirId> ancestors;       // the roots and the directories from the class folder down
  std::vector<std::string>* files = nullptr;

  void check_link(const fs::path& link) const {
    std::error_code ec;
    const fs::path target = fs::canonical(link, ec);
    if (ec) return;  // dangling: kept as a file that fails to read (data.on_error's business), as a missing file
    for (const auto& r : roots) {
      if (inside(target, r)) return;
    }
    std::string where = roots.front().string();
    for (size_t i = 1; i < roots.size(); ++i) where += " or " + roots[i].string();
    throw std::runtime_error(link.string() + ": symbolic link to " + target.string() + ", outside the data root (" +
                             where + "): keel follows links only inside it, so that the data set is what data.root "
                             "holds; move or copy the target inside, or set data.root to a folder containing both");
  }

  void scan(const fs::path& dir) {
    for (const auto& e : fs::directory_iterator(dir)) {
      const fs::path& p = e.path();
      std::error_code ec;
      if (e.is_symlink(ec)) check_link(p);
      if (e.is_directory(ec)) {  // a link to a directory counts as one
        const std::optional<DirId> id = dir_id(p);
        if (!id) continue;
        if (std::find(ancestors.begin(), ancestors.end(), *id) != ancestors.end()) {
          std::fprintf(stderr, "keel: data: %s: not followed: it leads back to %s, which this scan is already "
                       "inside (a directory loop; its images are counted once)\n", p.c_str(),
                       fs::canonical(p, ec).c_str());
          continue;
        }
        ancestors.push_back(*id);
        scan(p);
        ancestors.pop_back();
      } else if (is_image_file(p)) {
        files->push_back(p.string());
      }
    }
  }
};

// A worker thread's reusable state: one decoder and buffers that stop growing after a few files.
struct Scratch {
  ImageDecoder decoder;
  std::vector<uint8_t> bytes, hwc;
  Pixels pixels;
  // After each sample (also a failed one): a buffer grown past kRetainedBufferBytes for one huge image is
  // released rather than kept for the thread's life; ordinary images keep reusing theirs.
  void trim() {
    for (std::vector<uint8_t>* v : {&bytes, &hwc, &pixels.data}) {
      if (v->capacity() > kRetainedBufferBytes) std::vector<uint8_t>().swap(*v);
    }
    decoder.trim(kRetainedBufferBytes);
    trim_resize_buffer(kRetainedBufferBytes);
  }
};

// Calls Scratch::trim when a sample is done, however it ends.
struct TrimAfter {
  Scratch& s;
  ~TrimAfter() { s.trim(); }
};

Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}

}  // namespace

size_t decode_buffer_bytes() {
  const Scratch& s = thread_scratch();
  return s.bytes.capacity() + s.hwc.capacity() + s.pixels.data.capacity() + s.decoder.buffer_bytes() +
         resize_buffer_bytes();
}

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
  LinkScan links;
  links.roots.push_back(fs::canonical(dir));
  if (!opts_.data_root.empty()) links.roots.push_back(fs::canonical(opts_.data_root));
  for (size_t c = 0; c < classes_.size(); ++c) {
    const fs::path cdir = fs::path(dir) / classes_[c];
    if (!fs::is_directory(cdir)) {
      throw std::runtime_error(cdir.string() + ": class folder missing (the training split has class '" +
                               classes_[c] + "')");
    }
    if (fs::is_symlink(cdir)) links.check_link(cdir);
    std::vector<std::string> files;
    links.ancestors.clear();
    for (const auto& r : links.roots) {
      if (auto id = dir_id(r)) links.ancestors.push_back(*id);
    }
    if (auto id = dir_id(cdir)) links.ancestors.push_back(*id);
    links.files = &files;
    links.scan(cdir);
    std::sort(files.begin(), files.end());
    for (auto& f : files) {
      paths_.push_back(std::move(f));
      labels_.push_back(static_cast<int64_t>(c));
    }
  }
  if (paths_.empty()) throw std::runtime_error(dir + ": no .jpg, .jpeg or .png files in any class folder");
}

void ImageFolderDataset::read_sample(size_t index, int64_t epoch, uint8_t* dst) const {
  Scratch& s = thread_scratch();
  const TrimAfter trim{s};
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
  options.data_root = root;
  if (train) return std::make_unique<ImageFolderDataset>(train_dir.string(), options);
  for (const char* name : {"val", "test"}) {
    const fs::path d = fs::path(root) / name;
    if (fs::is_directory(d)) return std::make_unique<ImageFolderDataset>(d.string(), options, class_dirs(train_dir));
  }
  throw std::runtime_error(root + ": no evaluation split; expected " + (fs::path(root) / "val").string() + " or " +
                           (fs::path(root) / "test").string());
}

}  // namespace keel::data
