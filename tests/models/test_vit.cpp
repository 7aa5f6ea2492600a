// Vision Transformers: torchvision's parameter counts and names, attention implementations against the fp64
// reference, logits against torchvision on the same (random, seeded) weights in fp32 and bf16, position-embedding
// interpolation against torchvision's interpolate_embeddings, watch points for the non-finite locator, training.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <optional>
#include <set>

#include "keel/compat/torch_compat.h"
#include "keel/models/registry.h"
#include "keel/models/state_dict.h"
#include "keel/models/vit.h"
#include "keel/train/locator.h"

namespace fs = std::filesystem;
using keel::models::AttentionImpl;
using keel::models::StateDict;

namespace {

int64_t count_params(torch::nn::Module& m) {
  int64_t n = 0;
  for (auto& p : m.parameters()) n += p.numel();
  return n;
}

const at::Tensor& find(const StateDict& sd, const std::string& name) {
  for (const auto& [k, v] : sd)
    if (k == name) return v;
  throw std::runtime_error("no key " + name);
}

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

// Golden files of scripts/golden_vit.py for the given cases, written once per test program into a directory that
// lives until the program ends.
struct Golden {
  fs::path dir;
  explicit Golden(const std::string& cases) {
    const char* base = std::getenv("KEEL_TEST_TMP");
    dir = fs::path(base && *base ? base : "/tmp") / ("keel_vit_golden_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    const std::string cmd = std::string("/usr/bin/python3 ") + KEEL_SOURCE_DIR + "/scripts/golden_vit.py " +
                            dir.string() + " " + cases;
    ok = std::system(cmd.c_str()) == 0;
  }
  ~Golden() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  StateDict read(const std::string& f) const { return keel::models::read_state_dict((dir / f).string()); }
  bool ok = false;
};

std::shared_ptr<keel::models::VisionTransformer> make_vit(const std::string& name, int64_t channels, int64_t classes,
                                                          int64_t image_size = 0, std::string attention = "auto") {
  keel::models::ModelSpec s;
  s.name = name;
  s.in_channels = channels;
  s.num_classes = classes;
  s.image_size = image_size;
  s.attention = attention;
  auto net = std::dynamic_pointer_cast<keel::models::VisionTransformer>(keel::models::create(s));
  if (!net) throw std::runtime_error(name + " is not a VisionTransformer");
  return net;
}

// The implementations a test can compare: keel's always, sdpa where LibTorch has it.
std::vector<std::string> implementations() {
  std::vector<std::string> v = {"keel"};
  if (keel::compat::kHasSdpa) v.push_back("sdpa");
  return v;
}

}  // namespace

TEST(ViT, ParameterCountsMatchTorchvision) {
  // sum(p.numel() for p in torchvision.models.vit_b_16().parameters()), and VisionTransformer(224, 16, 12, 3, 192,
  // 768) / (224, 16, 12, 6, 384, 1536) for Tiny and Small (timm's sizes).
  EXPECT_EQ(count_params(*make_vit("vit_b_16", 3, 1000)), 86567656);
  EXPECT_EQ(count_params(*make_vit("vit_base_16", 3, 1000)), 86567656);
  EXPECT_EQ(count_params(*make_vit("vit_b_32", 3, 1000)), 88224232);
  EXPECT_EQ(count_params(*make_vit("vit_tiny_16", 3, 1000)), 5717416);
  EXPECT_EQ(count_params(*make_vit("vit_small_16", 3, 1000)), 22050664);
}

TEST(ViT, LargeParameterCountMatchesTorchvision) {
  EXPECT_EQ(count_params(*make_vit("vit_l_16", 3, 1000)), 304326632);  // torchvision.models.vit_l_16
}

TEST(ViT, TorchvisionNamesAndOrder) {
  auto m = make_vit("vit_tiny_16", 3, 10);
  StateDict sd = keel::models::state_dict_of(*m);
  // torchvision.models.vit_b_16().state_dict().keys(): the same names, the same order.
  const std::vector<std::string> first = {
      "class_token", "conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding",
      "encoder.layers.encoder_layer_0.ln_1.weight", "encoder.layers.encoder_layer_0.ln_1.bias",
      "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
      "encoder.layers.encoder_layer_0.self_attention.in_proj_bias",
      "encoder.layers.encoder_layer_0.self_attention.out_proj.weight",
      "encoder.layers.encoder_layer_0.self_attention.out_proj.bias", "encoder.layers.encoder_layer_0.ln_2.weight",
      "encoder.layers.encoder_layer_0.ln_2.bias", "encoder.layers.encoder_layer_0.mlp.0.weight",
      "encoder.layers.encoder_layer_0.mlp.0.bias", "encoder.layers.encoder_layer_0.mlp.3.weight",
      "encoder.layers.encoder_layer_0.mlp.3.bias"};
  ASSERT_GE(sd.size(), first.size());
  for (size_t i = 0; i < first.size(); ++i) EXPECT_EQ(sd[i].first, first[i]) << i;
  const std::vector<std::string> last = {"encoder.ln.weight", "encoder.ln.bias", "heads.head.weight",
                                         "heads.head.bias"};
  for (size_t i = 0; i < last.size(); ++i) EXPECT_EQ(sd[sd.size() - 4 + i].first, last[i]);
  EXPECT_EQ(sd.size(), 4 + 12 * 12 + 4u);
  EXPECT_EQ(find(sd, "encoder.pos_embedding").sizes(), (at::IntArrayRef{1, 197, 192}));
}

TEST(ViT, ShapesChannelsImageSizeAndErrors) {
  auto m = make_vit("vit_tiny_16", 1, 7, 32);
  m->eval();
  torch::NoGradGuard ng;
  EXPECT_EQ(m->forward(at::randn({2, 1, 32, 32})).sizes(), (at::IntArrayRef{2, 7}));
  try {
    m->forward(at::randn({2, 1, 48, 48}));
    ADD_FAILURE() << "expected an error for the wrong image size";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("(N, 1, 32, 32)"), std::string::npos) << e.what();
  }
  EXPECT_THROW(make_vit("vit_tiny_16", 3, 10, 40), std::invalid_argument);  // 40 is not a multiple of 16
  EXPECT_THROW(make_vit("vit_tiny_16", 3, 10, 32, "fast"), std::invalid_argument);
  // ViT-B/16 at 224: 17.6 GMACs (torchvision's published 17.56 GFLOPS counts multiply-adds).
  EXPECT_NEAR(make_vit("vit_b_16", 3, 1000)->macs_per_image(224, 224) / 1e9, 17.56, 0.1);
}

