// Inference optimisations, one by one, for their numerics: conv-BN folding (< 1e-4 in fp32), channels_last,
// inference mode, bf16 autocast (documented tolerance) and the intra-op thread count.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <ATen/Parallel.h>

#include "keel/models/inference.h"
#include "keel/models/registry.h"
#include "keel/models/resnet.h"
#include "keel/models/state_dict.h"

using keel::models::InferenceOptions;

namespace {

// A model with non-trivial BatchNorm statistics and affine parameters (fresh ones are the identity in eval mode),
// as scripts/golden_torchvision.py makes them.
keel::models::NetPtr model_with_random_bn(const std::string& name, int64_t channels, int64_t classes) {
  torch::manual_seed(0);
  keel::models::ModelSpec s;
  s.name = name;
  s.in_channels = channels;
  s.num_classes = classes;
  s.image_size = name.rfind("vit", 0) == 0 ? 64 : 0;
  auto m = keel::models::create(s);
  torch::NoGradGuard ng;
  for (auto& mod : m->modules(false)) {
    if (auto* bn = mod->as<torch::nn::BatchNorm2d>()) {
      bn->weight.uniform_(0.5, 1.5);
      bn->bias.uniform_(-0.2, 0.2);
      bn->running_mean.uniform_(-0.2, 0.2);
      bn->running_var.uniform_(0.5, 2.0);
    }
  }
  for (auto& p : m->named_parameters()) {
    if (p.key().find("head") != std::string::npos) p.value().normal_(0, 0.02);  // ViT heads start at zero
  }
  m->eval();
  return m;
}

// A fresh copy of `src` (same name/io), with src's weights.
keel::models::NetPtr copy_of(const keel::models::NetPtr& src, const std::string& name, int64_t channels,
                             int64_t classes) {
  keel::models::ModelSpec s;
  s.name = name;
  s.in_channels = channels;
  s.num_classes = classes;
  s.image_size = name.rfind("vit", 0) == 0 ? 64 : 0;
  auto m = keel::models::create(s);
  keel::models::load_state_dict(*m, keel::models::state_dict_of(*src));
  m->eval();
  return m;
}

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

at::Tensor run(keel::models::Net& m, const at::Tensor& x, const std::string& label) {
  InferenceOptions o = InferenceOptions::parse(label);
  keel::models::prepare_for_inference(m, o);
  return keel::models::infer(m, x, o);
}

}  // namespace

TEST(Inference, LabelsRoundTripAndUnknownSwitchesAreNamed) {
  for (const char* l : {"plain", "im", "im+fold", "im+fold+cl", "im+fold+cl+bf16", "cl+bf16", "im+cl+bf16w", "im+fold+cl+bf16m"}) {
    EXPECT_EQ(InferenceOptions::parse(l).label(), l);
  }
  EXPECT_EQ(InferenceOptions().label(), "im+fold+cl");
  try {
    InferenceOptions::parse("im+jit");
    ADD_FAILURE() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("'jit'"), std::string::npos) << e.what();
  }
}

TEST(Inference, ConvBatchNormFoldingChangesLogitsBelow1e4) {
  struct Case { const char* name; int64_t channels, size, folded; };
  // ResNet-50: stem + 16 blocks x 3 + 4 downsamples = 53; ResNet-20: stem + 9 x 2 + 2 = 21.
  for (const Case& c : {Case{"resnet50", 3, 96, 53}, Case{"resnet20", 1, 28, 21}}) {
    auto ref = model_with_random_bn(c.name, c.channels, 10);
    torch::manual_seed(1);
    const at::Tensor x = at::randn({4, c.channels, c.size, c.size});
    const at::Tensor expected = run(*ref, x, "plain");
    auto m = copy_of(ref, c.name, c.channels, 10);
    auto* r = dynamic_cast<keel::models::ResNet*>(m.get());
    ASSERT_NE(r, nullptr);
    EXPECT_EQ(r->fold_batchnorm(), c.folded) << c.name;
    EXPECT_EQ(r->fold_batchnorm(), 0) << "folding twice is a no-op";
    const at::Tensor folded = run(*m, x, "fold");
    const double d = max_diff(folded, expected);
    EXPECT_LT(d, 1e-4) << c.name << ": |logits| max " << expected.abs().max().item<double>();
    std::cout << c.name << ": folding changes logits by " << d << " (|logits| max "
              << expected.abs().max().item<double>() << ")\n";
    EXPECT_TRUE(m->named_parameters().contains("conv1.bias")) << "folded convs gain a bias";
    m->train();
    EXPECT_THROW(m->forward(x), c10::Error) << "a folded model refuses to train";
  }
  auto fresh = keel::models::create({"resnet20", 1, 10});
  fresh->train();
  EXPECT_THROW(dynamic_cast<keel::models::ResNet&>(*fresh).fold_batchnorm(), c10::Error) << "folding needs eval mode";
}

