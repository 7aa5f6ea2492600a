// oneDNN pre-packed linear layers for inference (the `pack` inference switch, models/inference.h).
//
// LibTorch >= 2.0 on CPU registers the dispatcher operators TorchInductor uses for frozen linears:
// mkldnn::_reorder_linear_weight (a weight (out, in) -> an opaque tensor in oneDNN's blocked layout) and
// mkldnn::_linear_pointwise (x W^T + b from that layout, with an optional fused post-op such as GELU). A plain
// at::linear hands oneDNN/BLAS the row-major weight on every call; the packed one skips that. They have no
// public C++ API: keel looks them up in the dispatcher at run time, so a LibTorch without them (1.13, or one
// built without oneDNN) runs at::linear and packs nothing.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>

namespace keel::models {

// Whether the running LibTorch has the packed-linear operators (and the CPU supports them for `dtype`).
bool packed_linear_supported(at::ScalarType dtype);

// A packed copy of one linear layer's weight. The copy is tied to the weight it was made from: it is used only
// while that weight is the same storage at the same version (so an optimiser step, load_state_dict or .to() after
// packing falls back to at::linear instead of using stale numbers), only with gradients off (the operator has no
// backward for the packed weight), without autocast (whose per-op dtype choice it would bypass), and for CPU
// inputs of the packed dtype. Everything else runs at::linear with the same arguments.
class PackedLinear {
 public:
  // Packs `weight` (out, in; CPU, fp32 or bf16). Returns false (and packs nothing) where unsupported.
  bool pack(const at::Tensor& weight);

  // linear(x, weight, bias), then exact (erf) GELU when `gelu`; the packed path fuses the GELU into the GEMM.
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                        bool gelu = false) const;

 private:
  bool usable(const at::Tensor& x, const at::Tensor& weight) const;

  at::Tensor packed_;
  const void* source_ = nullptr;  // the weight's data pointer and version when packed
  uint32_t version_ = 0;
};

}  // namespace keel::models
