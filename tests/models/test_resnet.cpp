// ResNet shapes, parameter counts (torchvision's) and names.
#include <gtest/gtest.h>

#include <torch/torch.h>

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
