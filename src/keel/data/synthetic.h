// SyntheticDataset: generated images of any shape, deterministic from (seed, index), for benchmarks.
#pragma once
#include <string>
#include "keel/data/dataset.h"

namespace keel::data {

// `count` samples of `shape`; sample i's pixels and label are a pure function of (seed, i), so
// every reader and run sees the same data without any file. Generation costs about one memset
// per sample, so a benchmark on it measures the loader, not a decoder.
class SyntheticDataset : public Dataset {
 public:
  SyntheticDataset(size_t count, ImageShape shape, int64_t classes, uint64_t seed);
  size_t size() const override { return count_; }
  ImageShape shape() const override { return shape_; }
  int64_t num_classes() const override { return classes_; }
  int64_t label(size_t index) const override;
  void read_image(size_t index, uint8_t* dst) const override;
  std::string describe(size_t index) const override { return "synthetic[" + std::to_string(index) + "]"; }

 private:
  size_t count_;
  ImageShape shape_;
  int64_t classes_;
  uint64_t seed_;
};

}  // namespace keel::data
