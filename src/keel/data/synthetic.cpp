// SyntheticDataset: pixels from a per-sample xorshift stream seeded by mix_seed(seed, index).
#include "keel/data/synthetic.h"

#include <cstring>
#include <stdexcept>

#include "keel/data/image_io.h"

namespace keel::data {

SyntheticDataset::SyntheticDataset(size_t count, ImageShape shape, int64_t classes, uint64_t seed)
    : count_(count), shape_(shape), classes_(classes), seed_(seed) {
  if (shape.channels <= 0 || shape.height <= 0 || shape.width <= 0 || classes <= 0) {
    throw std::invalid_argument("SyntheticDataset: shape and classes must be positive, got " +
                                std::to_string(shape.channels) + "x" + std::to_string(shape.height) + "x" +
                                std::to_string(shape.width) + ", " + std::to_string(classes) + " classes");
  }
}

int64_t SyntheticDataset::label(size_t index) const {
  return static_cast<int64_t>(mix_seed(seed_, index, 1) % static_cast<uint64_t>(classes_));
}

void SyntheticDataset::read_image(size_t index, uint8_t* dst) const {
  if (index >= count_) {
    throw std::out_of_range("synthetic index " + std::to_string(index) + " >= " + std::to_string(count_));
  }
  // xorshift64, 8 pixels per step: cheap, and the same on every platform (bytes in little-endian order).
  uint64_t x = mix_seed(seed_, index, 2) | 1;
  const size_t n = static_cast<size_t>(shape_.numel());
  size_t p = 0;
  for (; p + 8 <= n; p += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    for (int b = 0; b < 8; ++b) dst[p + b] = static_cast<uint8_t>(x >> (8 * b));
  }
  for (; p < n; ++p) dst[p] = static_cast<uint8_t>(x >> (8 * (p % 8)));
}

}  // namespace keel::data
