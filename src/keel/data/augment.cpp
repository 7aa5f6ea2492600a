// Device-side augmentation: one kernel sequence per batch instead of per-sample CPU work.
#include "keel/data/augment.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <vector>

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

at::Tensor DeviceAugment::flip_normalize_cpu(const at::Tensor& images, const at::Tensor& flip) const {
  // images: uint8 (N, C, H, W) contiguous on CPU; flip: bool (N) or undefined -> float (N, C, H, W)
  const int64_t n = images.size(0), c = images.size(1), hw = images.size(2) * images.size(3), w = images.size(3);
  auto per_channel = [&](const std::vector<double>& v) {
    TORCH_CHECK(v.size() == 1 || static_cast<int64_t>(v.size()) == c, "normalisation has ", v.size(),
                " values; expected 1 or ", c, " (one per channel)");
    std::vector<double> out(c);
    for (int64_t i = 0; i < c; ++i) out[i] = v[v.size() == 1 ? 0 : i];
    return out;
  };
  const auto mean = per_channel(opts_.mean), sd = per_channel(opts_.std);
  std::vector<float> scale(c), shift(c);  // (x / 255 - mean) / std = x * scale - shift
  for (int64_t i = 0; i < c; ++i) {
    scale[i] = static_cast<float>(1.0 / (255.0 * sd[i]));
    shift[i] = static_cast<float>(mean[i] / sd[i]);
  }
  std::vector<uint8_t> flips(n, 0);
  if (flip.defined()) {
    const at::Tensor f = flip.to(at::kByte).contiguous();
    std::copy(f.data_ptr<uint8_t>(), f.data_ptr<uint8_t>() + n, flips.begin());
  }
  const bool reusable = out_.defined() && out_.use_count() == 1 && out_.storage().use_count() == 1 &&
                        out_.sizes() == images.sizes();
  if (!reusable) out_ = at::empty(images.sizes(), at::TensorOptions().dtype(at::kFloat));
  const uint8_t* src = images.data_ptr<uint8_t>();
  float* dst = out_.data_ptr<float>();
  at::parallel_for(0, n * c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float a = scale[p % c], o = shift[p % c];
      const uint8_t* in = src + p * hw;
      float* out = dst + p * hw;
      if (flips[p / c]) {
        for (int64_t y = 0; y < hw; y += w) {
          for (int64_t x = 0; x < w; ++x) out[y + x] = static_cast<float>(in[y + w - 1 - x]) * a - o;
        }
      } else {
        for (int64_t i = 0; i < hw; ++i) out[i] = static_cast<float>(in[i]) * a - o;
      }
    }
  });
  return out_;
}

at::Tensor DeviceAugment::eval(const at::Tensor& images) const {
  if (images.device().is_cpu() && images.scalar_type() == at::kByte && images.dim() == 4) {
    return flip_normalize_cpu(images.contiguous(), at::Tensor());
  }
  return normalize(images);
}

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
  at::Tensor flip;
  if (opts_.random_flip) flip = at::rand({n}, gen_, at::TensorOptions().dtype(at::kFloat)).lt(0.5).to(dev);
  if (dev.is_cpu() && x.scalar_type() == at::kByte) return flip_normalize_cpu(x.contiguous(), flip);
  if (flip.defined()) x = at::where(flip.view({n, 1, 1, 1}), x.flip({3}), x);
  return normalize(x.contiguous());
}

}  // namespace keel::data
