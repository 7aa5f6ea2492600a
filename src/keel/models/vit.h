// Vision Transformers with torchvision's VisionTransformer layout and parameter names (conv_proj, class_token,
// encoder.pos_embedding, encoder.layers.encoder_layer_N.{ln_1, self_attention, ln_2, mlp.0, mlp.3}, encoder.ln,
// heads.head), so a torchvision state dict loads by name; its position embeddings are interpolated (bicubic, as
// torchvision's interpolate_embeddings) when it was saved for another image size.
#pragma once
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <optional>
#include <string>
#include <vector>
#include "keel/models/net.h"
#include "keel/models/packed_linear.h"

namespace keel::models {

// How self-attention computes softmax(q k^T / sqrt(d)) v.
enum class AttentionImpl {
  kAuto,       // kSdpa where LibTorch has it (>= 2.0), else kKeel
  kKeel,       // keel's own: two batched GEMMs (scale folded into the first), softmax in fp32
  kSdpa,       // at::scaled_dot_product_attention (LibTorch >= 2.0; fused, never materialises the scores)
  kReference,  // straightforward fp64 reference, for tests only (slow)
};
// "auto" | "keel" | "sdpa" | "reference" -> AttentionImpl; throws std::invalid_argument naming the choices.
AttentionImpl parse_attention(const std::string& name);
std::string to_string(AttentionImpl a);

// Attention of q (B, H, L, d), k and v (B, H, S, d) -> (B, H, L, d), no mask, no dropout.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, AttentionImpl impl);
at::Tensor attention_keel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
at::Tensor attention_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

struct ViTOptions {
  int64_t image_size = 224;  // input side the position embeddings are for (inputs must be this size)
  int64_t patch_size = 16;
  int64_t num_layers = 12;
  int64_t num_heads = 12;
  int64_t hidden_dim = 768;
  int64_t mlp_dim = 3072;
  int64_t in_channels = 3;
  int64_t num_classes = 1000;
  double layer_norm_eps = 1e-6;  // torchvision's
  AttentionImpl attention = AttentionImpl::kAuto;
};

// Multi-head self-attention with nn.MultiheadAttention's parameter names: in_proj_weight (3D, D),
// in_proj_bias (3D), out_proj (Linear D -> D). One fused QKV projection.
struct SelfAttentionImpl : torch::nn::Module {
  SelfAttentionImpl(int64_t dim, int64_t heads, AttentionImpl impl);
  at::Tensor forward(const at::Tensor& x);

  int64_t dim, heads;
  AttentionImpl impl;
  at::Tensor in_proj_weight, in_proj_bias;
  torch::nn::Linear out_proj{nullptr};
  PackedLinear in_proj_packed, out_proj_packed;  // set by VisionTransformer::pack_linear_weights
};
TORCH_MODULE(SelfAttention);

// Pre-norm encoder block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); mlp = Linear, GELU, Linear (mlp.0, mlp.3).
struct EncoderBlockImpl : torch::nn::Module {
  EncoderBlockImpl(const ViTOptions& o, std::string path);
  at::Tensor forward(const at::Tensor& x);

  std::string path, n_attn, n_mlp;  // watch-point names, built once
  torch::nn::LayerNorm ln_1{nullptr}, ln_2{nullptr};
  SelfAttention self_attention{nullptr};
  torch::nn::Sequential mlp{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};  // mlp.0 and mlp.3 (the same modules)
  PackedLinear fc1_packed, fc2_packed;            // fc1's carries the GELU as a fused post-op
};
TORCH_MODULE(EncoderBlock);

// The network: patchify (conv_proj) -> [class token; patches] + position embedding -> encoder -> ln ->
// class token -> heads.head. Dropout is not implemented (torchvision's defaults are 0).
struct VisionTransformer : Net {
  explicit VisionTransformer(const ViTOptions& o);
  at::Tensor forward(at::Tensor x) override;
  double macs_per_image(int64_t height, int64_t width) const override;
  // Interpolates encoder.pos_embedding of a state dict saved for another image size to this model's.
  NamedTensors adapt_state_dict(const NamedTensors& sd) const override;
  // Switches every block's attention implementation (e.g. to the reference in tests).
  void set_attention(AttentionImpl impl);
  // Every block's QKV, out_proj, fc1 (GELU fused) and fc2, and the head: 4 * num_layers + 1.
  int64_t pack_linear_weights() override;

  ViTOptions opts;
  torch::nn::Conv2d conv_proj{nullptr};
  at::Tensor class_token;      // (1, 1, D)
  std::shared_ptr<torch::nn::Module> encoder, heads, layers;
  at::Tensor pos_embedding;    // encoder.pos_embedding (1, 1 + (image_size / patch_size)^2, D)
  std::vector<EncoderBlock> blocks;  // encoder.layers.encoder_layer_N
  torch::nn::LayerNorm ln{nullptr};  // encoder.ln
  torch::nn::Linear head{nullptr};   // heads.head
  PackedLinear head_packed;
};

// torchvision's interpolate_embeddings: pos (1, 1 + g^2, D) -> (1, 1 + new_grid^2, D), the class-token
// embedding kept, the g x g grid resized bicubically with align_corners = true.
at::Tensor interpolate_pos_embedding(const at::Tensor& pos, int64_t new_grid);

// ViT options of a registered name (vit_{tiny,small,base}_{16,32}, vit_large_16, and torchvision's vit_b_16,
// vit_b_32, vit_l_16); nullopt if unknown.
std::optional<ViTOptions> vit_options(const std::string& name);
std::vector<std::string> vit_names();

}  // namespace keel::models
