// Tests for DeviceAugment's fused CPU path: same values as the ATen formulation, buffer reuse only
// when the previous result is no longer referenced.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>

#include "keel/data/augment.h"

namespace keel::data {
namespace {

TEST(DeviceAugment, CpuFlipNormalizeEqualsTheTensorFormula) {
  AugmentOptions o;
  o.mean = {0.485, 0.456, 0.406};
  o.std = {0.229, 0.224, 0.225};
  o.random_flip = true;
  at::manual_seed(0);
  const at::Tensor img = at::randint(0, 256, {9, 3, 5, 7}, at::kLong).to(at::kByte);
  DeviceAugment aug(o, 11);
  const at::Tensor out = aug.train(img);
  // The same flip draws as the augmentation's generator makes: rand(N) < 0.5.
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(11);
  const at::Tensor flip = at::rand({9}, g, at::TensorOptions().dtype(at::kFloat)).lt(0.5);
  ASSERT_GT(flip.sum().item<int64_t>(), 0);
  ASSERT_LT(flip.sum().item<int64_t>(), 9) << "both branches exercised";
  const at::Tensor geo = at::where(flip.view({9, 1, 1, 1}), img.flip({3}), img).to(at::kFloat);
  const at::Tensor mean = at::tensor(std::vector<float>{0.485f, 0.456f, 0.406f}).view({1, 3, 1, 1});
  const at::Tensor sd = at::tensor(std::vector<float>{0.229f, 0.224f, 0.225f}).view({1, 3, 1, 1});
  const at::Tensor expected = (geo / 255.0 - mean) / sd;
  ASSERT_EQ(out.sizes(), img.sizes());
  EXPECT_TRUE(at::allclose(out, expected, 1e-5, 1e-5)) << (out - expected).abs().max().item<float>();
  EXPECT_TRUE(at::allclose(aug.eval(img), (img.to(at::kFloat) / 255.0 - mean) / sd, 1e-5, 1e-5));
}

TEST(DeviceAugment, ReusesItsOutputOnlyWhenReleased) {
  AugmentOptions o;
  DeviceAugment aug(o, 1);
  const at::Tensor a = at::full({2, 1, 4, 4}, 10, at::kByte), b = at::full({2, 1, 4, 4}, 20, at::kByte);
  at::Tensor first = aug.eval(a);
  const void* ptr = first.data_ptr();
  at::Tensor view = first.view({-1});
  first.reset();
  at::Tensor second = aug.eval(b);  // a view of the first result is alive: a new buffer
  EXPECT_NE(second.data_ptr(), ptr);
  EXPECT_FLOAT_EQ(view[0].item<float>(), 10.0f / 255.0f) << "the held result was not overwritten";
  const void* ptr2 = second.data_ptr();
  second.reset();
  at::Tensor third = aug.eval(a);  // nothing else holds the buffer: reused
  EXPECT_EQ(third.data_ptr(), ptr2);
  EXPECT_FLOAT_EQ(third[0][0][0][0].item<float>(), 10.0f / 255.0f);
}

}  // namespace
}  // namespace keel::data