TEST(ViTAttention, ImplementationsMatchTheFp64Reference) {
  torch::manual_seed(3);
  // (B, H, L, d) like ViT-S/16's 197 tokens of 6 heads x 64, as strided views of one fused QKV tensor.
  at::Tensor qkv = at::randn({2, 197, 3, 6, 64}).permute({2, 0, 3, 1, 4});
  const at::Tensor q = qkv[0], k = qkv[1], v = qkv[2];
  const at::Tensor ref = keel::models::attention_reference(q, k, v);
  EXPECT_LT(max_diff(keel::models::attention_keel(q, k, v), ref), 1e-5);
  if (keel::compat::kHasSdpa) {
    EXPECT_LT(max_diff(keel::models::attention(q, k, v, AttentionImpl::kSdpa), ref), 1e-5);
  }
  // Large scores (std ~900): a softmax without the max subtraction overflows exp to inf and NaN. The fp32 scores
  // themselves carry rounding of ~1e-4 absolute at that magnitude, which the exponential passes on: hence 2e-3.
  const at::Tensor big = keel::models::attention_keel(q * 30, k * 30, v);
  EXPECT_TRUE(big.isfinite().all().item<bool>());
  EXPECT_LT(max_diff(big, keel::models::attention_reference(q * 30, k * 30, v)), 2e-3);
  // bf16 inputs: within bf16's resolution of the fp64 result on the same rounded inputs.
  const at::Tensor qb = q.to(at::kBFloat16), kb = k.to(at::kBFloat16), vb = v.to(at::kBFloat16);
  const at::Tensor refb = keel::models::attention_reference(qb.to(at::kFloat), kb.to(at::kFloat), vb.to(at::kFloat));
  const at::Tensor outb = keel::models::attention_keel(qb, kb, vb);
  EXPECT_EQ(outb.scalar_type(), at::kBFloat16);
  EXPECT_LT(max_diff(outb.to(at::kFloat), refb), 2e-2) << "|ref| max " << refb.abs().max().item<double>();
}

TEST(ViTAttention, AutocastRunsTheMatmulsInBf16) {
  torch::manual_seed(4);
  at::Tensor q = at::randn({1, 2, 17, 16}), k = at::randn({1, 2, 17, 16}), v = at::randn({1, 2, 17, 16});
  keel::compat::AutocastGuard ac(at::kCPU, true, at::kBFloat16);
  for (const auto& impl : implementations()) {
    at::Tensor o = keel::models::attention(q, k, v, keel::models::parse_attention(impl));
    EXPECT_EQ(o.scalar_type(), at::kBFloat16) << impl;
    EXPECT_LT(max_diff(o.to(at::kFloat), keel::models::attention_reference(q, k, v)), 3e-2) << impl;
  }
}

