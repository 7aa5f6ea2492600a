// Vision Transformer implementation: torchvision's module tree and initialisation, keel's attention.
#include "keel/models/vit.h"

#include <torch/nn/init.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/functional/upsampling.h>

#include <cmath>
#include <stdexcept>

#include "keel/compat/torch_compat.h"
#include "keel/models/watch.h"

namespace keel::models {

AttentionImpl parse_attention(const std::string& name) {
  if (name == "auto") return AttentionImpl::kAuto;
  if (name == "keel") return AttentionImpl::kKeel;
  if (name == "sdpa") return AttentionImpl::kSdpa;
  if (name == "reference") return AttentionImpl::kReference;
  throw std::invalid_argument("attention '" + name + "': expected auto, keel, sdpa or reference");
}

std::string to_string(AttentionImpl a) {
  switch (a) {
    case AttentionImpl::kAuto: return "auto";
    case AttentionImpl::kKeel: return "keel";
    case AttentionImpl::kSdpa: return "sdpa";
    case AttentionImpl::kReference: return "reference";
  }
  return "?";
}

at::Tensor attention_keel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  // q: (B, H, L, d), k/v: (B, H, S, d) -> (B, H, L, d)
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), S = k.size(2), d = q.size(3);
  // Head-major 3-D operands for bmm: one copy each when q/k/v are strided views of a fused QKV projection;
  // k is then used transposed in place (BLAS reads it with swapped strides, no copy).
  const at::Tensor q3 = q.reshape({B * H, L, d}), k3 = k.reshape({B * H, S, d}), v3 = v.reshape({B * H, S, d});
  // The 1/sqrt(d) scale rides in the GEMM's alpha rather than a separate pass over q or the scores.
  at::Tensor scores = at::baddbmm(at::empty({B * H, L, S}, q3.options()), q3, k3.transpose(1, 2),
                                  /*beta=*/0.0, /*alpha=*/1.0 / std::sqrt(static_cast<double>(d)));  // (BH, L, S)
  // Softmax subtracts the row maximum (ATen's kernel), and runs in fp32 for bf16/fp16 scores: the exp-sum of
  // hundreds of terms is where reduced precision loses most.
  at::Tensor p = scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble
                     ? at::softmax(scores, -1)
                     : at::softmax(scores, -1, at::kFloat).to(scores.scalar_type());
  scores.reset();  // the scores go before the output is allocated: one (BH, L, S) buffer alive at a time more
  return at::bmm(p, v3.to(p.scalar_type())).view({B, H, L, d});
}

at::Tensor attention_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  // q: (B, H, L, d), k/v: (B, H, S, d) -> (B, H, L, d); fp64 throughout, the textbook formula.
  const at::Tensor qd = q.to(at::kDouble), kd = k.to(at::kDouble), vd = v.to(at::kDouble);
  at::Tensor s = at::matmul(qd, kd.transpose(-2, -1)) / std::sqrt(static_cast<double>(q.size(-1)));
  s = (s - std::get<0>(s.max(-1, /*keepdim=*/true))).exp();
  return at::matmul(s / s.sum(-1, /*keepdim=*/true), vd).to(q.scalar_type());
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, AttentionImpl impl) {
  switch (impl) {
    case AttentionImpl::kAuto:
      return compat::kHasSdpa ? compat::scaled_dot_product_attention(q, k, v) : attention_keel(q, k, v);
    case AttentionImpl::kKeel: return attention_keel(q, k, v);
    case AttentionImpl::kSdpa: return compat::scaled_dot_product_attention(q, k, v);
    case AttentionImpl::kReference: return attention_reference(q, k, v);
  }
  TORCH_CHECK(false, "unknown attention implementation");
}

SelfAttentionImpl::SelfAttentionImpl(int64_t dim_, int64_t heads_, AttentionImpl impl_)
    : dim(dim_), heads(heads_), impl(impl_) {
  TORCH_CHECK(dim % heads == 0, "self-attention: hidden_dim ", dim, " is not divisible by num_heads ", heads);
  in_proj_weight = register_parameter("in_proj_weight", at::empty({3 * dim, dim}));
  in_proj_bias = register_parameter("in_proj_bias", at::zeros({3 * dim}));
  out_proj = register_module("out_proj", torch::nn::Linear(dim, dim));
  // nn.MultiheadAttention._reset_parameters
  torch::nn::init::xavier_uniform_(in_proj_weight);
  torch::nn::init::zeros_(out_proj->bias);
}

at::Tensor SelfAttentionImpl::forward(const at::Tensor& x) {
  // x: (N, L, D) -> (N, L, D)
  const int64_t N = x.size(0), L = x.size(1), d = dim / heads;
  at::Tensor qkv = in_proj_packed(x, in_proj_weight, in_proj_bias)  // (N, L, 3D): one GEMM for q, k and v
                       .view({N, L, 3, heads, d})
                       .permute({2, 0, 3, 1, 4});  // (3, N, H, L, d), a view
  at::Tensor o = attention(qkv[0], qkv[1], qkv[2], impl);  // (N, H, L, d)
  return out_proj_packed(o.transpose(1, 2).reshape({N, L, dim}), out_proj->weight, out_proj->bias);
}