TEST(Inference, ChannelsLastAndInferenceModeKeepTheLogits) {
  for (const char* name : {"resnet50", "vit_tiny_16"}) {
    auto ref = model_with_random_bn(name, 3, 10);
    torch::manual_seed(2);
    const at::Tensor x = at::randn({2, 3, 64, 64});
    const at::Tensor expected = run(*ref, x, "plain");
    const at::Tensor im = run(*copy_of(ref, name, 3, 10), x, "im");
    EXPECT_TRUE(im.is_inference()) << name << ": no autograd state under inference mode";
    EXPECT_FALSE(expected.is_inference());
    EXPECT_TRUE(at::equal(im, expected)) << name << ": inference mode changes bookkeeping, not arithmetic";
    EXPECT_LT(max_diff(run(*copy_of(ref, name, 3, 10), x, "cl"), expected), 1e-4) << name;
    EXPECT_LT(max_diff(run(*copy_of(ref, name, 3, 10), x, "im+fold+cl"), expected), 1e-4) << name;
  }
}

TEST(Inference, Bf16AutocastWithinTheDocumentedTolerance) {
  // docs/inference.md: bf16 autocast logits within 5% of the fp32 logits' largest magnitude (bf16 keeps 8
  // significant bits; a deep network accumulates a few of its rounding errors).
  for (const char* name : {"resnet50", "vit_tiny_16"}) {
    auto ref = model_with_random_bn(name, 3, 10);
    torch::manual_seed(3);
    const at::Tensor x = at::randn({2, 3, 64, 64});
    const at::Tensor expected = run(*ref, x, "plain");
    const at::Tensor bf16 = run(*copy_of(ref, name, 3, 10), x, "im+fold+cl+bf16");
    EXPECT_EQ(bf16.scalar_type(), at::kFloat);
    const double scale = expected.abs().max().item<double>(), d = max_diff(bf16, expected);
    EXPECT_LT(d, 0.05 * scale) << name;
    std::cout << name << ": bf16 vs fp32 max diff " << d << " (|logits| max " << scale << ")\n";
    // Weights cast once: the same products autocast forms (it rounds the same fp32 weights to bf16), so the same
    // logits up to accumulation order.
    auto mw = copy_of(ref, name, 3, 10);
    const at::Tensor bf16w = run(*mw, x, "im+fold+cl+bf16w");
    EXPECT_LT(max_diff(bf16w, expected), 0.05 * scale) << name;
    EXPECT_LT(max_diff(bf16w, bf16), 0.01 * scale) << name;
    int64_t cast = 0;
    for (const auto& p : mw->named_parameters()) cast += p.value().scalar_type() == at::kBFloat16;
    EXPECT_GT(cast, 0) << name;
    for (const auto& p : mw->named_parameters()) {
      if (p.value().dim() < 2) EXPECT_EQ(p.value().scalar_type(), at::kFloat) << p.key() << " stays fp32";
    }
    // The whole model in bf16 (norms and the residual stream rounded too): the same 5% bound, float logits.
    auto mm = copy_of(ref, name, 3, 10);
    const at::Tensor bf16m = run(*mm, x, "im+fold+cl+bf16m");
    EXPECT_EQ(bf16m.scalar_type(), at::kFloat);
    EXPECT_LT(max_diff(bf16m, expected), 0.05 * scale) << name;
    std::cout << name << ": bf16m vs fp32 max diff " << max_diff(bf16m, expected) << "\n";
    for (const auto& p : mm->parameters()) EXPECT_EQ(p.scalar_type(), at::kBFloat16);
  }
}

TEST(Inference, ThreadCountKeepsTheLogits) {
  const int before = at::get_num_threads();
  auto m = model_with_random_bn("resnet20", 1, 10);
  const at::Tensor x = at::randn({8, 1, 28, 28});
  at::set_num_threads(1);
  const at::Tensor one = run(*m, x, "im");
  at::set_num_threads(std::max(2, before));
  const at::Tensor many = run(*m, x, "im");
  at::set_num_threads(before);
  EXPECT_LT(max_diff(one, many), 1e-4);
}
