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
  // Random-resized crop of each sample back to its own size (uniform datasets: CIFAR, MNIST), a
  // box per sample as torchvision's RandomResizedCrop draws it, resampled bilinearly with
  // antialiasing (torchvision's resized_crop(..., antialias=True), i.e. PIL's BILINEAR).
  bool random_resized_crop = false;
  std::vector<double> rrc_scale = {0.08, 1.0};
  std::vector<double> rrc_ratio = {3.0 / 4.0, 4.0 / 3.0};
  // Mixup / CutMix (torchvision's reference RandomMixup / RandomCutmix): with probability
  // mix_prob a batch is mixed with itself rolled by one sample, lambda ~ Beta(alpha, alpha).
  // When both alphas are > 0, each mixed batch uses CutMix or Mixup with probability 1/2.
  double mixup_alpha = 0.0;
  double cutmix_alpha = 0.0;
  double mix_prob = 1.0;
  int64_t num_classes = 0;  // width of the soft targets; required when mixing
};

// Per-sample crop boxes in whole pixels (int64 (N) tensors on the CPU).
struct CropBoxes {
  at::Tensor top, left, height, width;
};

// torchvision's RandomResizedCrop.get_params for n images of height x width, vectorised: 10 tries
// per sample of area fraction in scale and log-uniform aspect ratio, the first that fits wins, else
// the centred fallback with the aspect clamped into ratio. Draws from `gen` only.
CropBoxes random_resized_crop_boxes(int64_t n, int64_t height, int64_t width, const std::vector<double>& scale,
                                    const std::vector<double>& ratio, at::Generator& gen);

// Resamples box b of sample b to out_h x out_w: torchvision's resized_crop(img, top, left, h, w,
// [out_h, out_w], BILINEAR, antialias) on float tensors. Triangle-filter weights per sample and axis
// (widened by the ratio when shrinking with antialias, as PIL), applied as two batched matmuls.
// images: float (N, C, H, W) -> float (N, C, out_h, out_w), same device. Cost ~ N C out_h H (W + out_w):
// meant for small images (CIFAR/MNIST sizes); image folders crop in the workers.
at::Tensor resized_crop(const at::Tensor& images, const CropBoxes& boxes, int64_t out_h, int64_t out_w,
                        bool antialias = true);

// Mixup of a batch with itself rolled by one: lam * x + (1 - lam) * x.roll(1, 0). x: float (N, ...).
at::Tensor mixup(const at::Tensor& x, double lam);
// CutMix: rows [y0, y1) x columns [x0, x1) of every sample replaced by the rolled batch's. x: (N, C, H, W).
at::Tensor cutmix(const at::Tensor& x, int64_t y0, int64_t y1, int64_t x0, int64_t x1);
// The matching soft targets: lam * one_hot(labels) + (1 - lam) * one_hot(labels.roll(1)), float (N, K).
at::Tensor mixed_targets(const at::Tensor& labels, int64_t num_classes, double lam);

// Turns uint8 batches into normalised float batches, with training-time augmentation when asked.
// Randomness comes from its own generator, so the stream is reproducible from the seed.
class DeviceAugment {
 public:
  DeviceAugment(AugmentOptions o, uint64_t seed);
  // images: uint8 (N, C, H, W) on any device -> float (N, C, H, W) on the same device.
  at::Tensor train(const at::Tensor& images);
  // Mixup/CutMix of the batch train() returned (in place) when enabled and drawn for this batch:
  // returns float (N, num_classes) soft targets; otherwise `labels` unchanged (int64 (N)).
  at::Tensor mix(at::Tensor& x, const at::Tensor& labels);
  at::Tensor eval(const at::Tensor& images) const;
  // The augmentation generator's state (uint8 tensor), saved in checkpoints for exact resume.
  at::Tensor rng_state() const { return gen_.get_state(); }
  void set_rng_state(const at::Tensor& s) { gen_.set_state(s); }
  // Restarts the stream from a seed (data-parallel runs: one per rank and batch, see the trainer).
  void reseed(uint64_t seed) { gen_.set_current_seed(seed); }
  bool mixes() const { return opts_.mixup_alpha > 0 || opts_.cutmix_alpha > 0; }

 private:
  at::Tensor normalize(const at::Tensor& images) const;
  // CPU: flip (per sample, where `flip` is set) and normalisation fused into one pass over the batch.
  at::Tensor flip_normalize_cpu(const at::Tensor& images, const at::Tensor& flip) const;
  double uniform();                // one draw in [0, 1) from gen_
  double sample_beta(double alpha);  // Beta(alpha, alpha) from gen_
  AugmentOptions opts_;
  at::Generator gen_;
  // The CPU output buffer, reused when the caller has released the previous result (tensor and
  // storage referenced only here), so steady-state CPU augmentation allocates nothing.
  mutable at::Tensor out_;
};

}  // namespace keel::data
