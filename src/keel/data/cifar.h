// CifarDataset: CIFAR-10 / CIFAR-100 binary batches, held fully in memory.
#pragma once
#include <memory>
#include <string>
#include <vector>
#include "keel/data/dataset.h"

namespace keel::data {

// Records of the CIFAR "binary version": CIFAR-10 = 1 label byte + 3072 pixel bytes (1024 R,
// 1024 G, 1024 B: already CHW), CIFAR-100 = coarse label byte, fine label byte + 3072 pixels; the
// fine label (100 classes) is used. A file whose size is not a whole number of records, an empty
// file or a label out of range throws std::runtime_error naming the file and the record.
class CifarDataset : public Dataset {
 public:
  // `classes` is 10 or 100 and selects the record layout.
  CifarDataset(const std::vector<std::string>& files, int64_t classes);

  size_t size() const override { return labels_.size(); }
  ImageShape shape() const override { return {3, 32, 32}; }
  int64_t num_classes() const override { return classes_; }
  int64_t label(size_t index) const override { return labels_.at(index); }
  void read_image(size_t index, uint8_t* dst) const override;
  std::string describe(size_t index) const override;

 private:
  struct File {
    std::string path;
    size_t first = 0;  // index of its first record
  };
  std::vector<File> files_;
  std::vector<uint8_t> pixels_;  // size() x 3072
  std::vector<int64_t> labels_;
  int64_t classes_;
};

// The standard split files under `root` (or under its cifar-10-batches-bin / cifar-100-binary
// sub-directory, as the archives unpack): CIFAR-10 data_batch_1..5.bin / test_batch.bin,
// CIFAR-100 train.bin / test.bin. Throws naming every path tried when one is missing.
std::unique_ptr<Dataset> make_cifar_split(const std::string& root, int64_t classes, bool train);

}  // namespace keel::data
