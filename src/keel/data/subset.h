// Subset: the first `count` samples of another dataset (for quick runs and tests).
#pragma once
#include <algorithm>
#include <memory>
#include <stdexcept>
#include "keel/data/dataset.h"

namespace keel::data {

class Subset : public Dataset {
 public:
  Subset(std::shared_ptr<const Dataset> base, size_t count)
      : base_(std::move(base)), count_(std::min(count, base_->size())) {}
  size_t size() const override { return count_; }
  ImageShape shape() const override { return base_->shape(); }
  int64_t num_classes() const override { return base_->num_classes(); }
  int64_t label(size_t i) const override { return base_->label(check(i)); }
  void read_image(size_t i, uint8_t* dst) const override { base_->read_image(check(i), dst); }
  std::string describe(size_t i) const override { return base_->describe(i); }
  void read_sample(size_t i, int64_t epoch, uint8_t* dst) const override {
    base_->read_sample(check(i), epoch, dst);
  }

 private:
  size_t check(size_t i) const {
    if (i >= count_) throw std::out_of_range("subset index " + std::to_string(i) + " >= " + std::to_string(count_));
    return i;
  }
  std::shared_ptr<const Dataset> base_;
  size_t count_;
};

}  // namespace keel::data