// One golden set for the whole program: ViT-B/16 (86 M parameters) is built once in Python.
class ViTGolden : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { golden = new Golden("vit_b_16 tiny_c1 interp"); }
  static void TearDownTestSuite() {
    delete golden;
    golden = nullptr;
  }
  static Golden* golden;

  // Loads case's state dict into `net`, checks fp32 logits (< 1e-4) and bf16 autocast logits against torchvision.
  static void check(const std::string& kase, keel::models::VisionTransformer& net) {
    ASSERT_TRUE(golden->ok) << "scripts/golden_vit.py failed (needs /usr/bin/python3 with torch and torchvision)";
    keel::models::load_state_dict(net, golden->read(kase + ".pt"));
    const StateDict io = golden->read(kase + "_io.pt");
    const at::Tensor& x = find(io, "x");
    const at::Tensor& expected = find(io, "logits");
    const at::Tensor& expected_bf16 = find(io, "logits_bf16");
    net.eval();
    torch::NoGradGuard ng;
    for (const auto& impl : implementations()) {
      net.set_attention(keel::models::parse_attention(impl));
      const at::Tensor logits = net.forward(x);
      ASSERT_EQ(logits.sizes(), expected.sizes());
      EXPECT_LT(max_diff(logits, expected), 1e-4)
          << kase << " (" << impl << "): max |keel - torchvision| fp32 logits; |logits| max "
          << expected.abs().max().item<double>();
      at::Tensor bf16;
      {
        keel::compat::AutocastGuard ac(at::kCPU, true, at::kBFloat16);
        bf16 = net.forward(x).to(at::kFloat);
      }
      // Documented bf16 tolerance (docs/inference.md): keel's bf16 autocast logits are within 2x PyTorch's own
      // bf16 autocast error (torchvision bf16 vs fp32 on the same weights), plus 2e-3.
      const double peer_err = max_diff(expected_bf16, expected), err = max_diff(bf16, expected);
      EXPECT_LT(err, 2 * peer_err + 2e-3) << kase << " (" << impl << "): keel bf16 vs torchvision fp32 " << err
                                          << ", torchvision bf16 vs fp32 " << peer_err;
      std::cout << kase << " (" << impl << "): fp32 max diff " << max_diff(logits, expected) << ", bf16 error "
                << err << " (torchvision's own bf16 error " << peer_err << ")\n";
    }
  }
};
Golden* ViTGolden::golden = nullptr;

TEST_F(ViTGolden, VitB16LogitsMatchTorchvision) {
  auto net = make_vit("vit_b_16", 3, 1000);
  check("vit_b_16", *net);
}

TEST_F(ViTGolden, TinyOneChannelLogitsMatchTorchvision) {
  auto net = make_vit("vit_tiny_16", 1, 10, 64);
  check("tiny_c1", *net);
}

TEST_F(ViTGolden, StateDictOfAnotherImageSizeIsInterpolatedAsTorchvisionDoes) {
  // The file holds a 64 px model (4x4 grid); keel's 96 px model (6x6) loads it through load_state_dict, which
  // interpolates the position embeddings; torchvision's logits come from interpolate_embeddings(96, 16, state).
  auto net = make_vit("vit_tiny_16", 1, 10, 96);
  check("interp", *net);
  EXPECT_EQ(net->pos_embedding.sizes(), (at::IntArrayRef{1, 37, 192}));
}

TEST(ViT, MismatchedPositionEmbeddingWidthIsStillAnError) {
  auto net = make_vit("vit_tiny_16", 3, 10, 32);
  StateDict sd = keel::models::state_dict_of(*net);
  for (auto& [k, v] : sd)
    if (k == "encoder.pos_embedding") v = at::zeros({1, 5, 100});  // other width: not this architecture
  EXPECT_THROW(keel::models::load_state_dict(*net, sd), std::runtime_error);
}

TEST(ViT, WatchPointsLocateTheFirstNonFiniteBlock) {
  auto net = make_vit("vit_tiny_16", 3, 10, 32);
  net->eval();
  // Poison block 3's attention output projection: the locator must name block 3's attention, not a later module.
  {
    torch::NoGradGuard ng;
    net->blocks[3]->self_attention->out_proj->bias.fill_(std::numeric_limits<float>::infinity());
  }
  keel::train::NonFiniteLocator loc;
  {
    keel::models::WatchScope scope(&loc);
    torch::NoGradGuard ng;
    net->forward(at::randn({1, 3, 32, 32}));
  }
  auto where = loc.first_nonfinite();
  ASSERT_TRUE(where.has_value());
  EXPECT_EQ(where->module, "encoder.layers.encoder_layer_3.self_attention");
}

TEST(ViT, TrainsOnAFixedBatch) {
  // Every parameter gets a gradient after the first step (the head starts at zero, as torchvision's), and AdamW
  // overfits a fixed batch.
  torch::manual_seed(0);
  auto net = make_vit("vit_tiny_16", 1, 4, 32);
  net->train();
  torch::optim::AdamW opt(net->parameters(), torch::optim::AdamWOptions(1e-3));
  const at::Tensor x = at::randn({8, 1, 32, 32}), y = at::arange(8, at::kLong) % 4;
  double first = 0, last = 0;
  for (int step = 0; step < 25; ++step) {
    opt.zero_grad();
    at::Tensor loss = at::cross_entropy_loss(net->forward(x), y);
    loss.backward();
    if (step == 1) {
      for (const auto& p : net->named_parameters()) {
        EXPECT_TRUE(p.value().grad().defined() && p.value().grad().abs().sum().item<double>() > 0) << p.key();
      }
    }
    opt.step();
    (step == 0 ? first : last) = loss.item<double>();
  }
  EXPECT_LT(last, 0.5 * first) << "loss " << first << " -> " << last;
}
