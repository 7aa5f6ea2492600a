// Batched augmentation and normalisation as tensor ops on the training device.
#pragma once
#include <ATen/ATen.h>
#include <vector>

namespace keel::data {

struct AugmentOptions {
  std::vector<double> mean = {0.0};  // per channel (or one value), on the [0, 1] scale
  std::vector<double> std = {1.0};
  bool random_flip = false;          // horizontal, per sample, p = 0.5
  int64_t random_crop_padding = 0;   // zero-pad by p and crop back at a random offset per sample
};

// Turns uint8 batches into normalised float batches, with training-time augmentation when asked.
// Randomness comes from its own generator, so the stream is reproducible from the seed.
class DeviceAugment {
 public:
  DeviceAugment(AugmentOptions o, uint64_t seed);
  // images: uint8 (N, C, H, W) on any device -> float (N, C, H, W) on the same device.
  at::Tensor train(const at::Tensor& images);
  at::Tensor eval(const at::Tensor& images) const;
  // The augmentation generator's state (uint8 tensor), saved in checkpoints for exact resume.
  at::Tensor rng_state() const { return gen_.get_state(); }
  void set_rng_state(const at::Tensor& s) { gen_.set_state(s); }

 private:
  at::Tensor normalize(const at::Tensor& images) const;
  // CPU: flip (per sample, where `flip` is set) and normalisation fused into one pass over the batch.
  at::Tensor flip_normalize_cpu(const at::Tensor& images, const at::Tensor& flip) const;
  AugmentOptions opts_;
  at::Generator gen_;
  // The CPU output buffer, reused when the caller has released the previous result (tensor and
  // storage referenced only here), so steady-state CPU augmentation allocates nothing.
  mutable at::Tensor out_;
};

}  // namespace keel::data
