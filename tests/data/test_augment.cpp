// Tests for DeviceAugment: the fused CPU path equals the ATen formulation, buffer reuse only when the
// previous result is no longer referenced; batched resized crop vs torchvision's golden values,
// RandomResizedCrop boxes, Mixup/CutMix numerics and soft targets, determinism per seed.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

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

// torchvision's resized_crop on the same float images and boxes (scripts/golden_augment.py).
TEST(DeviceAugment, ResizedCropMatchesTorchvision) {
  const auto path = std::filesystem::path(KEEL_SOURCE_DIR) / "tests/data/fixtures/augment/rrc.bin";
  std::ifstream in(path, std::ios::binary);
  ASSERT_TRUE(in) << path << " missing: run /usr/bin/python3 scripts/golden_augment.py";
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  int64_t head[5];
  std::memcpy(head, bytes.data(), sizeof head);
  const int64_t n = head[0], c = head[1], h = head[2], w = head[3], out = head[4];
  std::vector<int64_t> box(4 * n);
  std::memcpy(box.data(), bytes.data() + sizeof head, box.size() * 8);
  size_t off = sizeof head + box.size() * 8;
  const at::Tensor images = at::from_blob(const_cast<char*>(bytes.data() + off), {n, c, h, w}, at::kByte).clone();
  off += images.numel();
  // The input is the formula the script used, not just whatever the file holds.
  const at::Tensor nn = at::arange(n).view({n, 1, 1, 1}), cc = at::arange(c).view({1, c, 1, 1}),
                   yy = at::arange(h).view({1, 1, h, 1}), xx = at::arange(w).view({1, 1, 1, w});
  ASSERT_TRUE(at::equal(images, ((nn * 37 + cc * 101 + yy * 13 + xx * 7 + (xx * yy) % 11) % 256).to(at::kByte)));
  const at::Tensor b = at::tensor(box).view({n, 4});
  const CropBoxes boxes{b.select(1, 0).contiguous(), b.select(1, 1).contiguous(), b.select(1, 2).contiguous(),
                        b.select(1, 3).contiguous()};
  for (bool antialias : {true, false}) {
    const at::Tensor expected =
        at::from_blob(const_cast<char*>(bytes.data() + off), {n, c, out, out}, at::kFloat).clone();
    off += expected.numel() * 4;
    const at::Tensor got = resized_crop(images.to(at::kFloat), boxes, out, out, antialias);
    ASSERT_EQ(got.sizes(), expected.sizes());
    const float err = (got - expected).abs().max().item<float>();
    // Float32 filtering in both; only the summation order differs.
    EXPECT_LT(err, 2e-3) << "antialias " << antialias;
    std::printf("  resized_crop vs torchvision (antialias %d): max abs diff %.2e (0-255 scale)\n", antialias, err);
  }
  EXPECT_EQ(off, bytes.size());
}

TEST(DeviceAugment, RandomResizedCropBoxesFollowTorchvisionsRule) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(3);
  const CropBoxes b = random_resized_crop_boxes(2000, 30, 40, {0.08, 1.0}, {3.0 / 4.0, 4.0 / 3.0}, g);
  const auto top = b.top.accessor<int64_t, 1>(), left = b.left.accessor<int64_t, 1>(),
             hh = b.height.accessor<int64_t, 1>(), ww = b.width.accessor<int64_t, 1>();
  int fallback = 0;
  for (int64_t i = 0; i < 2000; ++i) {
    ASSERT_GE(top[i], 0);
    ASSERT_GE(left[i], 0);
    ASSERT_LE(top[i] + hh[i], 30);
    ASSERT_LE(left[i] + ww[i], 40);
    ASSERT_GE(hh[i], 1);
    ASSERT_GE(ww[i], 1);
    const double frac = static_cast<double>(hh[i] * ww[i]) / (30 * 40);
    // Rounding of the sides moves area and aspect a little off the drawn values.
    EXPECT_GE(frac, 0.08 * 0.7) << i;
    EXPECT_LE(static_cast<double>(ww[i]) / hh[i], 4.0 / 3.0 * 1.35) << i;
    EXPECT_GE(static_cast<double>(ww[i]) / hh[i], 0.75 / 1.35) << i;
    fallback += hh[i] == 30 && ww[i] == 40;
  }
  EXPECT_LT(fallback, 100);
  // Same seed, same boxes; another seed, others.
  at::Generator g1 = at::make_generator<at::CPUGeneratorImpl>(3), g2 = at::make_generator<at::CPUGeneratorImpl>(4);
  const CropBoxes again = random_resized_crop_boxes(2000, 30, 40, {0.08, 1.0}, {3.0 / 4.0, 4.0 / 3.0}, g1);
  const CropBoxes other = random_resized_crop_boxes(2000, 30, 40, {0.08, 1.0}, {3.0 / 4.0, 4.0 / 3.0}, g2);
  EXPECT_TRUE(at::equal(again.top, b.top) && at::equal(again.width, b.width));
  EXPECT_FALSE(at::equal(other.top, b.top) && at::equal(other.width, b.width));
  // No box of half the area fits a 10 x 1000 strip with ratio 1: torchvision's centred fallback.
  const CropBoxes f = random_resized_crop_boxes(3, 10, 1000, {0.5, 1.0}, {1.0, 1.0}, g);
  for (int64_t i = 0; i < 3; ++i) {
    EXPECT_EQ(f.height[i].item<int64_t>(), 10);
    EXPECT_EQ(f.width[i].item<int64_t>(), 10);
    EXPECT_EQ(f.left[i].item<int64_t>(), 495);
    EXPECT_EQ(f.top[i].item<int64_t>(), 0);
  }
}