EncoderBlockImpl::EncoderBlockImpl(const ViTOptions& o, std::string path_)
    : path(std::move(path_)), n_attn(path + ".self_attention"), n_mlp(path + ".mlp") {
  ln_1 = register_module("ln_1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({o.hidden_dim}).eps(o.layer_norm_eps)));
  self_attention = register_module("self_attention", SelfAttention(o.hidden_dim, o.num_heads, o.attention));
  ln_2 = register_module("ln_2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({o.hidden_dim}).eps(o.layer_norm_eps)));
  fc1 = torch::nn::Linear(o.hidden_dim, o.mlp_dim);
  fc2 = torch::nn::Linear(o.mlp_dim, o.hidden_dim);
  // torchvision's MLPBlock: Linear, GELU, Dropout, Linear, Dropout -> parameters mlp.0.* and mlp.3.*
  mlp = register_module("mlp", torch::nn::Sequential(fc1, torch::nn::GELU(), torch::nn::Dropout(0.0), fc2,
                                                     torch::nn::Dropout(0.0)));
  for (auto& l : {fc1, fc2}) {
    torch::nn::init::xavier_uniform_(l->weight);
    torch::nn::init::normal_(l->bias, 0.0, 1e-6);
  }
}

at::Tensor EncoderBlockImpl::forward(const at::Tensor& x) {
  // x: (N, L, D) -> (N, L, D). Under autocast the residual stream stays fp32 (x + a bf16 branch promotes).
  at::Tensor y = x + watch(n_attn, self_attention(ln_1(x)));
  const at::Tensor h = fc1_packed(ln_2(y), fc1->weight, fc1->bias, /*gelu=*/true);
  return watch(path, y + watch(n_mlp, fc2_packed(h, fc2->weight, fc2->bias)));
}

namespace {

// torch.nn.init.trunc_normal_(t, mean=0, std, a=-2, b=2): inverse-CDF sampling of the truncated normal.
void trunc_normal_(at::Tensor t, double std, double a = -2.0, double b = 2.0) {
  torch::NoGradGuard ng;
  auto cdf = [](double x) { return (1.0 + std::erf(x / std::sqrt(2.0))) / 2.0; };
  const double l = cdf(a / std), u = cdf(b / std);
  t.uniform_(2 * l - 1, 2 * u - 1).erfinv_().mul_(std * std::sqrt(2.0)).clamp_(a, b);
}

}  // namespace

VisionTransformer::VisionTransformer(const ViTOptions& o) : opts(o) {
  TORCH_CHECK(o.image_size % o.patch_size == 0, "ViT: image_size ", o.image_size, " is not divisible by patch_size ",
              o.patch_size);
  const int64_t grid = o.image_size / o.patch_size, D = o.hidden_dim;
  class_token = register_parameter("class_token", at::zeros({1, 1, D}));
  conv_proj = register_module(
      "conv_proj", torch::nn::Conv2d(torch::nn::Conv2dOptions(o.in_channels, D, o.patch_size).stride(o.patch_size)));
  encoder = register_module("encoder", std::make_shared<torch::nn::Module>("Encoder"));
  pos_embedding = encoder->register_parameter("pos_embedding", at::empty({1, grid * grid + 1, D}).normal_(0.0, 0.02));
  layers = encoder->register_module("layers", std::make_shared<torch::nn::Module>("Layers"));
  for (int64_t i = 0; i < o.num_layers; ++i) {
    const std::string name = "encoder_layer_" + std::to_string(i);
    blocks.push_back(layers->register_module(name, EncoderBlock(o, "encoder.layers." + name)));
  }
  ln = encoder->register_module("ln", torch::nn::LayerNorm(torch::nn::LayerNormOptions({D}).eps(o.layer_norm_eps)));
  heads = register_module("heads", std::make_shared<torch::nn::Module>("Heads"));
  head = heads->register_module("head", torch::nn::Linear(D, o.num_classes));
  // torchvision's VisionTransformer.__init__ initialisation.
  trunc_normal_(conv_proj->weight, std::sqrt(1.0 / (o.in_channels * o.patch_size * o.patch_size)));
  torch::nn::init::zeros_(conv_proj->bias);
  torch::nn::init::zeros_(head->weight);
  torch::nn::init::zeros_(head->bias);
}

at::Tensor VisionTransformer::forward(at::Tensor x) {
  // x: (N, C, H, W) -> logits (N, num_classes)
  TORCH_CHECK(x.dim() == 4 && x.size(1) == opts.in_channels && x.size(2) == opts.image_size &&
                  x.size(3) == opts.image_size,
              "ViT: expected input (N, ", opts.in_channels, ", ", opts.image_size, ", ", opts.image_size, "), got ",
              x.sizes(), " (the model's image size is model.image_size; a state dict saved at another size is "
              "interpolated when it is loaded)");
  const int64_t N = x.size(0);
  x = watch("conv_proj", conv_proj(x));       // (N, D, g, g)
  x = x.flatten(2).transpose(1, 2);           // (N, g*g, D)
  // The class token's dtype (fp32) wins: under autocast the residual stream stays fp32, as torchvision's does.
  x = at::cat({class_token.expand({N, -1, -1}), x.to(class_token.scalar_type())}, 1);  // (N, 1 + g*g, D)
  x = x + pos_embedding;
  for (auto& b : blocks) x = b->forward(x);
  x = watch("encoder.ln", ln(x));
  // class token -> (N, num_classes)
  return watch("heads.head", head_packed(x.select(1, 0), head->weight, head->bias));
}

void VisionTransformer::set_attention(AttentionImpl impl) {
  opts.attention = impl;
  for (auto& b : blocks) b->self_attention->impl = impl;
}

int64_t VisionTransformer::pack_linear_weights() {
  int64_t n = 0;
  for (auto& b : blocks) {
    n += b->self_attention->in_proj_packed.pack(b->self_attention->in_proj_weight);
    n += b->self_attention->out_proj_packed.pack(b->self_attention->out_proj->weight);
    n += b->fc1_packed.pack(b->fc1->weight);
    n += b->fc2_packed.pack(b->fc2->weight);
  }
  return n + head_packed.pack(head->weight);
}

double VisionTransformer::macs_per_image(int64_t height, int64_t width) const {
  const double g = static_cast<double>((height / opts.patch_size) * (width / opts.patch_size));
  const double L = g + 1, D = static_cast<double>(opts.hidden_dim), M = static_cast<double>(opts.mlp_dim);
  const double patch = g * D * opts.in_channels * opts.patch_size * opts.patch_size;
  // Per block: QKV, q k^T, p v, out_proj, two MLP GEMMs.
  const double block = L * D * 3 * D + 2 * L * L * D + L * D * D + 2 * L * D * M;
  return patch + opts.num_layers * block + D * opts.num_classes;
}

at::Tensor interpolate_pos_embedding(const at::Tensor& pos, int64_t new_grid) {
  // pos: (1, 1 + g^2, D) -> (1, 1 + new_grid^2, D)
  TORCH_CHECK(pos.dim() == 3 && pos.size(0) == 1, "pos_embedding: expected (1, 1 + g^2, D), got ", pos.sizes());
  const int64_t n = pos.size(1) - 1, D = pos.size(2);
  const auto g = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(n))));
  TORCH_CHECK(g * g == n, "pos_embedding: ", n, " patch positions do not form a square grid");
  if (g == new_grid) return pos;
  torch::NoGradGuard ng;
  at::Tensor img = pos.slice(1, 1).permute({0, 2, 1}).reshape({1, D, g, g});
  img = torch::nn::functional::interpolate(img, torch::nn::functional::InterpolateFuncOptions()
                                                    .size(std::vector<int64_t>{new_grid, new_grid})
                                                    .mode(torch::kBicubic)
                                                    .align_corners(true));
  img = img.reshape({1, D, new_grid * new_grid}).permute({0, 2, 1});
  return at::cat({pos.slice(1, 0, 1), img}, 1).contiguous();
}

