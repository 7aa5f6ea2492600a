// Dataset: the interface every keel data source (IDX, CIFAR, image folders, synthetic) implements.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace keel::data {

// The uint8 CHW shape every sample of a dataset has (datasets with varying sizes resize on read).
struct ImageShape {
  int64_t channels = 0, height = 0, width = 0;
  int64_t numel() const { return channels * height * width; }
};

// Random-access, read-only collection of labelled uint8 images.
class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual size_t size() const = 0;
  // Every sample's uint8 CHW shape.
  virtual ImageShape shape() const = 0;
  virtual int64_t num_classes() const = 0;
  // Class of sample `index`, in [0, num_classes()).
  virtual int64_t label(size_t index) const = 0;
  // Writes sample `index` as uint8 C*H*W (CHW order) into dst. Must be thread-safe: loader
  // workers call it concurrently.
  virtual void read_image(size_t index, uint8_t* dst) const = 0;
  // Names sample `index` for error messages, e.g. "train-images-idx3-ubyte.gz[123]".
  virtual std::string describe(size_t index) const = 0;
  // What the Loader calls: like read_image, for epoch `epoch`. Datasets with per-sample random
  // work (an image folder's random-resized-crop region) override it and draw from (seed, epoch,
  // index) only, so a sample's pixels never depend on the worker count or the thread.
  virtual void read_sample(size_t index, int64_t epoch, uint8_t* dst) const { read_image(index, dst); }
};

}  // namespace keel::data