TEST(DeviceAugment, RandomResizedCropIsBatchedAndSeeded) {
  AugmentOptions o;
  o.random_resized_crop = true;
  o.random_flip = true;
  at::manual_seed(1);
  const at::Tensor img = at::randint(0, 256, {16, 3, 32, 32}, at::kLong).to(at::kByte);
  DeviceAugment a(o, 5), b(o, 5), c(o, 6);
  const at::Tensor xa = a.train(img).clone(), xb = b.train(img).clone(), xc = c.train(img).clone();
  ASSERT_EQ(xa.sizes(), img.sizes());
  EXPECT_TRUE(at::equal(xa, xb)) << "same seed, same crops";
  EXPECT_FALSE(at::equal(xa, xc)) << "another seed, other crops";
  EXPECT_FALSE(at::equal(xa, a.train(img))) << "the next batch draws new boxes";
  // Values stay within the input's range (a convex combination of pixels), on the [0, 1] scale.
  EXPECT_GE(xa.min().item<float>(), -1e-5);
  EXPECT_LE(xa.max().item<float>(), 1 + 1e-5);
}

TEST(DeviceAugment, MixupAndCutmixNumerics) {
  at::manual_seed(2);
  const at::Tensor x = at::randn({4, 2, 5, 6});
  const at::Tensor labels = at::tensor(std::vector<int64_t>{0, 2, 2, 1});
  const double lam = 0.3;
  const at::Tensor m = mixup(x, lam);
  for (int64_t i = 0; i < 4; ++i) {
    const at::Tensor expected = x[i] * lam + x[(i + 3) % 4] * (1 - lam);  // roll by one: sample i-1
    EXPECT_TRUE(at::allclose(m[i], expected, 1e-6, 1e-6)) << i;
  }
  const at::Tensor t = mixed_targets(labels, 3, lam);
  ASSERT_EQ(t.sizes(), (std::vector<int64_t>{4, 3}));
  EXPECT_TRUE(at::allclose(t.sum(1), at::ones({4}))) << "soft targets sum to 1";
  // Sample 0 mixes itself (class 0) with sample 3 (class 1); sample 2 (class 2) with sample 1 (class 2).
  EXPECT_FLOAT_EQ(t[0][0].item<float>(), 0.3f);
  EXPECT_FLOAT_EQ(t[0][1].item<float>(), 0.7f);
  EXPECT_FLOAT_EQ(t[2][2].item<float>(), 1.0f);
  const at::Tensor cm = cutmix(x, 1, 4, 2, 6);
  for (int64_t i = 0; i < 4; ++i) {
    for (int64_t yy = 0; yy < 5; ++yy) {
      for (int64_t xx = 0; xx < 6; ++xx) {
        const bool inside = yy >= 1 && yy < 4 && xx >= 2 && xx < 6;
        const at::Tensor src = inside ? x[(i + 3) % 4] : x[i];
        ASSERT_TRUE(at::equal(cm[i].select(1, yy).select(1, xx), src.select(1, yy).select(1, xx)))
            << i << " " << yy << " " << xx;
      }
    }
  }
}

