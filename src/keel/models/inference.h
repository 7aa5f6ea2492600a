// Inference optimisations, each switchable: inference mode, conv-BatchNorm folding (ResNets), channels_last,
// oneDNN pre-packed linear weights, bf16 autocast or a bf16 model. `keel bench infer` measures them one by one;
// tests/models/test_inference.cpp checks each one's numerics. (Intra-op thread count is the caller's:
// train::configure_threads.)
#pragma once
#include <string>
#include "keel/models/net.h"

namespace keel::models {

struct InferenceOptions {
  bool inference_mode = true;      // c10::InferenceMode (tensors carry no autograd state) instead of NoGradGuard
  bool fold_bn = true;             // fold eval BatchNorms into the preceding convs (ResNets; a no-op for ViTs)
  bool channels_last = true;       // NHWC weights and inputs (oneDNN's native conv layout)
  // Linear layers' weights pre-packed in oneDNN's blocked layout once (Net::pack_linear_weights; LibTorch >= 2.0,
  // models/packed_linear.h), the ViT's MLP GELU fused into its first GEMM. The packed copy is in the weights'
  // dtype, so it goes with fp32 or bf16m, not with autocast (which picks the dtype per call).
  bool pack = false;
  std::string precision = "fp32";  // fp32 | bf16 (autocast; CPU and CUDA) | fp16 (autocast; CUDA only)
  // With bf16: the conv and linear weights are cast to bf16 once, when the model is prepared, instead of by
  // autocast in every forward (which re-reads every fp32 weight per call: at batch 1 that traffic is much of the
  // time). Norm parameters, biases, class token and position embeddings stay fp32.
  bool bf16_weights = false;
  // With bf16: the whole model (every parameter and buffer) and the input in bf16, no autocast: no per-op
  // casts and a bf16 residual stream (ViTs), at the cost of norms and residual adds rounded to bf16 too.
  bool bf16_model = false;

  // "plain" (all off, fp32) or '+'-joined switches: im, fold, cl, pack, bf16, bf16w (bf16 + bf16_weights), bf16m
  // (bf16 + bf16_model), fp16 (e.g. "im+fold+cl+bf16w", "im+cl+pack+bf16m").
  std::string label() const;
  // Parses a label as above; throws std::invalid_argument naming the unknown switch and the known ones.
  static InferenceOptions parse(const std::string& label);
};

struct Prepared {
  int64_t folded = 0;  // BatchNorms folded into convs
  int64_t packed = 0;  // linear weights packed (0 with `pack` where this LibTorch has no packed linears)
};

// Prepares `m` in place: eval mode, then BN folding, channels_last weights, the dtype and packing as `o` asks.
// A folded model keeps its folding (and refuses to train); prepare a fresh copy per setting. Throws
// std::invalid_argument for `pack` with autocast (bf16, bf16w, fp16).
Prepared prepare_for_inference(Net& m, const InferenceOptions& o);

// One forward pass of x (N, C, H, W) under o's autograd mode and precision -> float logits (N, K). The input
// is converted to channels_last when o asks.
at::Tensor infer(Net& m, const at::Tensor& x, const InferenceOptions& o);

}  // namespace keel::models