NamedTensors VisionTransformer::adapt_state_dict(const NamedTensors& sd) const {
  NamedTensors out = sd;
  for (auto& [name, t] : out) {
    if (name == "encoder.pos_embedding" && t.defined() && t.dim() == 3 && t.size(1) != pos_embedding.size(1) &&
        t.size(2) == pos_embedding.size(2)) {
      t = interpolate_pos_embedding(t, opts.image_size / opts.patch_size);
    }
  }
  return out;
}

std::optional<ViTOptions> vit_options(const std::string& name) {
  struct Size { const char* name; int64_t layers, heads, dim, mlp; };
  // timm's Tiny/Small, torchvision's Base/Large.
  static const Size sizes[] = {{"tiny", 12, 3, 192, 768}, {"small", 12, 6, 384, 1536},
                               {"base", 12, 12, 768, 3072}, {"large", 24, 16, 1024, 4096},
                               {"b", 12, 12, 768, 3072}, {"l", 24, 16, 1024, 4096}};
  for (const auto& n : vit_names()) {
    if (n != name) continue;
    const auto last = name.rfind('_');
    const std::string size = name.substr(4, last - 4);
    ViTOptions o;
    o.patch_size = std::stoll(name.substr(last + 1));
    for (const auto& s : sizes) {
      if (size == s.name) {
        o.num_layers = s.layers;
        o.num_heads = s.heads;
        o.hidden_dim = s.dim;
        o.mlp_dim = s.mlp;
      }
    }
    return o;
  }
  return std::nullopt;
}

std::vector<std::string> vit_names() {
  return {"vit_b_16",     "vit_b_32",     "vit_base_16",  "vit_base_32", "vit_l_16",
          "vit_large_16", "vit_small_16", "vit_small_32", "vit_tiny_16", "vit_tiny_32"};
}

}  // namespace keel::models