TEST(DeviceAugment, MixProducesSoftTargetsMatchingThePixels) {
  AugmentOptions o;
  o.mixup_alpha = 0.4;
  o.cutmix_alpha = 1.0;
  o.num_classes = 10;
  at::manual_seed(3);
  const at::Tensor img = at::randint(0, 256, {8, 3, 16, 16}, at::kLong).to(at::kByte);
  const at::Tensor labels = at::arange(8, at::kLong);  // all distinct: each row names both partners
  DeviceAugment a(o, 9), b(o, 9);
  int cut = 0, mixed = 0;
  for (int step = 0; step < 40; ++step) {
    at::Tensor x = a.train(img).clone();
    const at::Tensor plain = x.clone();
    at::Tensor xb = b.train(img).clone();
    const at::Tensor t = a.mix(x, labels), tb = b.mix(xb, labels);
    ASSERT_TRUE(at::equal(x, xb) && at::equal(t, tb)) << "same seed, same mixing (step " << step << ")";
    ASSERT_EQ(t.dim(), 2);
    ASSERT_TRUE(at::allclose(t.sum(1), at::ones({8}), 1e-6, 1e-6));
    const double lam = t[0][0].item<double>();  // sample 0's own class weight
    EXPECT_NEAR(t[0][7].item<double>(), 1 - lam, 1e-6) << "its partner is sample 7 (roll by one)";
    const at::Tensor rolled = plain.roll(1, 0);
    // Where the pixel changed in any sample or channel (a position of the pasted box).
    const at::Tensor changed = (x != plain).any(1).any(0);  // (H, W)
    const at::Tensor outside = changed.logical_not();
    const bool pasted = at::equal(x.masked_select(changed), rolled.masked_select(changed.expand_as(x))) &&
                        at::equal(x.masked_select(outside.expand_as(x)), plain.masked_select(outside.expand_as(x)));
    if (pasted && changed.any().item<bool>()) {
      // CutMix: inside the box the partner's pixels, outside its own; the box's share is 1 - lam.
      ++cut;
      EXPECT_NEAR(changed.to(at::kDouble).mean().item<double>(), 1 - lam, 1e-6) << "step " << step;
    } else {
      ++mixed;
      EXPECT_TRUE(at::allclose(x, plain * lam + rolled * (1 - lam), 1e-5, 1e-5)) << "step " << step;
    }
  }
  EXPECT_GT(cut, 5);
  EXPECT_GT(mixed, 5);
  // mix_prob = 0: labels pass through untouched; mixing off: likewise.
  o.mix_prob = 0;
  DeviceAugment never(o, 1);
  at::Tensor x = never.train(img);
  const at::Tensor before = x.clone();
  EXPECT_TRUE(never.mix(x, labels).equal(labels));
  EXPECT_TRUE(at::equal(x, before));
}

TEST(DeviceAugment, SoftTargetCrossEntropyEqualsIndexTargetsForOneHot) {
  // The training step passes mixed targets straight to cross_entropy_loss as class probabilities:
  // one-hot probabilities must give the class-index loss, label smoothing included.
  at::manual_seed(4);
  const at::Tensor logits = at::randn({6, 5});
  const at::Tensor labels = at::tensor(std::vector<int64_t>{0, 4, 2, 2, 1, 3});
  const at::Tensor soft = mixed_targets(labels, 5, 1.0);
  for (double ls : {0.0, 0.1}) {
    const at::Tensor a = at::cross_entropy_loss(logits, labels, {}, at::Reduction::Mean, -100, ls);
    const at::Tensor b = at::cross_entropy_loss(logits, soft, {}, at::Reduction::Mean, -100, ls);
    EXPECT_NEAR(a.item<double>(), b.item<double>(), 1e-6) << "label_smoothing " << ls;
  }
  // A 0.3/0.7 mix is the same mix of the two losses.
  const at::Tensor mixed = mixed_targets(labels, 5, 0.3);
  const at::Tensor per = -(logits.log_softmax(1) * mixed).sum(1).mean();
  EXPECT_NEAR(at::cross_entropy_loss(logits, mixed).item<double>(), per.item<double>(), 1e-6);
}

}  // namespace
}  // namespace keel::data
