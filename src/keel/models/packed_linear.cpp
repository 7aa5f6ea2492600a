// oneDNN pre-packed linear layers: see packed_linear.h.
#include "keel/models/packed_linear.h"

#include <c10/core/GradMode.h>

#include <map>
#include <mutex>

#include "keel/compat/torch_compat.h"

namespace keel::models {

bool packed_linear_supported(at::ScalarType dtype) {
  if (!compat::has_packed_linear()) return false;
  static std::mutex mu;
  static std::map<at::ScalarType, bool> known;  // per dtype: bf16 needs avx512bw/vl/dq (oneDNN's check)
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(dtype);
  if (it != known.end()) return it->second;
  bool ok = false;
  try {
    c10::InferenceMode im;
    ok = compat::reorder_linear_weight(at::zeros({4, 4}, at::TensorOptions().dtype(dtype))).defined();
  } catch (const c10::Error&) {
  }
  return known[dtype] = ok;
}

bool PackedLinear::pack(const at::Tensor& weight) {
  *this = PackedLinear();
  TORCH_CHECK(weight.dim() == 2, "packed linear: expected a weight (out, in), got ", weight.sizes());
  // An inference tensor has no version counter, so a later in-place change could not be detected.
  if (!weight.device().is_cpu() || weight.is_inference() || !packed_linear_supported(weight.scalar_type())) {
    return false;
  }
  at::NoGradGuard ng;
  packed_ = compat::reorder_linear_weight(weight.contiguous());
  source_ = weight.data_ptr();
  version_ = weight._version();
  return true;
}

bool PackedLinear::usable(const at::Tensor& x, const at::Tensor& weight) const {
  return packed_.defined() && !c10::GradMode::is_enabled() && x.device().is_cpu() &&
         x.scalar_type() == packed_.scalar_type() && !compat::AutocastGuard::is_enabled(at::kCPU) &&
         weight.data_ptr() == source_ && weight._version() == version_;
}

at::Tensor PackedLinear::operator()(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                    bool gelu) const {
  if (usable(x, weight)) return compat::linear_pointwise(x, packed_, bias, gelu ? "gelu" : "none", "none");
  at::Tensor y = at::linear(x, weight, bias);
  return gelu ? at::gelu(y) : y;
}

}  // namespace keel::models
