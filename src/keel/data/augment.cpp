// Device-side augmentation: one kernel sequence per batch instead of per-sample CPU work.
#include "keel/data/augment.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace keel::data {
namespace {

// Triangle-filter resampling weights for one axis, per sample: (N, out, in). Output o of sample n
// covers [start_n, start_n + len_n) of the input; its centre is start + (o + 0.5) * len / out. The
// support is max(scale, 1) with antialias (PIL's and torchvision's antialiased bilinear), else 1
// (plain bilinear, align_corners = false); weights outside the box are dropped and the rest
// normalised, which is the edge clamping of both.
at::Tensor axis_weights(const at::Tensor& start, const at::Tensor& len, int64_t out, int64_t in, bool antialias,
                        const at::Device& dev) {
  const auto opt = at::TensorOptions().dtype(at::kDouble).device(dev);
  const int64_t n = start.size(0);
  const at::Tensor s = start.to(opt).view({n, 1, 1}), l = len.to(opt).view({n, 1, 1});
  const at::Tensor scale = l / static_cast<double>(out);                                   // (N, 1, 1)
  const at::Tensor center = s + (at::arange(out, opt).view({1, out, 1}) + 0.5) * scale;   // (N, out, 1)
  const at::Tensor support = antialias ? at::clamp_min(scale, 1.0) : at::ones_like(scale);
  const at::Tensor pos = at::arange(in, opt).view({1, 1, in}) + 0.5;                      // (1, 1, in)
  at::Tensor w = at::clamp_min(1.0 - (pos - center).abs() / support, 0.0);                // (N, out, in)
  w = w * ((pos > s) & (pos < s + l)).to(at::kDouble);
  return (w / w.sum(-1, true)).to(at::kFloat);
}

}  // namespace

CropBoxes random_resized_crop_boxes(int64_t n, int64_t height, int64_t width, const std::vector<double>& scale,
                                    const std::vector<double>& ratio, at::Generator& gen) {
  TORCH_CHECK(scale.size() == 2 && ratio.size() == 2, "random_resized_crop_boxes: scale and ratio are [lo, hi] pairs");
  const auto dopt = at::TensorOptions().dtype(at::kDouble);
  const double area = static_cast<double>(height) * width;
  const at::Tensor u_area = at::rand({n, 10}, gen, dopt), u_ratio = at::rand({n, 10}, gen, dopt);
  const at::Tensor target = area * (scale[0] + (scale[1] - scale[0]) * u_area);
  const double log_lo = std::log(ratio[0]), log_hi = std::log(ratio[1]);
  const at::Tensor aspect = at::exp(log_lo + (log_hi - log_lo) * u_ratio);
  // Python's round (half to even), as torchvision's int(round(...)).
  const at::Tensor w = at::round(at::sqrt(target * aspect)), h = at::round(at::sqrt(target / aspect));
  const at::Tensor fits = (w > 0) & (w <= width) & (h > 0) & (h <= height);  // (N, 10)
  const at::Tensor first = fits.to(at::kInt).argmax(1, true);                 // the first fitting try
  const at::Tensor any = fits.any(1);
  // Fallback: the whole image, its aspect clamped into the ratio range, centred.
  const double in_ratio = static_cast<double>(width) / height;
  double fw = width, fh = height;
  if (in_ratio < ratio[0]) {
    fh = std::round(fw / ratio[0]);
  } else if (in_ratio > ratio[1]) {
    fw = std::round(fh * ratio[1]);
  }
  const at::Tensor bw = at::where(any, w.gather(1, first).squeeze(1), at::full({n}, fw, dopt));
  const at::Tensor bh = at::where(any, h.gather(1, first).squeeze(1), at::full({n}, fh, dopt));
  const at::Tensor u_top = at::rand({n}, gen, dopt), u_left = at::rand({n}, gen, dopt);
  const at::Tensor top = at::where(any, at::floor(u_top * (height - bh + 1)), at::floor((height - bh) / 2));
  const at::Tensor left = at::where(any, at::floor(u_left * (width - bw + 1)), at::floor((width - bw) / 2));
  return {top.to(at::kLong), left.to(at::kLong), bh.to(at::kLong), bw.to(at::kLong)};
}

at::Tensor resized_crop(const at::Tensor& images, const CropBoxes& boxes, int64_t out_h, int64_t out_w,
                        bool antialias) {
  // images: float (N, C, H, W) -> (N, C, out_h, out_w)
  TORCH_CHECK(images.dim() == 4 && images.is_floating_point(), "resized_crop: expected float (N, C, H, W), got ",
              images.dim(), "D ", images.scalar_type());
  const int64_t n = images.size(0), h = images.size(2), w = images.size(3);
  TORCH_CHECK(boxes.top.numel() == n, "resized_crop: ", boxes.top.numel(), " boxes for ", n, " images");
  const at::Tensor wy = axis_weights(boxes.top, boxes.height, out_h, h, antialias, images.device());   // (N, oh, H)
  const at::Tensor wx = axis_weights(boxes.left, boxes.width, out_w, w, antialias, images.device());   // (N, ow, W)
  const at::Tensor x = images.to(at::kFloat);
  // (N, 1, oh, H) @ (N, C, H, W) @ (N, 1, W, ow) -> (N, C, oh, ow)
  return at::matmul(at::matmul(wy.unsqueeze(1), x), wx.transpose(1, 2).unsqueeze(1));
}

