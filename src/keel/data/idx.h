// IdxDataset: MNIST / Fashion-MNIST IDX files (gzipped or raw), held fully in memory.
#pragma once
#include <memory>
#include <string>
#include <vector>
#include "keel/data/dataset.h"

namespace keel::data {

// Images from an IDX3 uint8 file (magic 0x00000803, dims N x H x W) with labels from an IDX1
// uint8 file (magic 0x00000801, dim N). Every malformation (bad magic, zero dims, truncated
// data, trailing bytes, count mismatch, label out of range) throws std::runtime_error naming
// the file, what was found and what was expected.
class IdxDataset : public Dataset {
 public:
  // `num_classes` 0 infers it as max label + 1 (at least 1); otherwise every label must be
  // below it.
  IdxDataset(const std::string& images_path, const std::string& labels_path,
             int64_t num_classes = 0);

  size_t size() const override { return count_; }
  ImageShape shape() const override { return {1, height_, width_}; }
  int64_t num_classes() const override { return num_classes_; }
  int64_t label(size_t index) const override;
  void read_image(size_t index, uint8_t* dst) const override;
  std::string describe(size_t index) const override;

  const std::string& images_path() const { return images_path_; }
  const std::string& labels_path() const { return labels_path_; }

 private:
  std::string images_path_, labels_path_;
  std::vector<uint8_t> images_file_, labels_file_;  // whole files, header included (no copy)
  size_t count_ = 0;
  int64_t height_ = 0, width_ = 0;
  int64_t num_classes_ = 1;
};

// Reads a whole file into memory, inflating it when it starts with the gzip magic 1f 8b.
// Throws std::runtime_error naming the file when it cannot be opened or inflated.
std::vector<uint8_t> read_maybe_gzipped(const std::string& path);

// The standard split of an MNIST-style directory: {train,t10k}-{images-idx3,labels-idx1}-ubyte,
// each with or without ".gz" (gzipped preferred). Throws naming the paths tried when missing.
std::unique_ptr<Dataset> make_idx_split(const std::string& dir, bool train);

}  // namespace keel::data
