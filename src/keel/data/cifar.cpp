// CifarDataset: reading and validation of the CIFAR-10/100 binary record files.
#include "keel/data/cifar.h"

#include <cstring>
#include <filesystem>
#include <stdexcept>

#include "keel/data/image_io.h"

namespace keel::data {
namespace {
constexpr size_t kPixels = 3 * 32 * 32;
}  // namespace

CifarDataset::CifarDataset(const std::vector<std::string>& files, int64_t classes) : classes_(classes) {
  if (classes != 10 && classes != 100) {
    throw std::invalid_argument("CifarDataset: classes must be 10 or 100, got " + std::to_string(classes));
  }
  const size_t label_bytes = classes == 10 ? 1 : 2;
  const size_t record = label_bytes + kPixels;
  std::vector<uint8_t> bytes;
  for (const auto& path : files) {
    try {
      read_file(path, bytes);
    } catch (const std::exception& e) {
      throw std::runtime_error(path + ": " + e.what());
    }
    if (bytes.empty() || bytes.size() % record != 0) {
      throw std::runtime_error(path + ": " + std::to_string(bytes.size()) + " bytes is not a positive multiple of the " +
                               std::to_string(record) + "-byte CIFAR-" + std::to_string(classes) +
                               " record (truncated file, or the other CIFAR variant?)");
    }
    const size_t n = bytes.size() / record;
    files_.push_back({path, labels_.size()});
    pixels_.resize((labels_.size() + n) * kPixels);
    for (size_t r = 0; r < n; ++r) {
      const uint8_t* rec = bytes.data() + r * record;
      const int64_t label = rec[label_bytes - 1];  // CIFAR-100: the fine label follows the coarse one
      if (label >= classes) {
        throw std::runtime_error(path + ": record " + std::to_string(r) + " has label " + std::to_string(label) +
                                 ", expected < " + std::to_string(classes));
      }
      std::memcpy(&pixels_[(labels_.size()) * kPixels], rec + label_bytes, kPixels);
      labels_.push_back(label);
    }
  }
}

void CifarDataset::read_image(size_t index, uint8_t* dst) const {
  if (index >= labels_.size()) {
    throw std::out_of_range("CIFAR index " + std::to_string(index) + " >= " + std::to_string(labels_.size()));
  }
  std::memcpy(dst, &pixels_[index * kPixels], kPixels);
}

std::string CifarDataset::describe(size_t index) const {
  for (size_t f = files_.size(); f-- > 0;) {
    if (index >= files_[f].first) return files_[f].path + "[" + std::to_string(index - files_[f].first) + "]";
  }
  return "cifar[" + std::to_string(index) + "]";
}

std::unique_ptr<Dataset> make_cifar_split(const std::string& root, int64_t classes, bool train) {
  namespace fs = std::filesystem;
  std::vector<std::string> names;
  if (classes == 10) {
    if (train) {
      for (int i = 1; i <= 5; ++i) names.push_back("data_batch_" + std::to_string(i) + ".bin");
    } else {
      names.push_back("test_batch.bin");
    }
  } else {
    names.push_back(train ? "train.bin" : "test.bin");
  }
  const std::string sub = classes == 10 ? "cifar-10-batches-bin" : "cifar-100-binary";
  for (const fs::path& dir : {fs::path(root), fs::path(root) / sub}) {
    std::vector<std::string> files;
    for (const auto& n : names) {
      if (fs::exists(dir / n)) files.push_back((dir / n).string());
    }
    if (files.size() == names.size()) return std::make_unique<CifarDataset>(files, classes);
  }
  std::string tried;
  for (const auto& n : names) tried += " " + (fs::path(root) / n).string() + " (or under " + sub + "/)";
  throw std::runtime_error("CIFAR-" + std::to_string(classes) + " " + (train ? "training" : "test") +
                           " files not found; expected" + tried);
}

}  // namespace keel::data