at::Tensor mixup(const at::Tensor& x, double lam) { return x * lam + x.roll(1, 0) * (1.0 - lam); }

at::Tensor cutmix(const at::Tensor& x, int64_t y0, int64_t y1, int64_t x0, int64_t x1) {
  at::Tensor out = x.clone();
  if (y1 > y0 && x1 > x0) {
    using at::indexing::Slice;
    out.index_put_({Slice(), Slice(), Slice(y0, y1), Slice(x0, x1)},
                   x.roll(1, 0).index({Slice(), Slice(), Slice(y0, y1), Slice(x0, x1)}));
  }
  return out;
}

at::Tensor mixed_targets(const at::Tensor& labels, int64_t num_classes, double lam) {
  const at::Tensor one_hot = at::one_hot(labels.to(at::kLong), num_classes).to(at::kFloat);  // (N, K)
  return one_hot * lam + one_hot.roll(1, 0) * (1.0 - lam);
}

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

double DeviceAugment::uniform() {
  return at::rand({1}, gen_, at::TensorOptions().dtype(at::kDouble)).item<double>();
}

double DeviceAugment::sample_beta(double alpha) {
  // Beta(a, a) as the first coordinate of a Dirichlet(a, a) draw (torchvision's reference does the same).
  const at::Tensor conc = at::full({2}, alpha, at::TensorOptions().dtype(at::kDouble));
  return at::_sample_dirichlet(conc, gen_)[0].item<double>();
}

at::Tensor DeviceAugment::mix(at::Tensor& x, const at::Tensor& labels) {
  // x: float (N, C, H, W) normalised; labels: int64 (N) -> soft targets float (N, K), or labels
  if (!mixes()) return labels;
  TORCH_CHECK(opts_.num_classes > 0, "mixup/cutmix need the number of classes (AugmentOptions::num_classes)");
  TORCH_CHECK(x.dim() == 4 && x.size(0) == labels.size(0), "mix: expected (N, C, H, W) images and (N) labels");
  // Draws in a fixed order whatever is chosen, so the stream does not depend on earlier outcomes.
  const double u_apply = uniform(), u_which = uniform();
  const bool cut = opts_.cutmix_alpha > 0 && (opts_.mixup_alpha <= 0 || u_which < 0.5);
  const double lam = sample_beta(cut ? opts_.cutmix_alpha : opts_.mixup_alpha);
  const double u_x = uniform(), u_y = uniform();
  if (u_apply >= opts_.mix_prob || x.size(0) < 2) return labels;
  if (!cut) {
    x = mixup(x, lam);
    return mixed_targets(labels, opts_.num_classes, lam);
  }
  // torchvision's RandomCutmix box: centre uniform over the image, sides sqrt(1 - lam) of the
  // image's, clipped; lambda then corrected to the kept area.
  const int64_t h = x.size(2), w = x.size(3);
  const int64_t cx = static_cast<int64_t>(u_x * w), cy = static_cast<int64_t>(u_y * h);
  const double r = 0.5 * std::sqrt(1.0 - lam);
  const int64_t rw = static_cast<int64_t>(r * w), rh = static_cast<int64_t>(r * h);
  const int64_t x0 = std::max<int64_t>(cx - rw, 0), x1 = std::min<int64_t>(cx + rw, w);
  const int64_t y0 = std::max<int64_t>(cy - rh, 0), y1 = std::min<int64_t>(cy + rh, h);
  x = cutmix(x, y0, y1, x0, x1);
  const double kept = 1.0 - static_cast<double>((x1 - x0) * (y1 - y0)) / static_cast<double>(w * h);
  return mixed_targets(labels, opts_.num_classes, kept);
}

at::Tensor DeviceAugment::train(const at::Tensor& images) {
  // images: uint8 (N, C, H, W). Geometry is applied to the uint8 pixels (padding with black, as
  // torchvision's RandomCrop(padding) does before Normalize), then the batch is normalised.
  TORCH_CHECK(images.dim() == 4, "expected uint8 (N, C, H, W) images (got ", images.dim(), "D)");
  at::Tensor x = images;
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  const auto dev = x.device();
  if (opts_.random_resized_crop) {
    // Float from here on: the resampled pixels are not rounded back to uint8.
    const CropBoxes boxes = random_resized_crop_boxes(n, h, w, opts_.rrc_scale, opts_.rrc_ratio, gen_);
    x = resized_crop(x.to(at::kFloat), boxes, h, w, true);
  }
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
