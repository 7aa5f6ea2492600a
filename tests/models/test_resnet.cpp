// ResNet shapes, parameter counts (torchvision's) and names.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <optional>

#include "keel/compat/torch_compat.h"
#include "keel/memory/cpu_allocator.h"
#include "keel/models/registry.h"

namespace {
int64_t count_params(keel::models::Net& m) {
  int64_t n = 0;
  for (auto& p : m.parameters()) n += p.numel();
  return n;
}
}  // namespace

TEST(ResNet, ParameterCountsMatchTorchvision) {
  // torchvision.models.resnetXX(num_classes=1000): sum(p.numel() for p in m.parameters())
  EXPECT_EQ(count_params(*keel::models::create({"resnet18", 3, 1000})), 11689512);
  EXPECT_EQ(count_params(*keel::models::create({"resnet50", 3, 1000})), 25557032);
  EXPECT_EQ(count_params(*keel::models::create({"resnet101", 3, 1000})), 44549160);
}

TEST(ResNet, CifarFamilyShapesAndSettableIo) {
  for (const char* name : {"resnet20", "resnet32", "resnet56"}) {
    auto m = keel::models::create({name, 1, 7});
    m->eval();
    torch::NoGradGuard ng;
    at::Tensor y = m->forward(at::randn({2, 1, 28, 28}));
    EXPECT_EQ(y.sizes(), (at::IntArrayRef{2, 7})) << name;
  }
  auto m = keel::models::create({"resnet18", 4, 5});
  m->eval();
  torch::NoGradGuard ng;
  EXPECT_EQ(m->forward(at::randn({1, 4, 64, 64})).sizes(), (at::IntArrayRef{1, 5}));
}

TEST(ResNet, TorchvisionParameterNames) {
  auto m = keel::models::create({"resnet50", 3, 1000});
  auto params = m->named_parameters();
  auto buffers = m->named_buffers();
  for (const char* k : {"conv1.weight", "bn1.weight", "layer1.0.conv3.weight", "layer1.0.downsample.0.weight",
                        "layer4.2.bn3.bias", "fc.weight", "fc.bias"}) {
    EXPECT_TRUE(params.contains(k)) << k;
  }
  EXPECT_TRUE(buffers.contains("layer3.5.bn2.running_var"));
  EXPECT_TRUE(buffers.contains("bn1.num_batches_tracked"));
}

TEST(ResNet, MacsOfResNet50At224) {
  // torchvision resnet50: 4.09 GMACs at 224x224 (convs + fc).
  auto m = keel::models::create({"resnet50", 3, 1000});
  EXPECT_NEAR(m->macs_per_image(224, 224) / 1e9, 4.09, 0.03);
}

TEST(ResNet, UnknownNameListsKnownModels) {
  try {
    keel::models::create({"resnet19", 3, 10});
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("resnet20"), std::string::npos) << e.what();
  }
}

TEST(ResNet, CheckpointedStagesGiveTheSameGradientsAndStatisticsWithLessMemory) {
  namespace mem = keel::memory;
  mem::install_cpu_allocator();
  mem::set_cpu_budget(std::nullopt);
  // Activations dominate (a CIFAR ResNet has few parameters), so the saving is visible in the peak.
  at::Tensor x = at::randn({32, 3, 32, 32}), y = at::randint(0, 10, {32}, at::kLong);
  struct Out {
    std::vector<at::Tensor> grads, buffers;
    int64_t peak = 0;
  };
  auto run = [&](bool ckpt, bool bf16) {
    torch::manual_seed(5);
    auto m = keel::models::create({"resnet56", 3, 10, ckpt});
    m->train();
    const int64_t base = mem::cpu_stats().current;
    mem::reset_peak();
    at::Tensor logits;
    {
      std::optional<keel::compat::AutocastGuard> ac;
      if (bf16) ac.emplace(at::kCPU, true, at::kBFloat16);
      logits = m->forward(x).to(at::kFloat);
    }
    at::cross_entropy_loss(logits, y).backward();
    Out o;
    o.peak = mem::cpu_stats().peak - base;
    for (auto& p : m->parameters()) o.grads.push_back(p.grad().clone());
    for (auto& b : m->buffers()) o.buffers.push_back(b.clone());
    return o;
  };
  for (bool bf16 : {false, true}) {
    const Out plain = run(false, bf16), ck = run(true, bf16);
    ASSERT_EQ(plain.grads.size(), ck.grads.size());
    const double tol = bf16 ? 1e-2 : 1e-5;
    for (size_t i = 0; i < plain.grads.size(); ++i) {
      EXPECT_LT((plain.grads[i] - ck.grads[i]).abs().max().item<double>(), tol * (1 + plain.grads[i].abs().max().item<double>()))
          << "gradient " << i << (bf16 ? " (bf16)" : "");
    }
    for (size_t i = 0; i < plain.buffers.size(); ++i) {
      EXPECT_TRUE(at::allclose(plain.buffers[i], ck.buffers[i], 1e-5, 1e-6))
          << "BatchNorm statistics " << i << " are updated once, not again by the recomputation";
    }
    EXPECT_LT(ck.peak, 0.75 * plain.peak) << "peak " << ck.peak << " vs " << plain.peak << (bf16 ? " (bf16)" : "");
    std::cout << (bf16 ? "bf16" : "fp32") << " peak plain " << plain.peak << " checkpointed " << ck.peak << "\n";
  }
}
