// Device-side augmentation: one kernel sequence per batch instead of per-sample CPU work.
#include "keel/data/augment.h"

#include <ATen/CPUGeneratorImpl.h>

namespace keel::data {

DeviceAugment::DeviceAugment(AugmentOptions o, uint64_t seed)
    : opts_(std::move(o)), gen_(at::make_generator<at::CPUGeneratorImpl>(seed)) {}

at::Tensor DeviceAugment::normalize(const at::Tensor& images) const {
  // images: uint8 (N, C, H, W) -> float (N, C, H, W), (x / 255 - mean) / std per channel
  TORCH_CHECK(images.dim() == 4, "expected uint8 (N, C, H, W) images (got ", images.dim(), "D)");
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(images.device());
  const int64_t c = images.size(1);
  auto per_channel = [&](const std::vector<double>& v) {
    std::vector<float> f(v.begin(), v.end());
    at::Tensor t = at::tensor(f, at::kFloat).to(opts.device());
    TORCH_CHECK(t.numel() == 1 || t.numel() == c, "normalisation has ", t.numel(),
                " values; expected 1 or ", c, " (one per channel)");
    return t.view({1, -1, 1, 1});
  };
  at::Tensor scale = (per_channel(opts_.std) * 255.0).reciprocal();
  at::Tensor shift = per_channel(opts_.mean) / per_channel(opts_.std);
  return images.to(opts).mul_(scale).sub_(shift);
}

at::Tensor DeviceAugment::eval(const at::Tensor& images) const { return normalize(images); }

at::Tensor DeviceAugment::train(const at::Tensor& images) {
  // images: uint8 (N, C, H, W). Geometry is applied to the uint8 pixels (padding with black, as
  // torchvision's RandomCrop(padding) does before Normalize), then the batch is normalised.
  TORCH_CHECK(images.dim() == 4, "expected uint8 (N, C, H, W) images (got ", images.dim(), "D)");
  at::Tensor x = images;
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  const auto dev = x.device();
  if (const int64_t p = opts_.random_crop_padding; p > 0) {
    at::Tensor padded = at::constant_pad_nd(x, {p, p, p, p}, 0);  // (N, C, H+2p, W+2p)
    const auto lopt = at::TensorOptions().dtype(at::kLong);
    at::Tensor oy = at::randint(0, 2 * p + 1, {n}, gen_, lopt).to(dev);
    at::Tensor ox = at::randint(0, 2 * p + 1, {n}, gen_, lopt).to(dev);
    at::Tensor rows = oy.view({n, 1, 1}) + at::arange(h, lopt.device(dev)).view({1, h, 1});  // (N, H, 1)
    at::Tensor cols = ox.view({n, 1, 1}) + at::arange(w, lopt.device(dev)).view({1, 1, w});  // (N, 1, W)
    at::Tensor idx_n = at::arange(n, lopt.device(dev)).view({n, 1, 1});
    // (N, H+2p, W+2p, C)[idx_n, rows, cols] -> (N, H, W, C) -> (N, C, H, W)
    x = padded.permute({0, 2, 3, 1}).index({idx_n, rows, cols}).permute({0, 3, 1, 2});
  }
  if (opts_.random_flip) {
    at::Tensor flip = at::rand({n}, gen_, at::TensorOptions().dtype(at::kFloat)).lt(0.5).to(dev);
    x = at::where(flip.view({n, 1, 1, 1}), x.flip({3}), x);
  }
  return normalize(x.contiguous());
}

}  // namespace keel::data
