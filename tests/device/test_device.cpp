// run.device resolution, the CPU side of the device interface, the autocast guard for both device
// types, and the CUDA paths (skipped, visibly, without a GPU; they run when one is lent).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <cstring>

#include "keel/compat/torch_compat.h"
#include "keel/config/config.h"
#include "keel/data/loader.h"
#include "keel/device/device.h"
#include "keel/memory/cpu_allocator.h"
#include "keel/models/registry.h"
#include "keel/train/optimizer.h"
#include "keel/train/step.h"
#include "keel/run/trainer.h"

using namespace keel;
using testing::HasSubstr;

namespace {
std::string error_of(const std::string& spec) {
  try {
    device::resolve(spec);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}
bool have_gpu() { return device::cuda_built() && device::cuda_device_count() > 0; }
}  // namespace

TEST(Device, ResolvesCpuAndAuto) {
  EXPECT_EQ(device::resolve("cpu"), at::Device(at::kCPU));
  const at::Device expected = have_gpu() ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
  EXPECT_EQ(device::resolve("auto"), expected);
}

TEST(Device, RejectsMalformedSpecsNamingTheKey) {
  for (const std::string bad : {"gpu", "cuda0", "cuda:", "cuda:x", "cuda:-1", "CPU", ""}) {
    const std::string msg = error_of(bad);
    EXPECT_THAT(msg, HasSubstr("run.device = \"" + bad + "\"")) << bad;
  }
}

TEST(Device, CudaWithoutAGpuSaysWhy) {
  if (have_gpu()) GTEST_SKIP() << "a GPU is present: the refusal cannot happen here";
  const std::string msg = error_of("cuda:0");
  EXPECT_THAT(msg, HasSubstr("run.device = \"cuda:0\""));
  if (device::cuda_built()) {
    EXPECT_THAT(msg, HasSubstr("0 CUDA device(s) usable here"));
  } else {
    EXPECT_THAT(msg, HasSubstr("built without CUDA"));
  }
}

TEST(Device, ConfigRejectsABadDeviceAndTheTrainerABadGpu) {
  EXPECT_THROW(config::load(KEEL_SOURCE_DIR "/configs/default.toml", {"run.device=tpu"}), config::ConfigError);
  const config::Config c = config::load(KEEL_SOURCE_DIR "/configs/default.toml", {"run.device=cuda:7"});
  try {
    run::make_model(c);
    if (device::cuda_device_count() < 8) ADD_FAILURE() << "expected a ConfigError for cuda:7";
  } catch (const config::ConfigError& e) {
    EXPECT_THAT(std::string(e.what()), HasSubstr("run.device = \"cuda:7\""));
  }
}

TEST(Device, CpuUploaderPassesTheBatchThrough) {
  device::Uploader up(at::Device(at::kCPU));
  at::Tensor t = at::arange(12, at::kByte).view({1, 1, 3, 4});
  at::Tensor u = up.upload(t);
  EXPECT_EQ(u.data_ptr(), t.data_ptr()) << "CPU training must not copy the batch";
  EXPECT_FALSE(u.is_pinned());
}

TEST(Device, CpuMemoryStatsAreTheCountingAllocators) {
  memory::install_cpu_allocator();
  device::reset_peak(at::Device(at::kCPU));
  const auto before = device::memory_stats(at::Device(at::kCPU));
  at::Tensor big = at::empty({1 << 20}, at::kFloat);  // 4 MiB
  const auto during = device::memory_stats(at::Device(at::kCPU));
  EXPECT_GE(during.current - before.current, 4 << 20);
  EXPECT_GE(during.peak, during.current);
  EXPECT_EQ(during.current, memory::cpu_stats().current);
}

TEST(Device, ModuleDeviceIsItsParameters) {
  auto m = models::create({"resnet20", 1, 10});
  EXPECT_EQ(device::of(*m), at::Device(at::kCPU));
  torch::nn::Sequential empty;
  EXPECT_EQ(device::of(*empty), at::Device(at::kCPU));
}

TEST(Autocast, GuardSetsAndRestoresPerDeviceType) {
  // The CUDA flags can be set without a GPU: this checks the compat setters of both LibTorch versions.
  for (const at::DeviceType d : {at::kCPU, at::kCUDA}) {
    const at::ScalarType dtype = d == at::kCPU ? at::kBFloat16 : at::kHalf;
    {
      compat::AutocastGuard g(d, true, dtype);
#if KEEL_TORCH_AT_LEAST(2, 4)
      EXPECT_TRUE(at::autocast::is_autocast_enabled(d));
      EXPECT_EQ(at::autocast::get_autocast_dtype(d), dtype);
#else
      EXPECT_TRUE(d == at::kCPU ? at::autocast::is_cpu_enabled() : at::autocast::is_enabled());
      EXPECT_EQ(d == at::kCPU ? at::autocast::get_autocast_cpu_dtype() : at::autocast::get_autocast_gpu_dtype(), dtype);
#endif
    }
#if KEEL_TORCH_AT_LEAST(2, 4)
    EXPECT_FALSE(at::autocast::is_autocast_enabled(d));
#else
    EXPECT_FALSE(d == at::kCPU ? at::autocast::is_cpu_enabled() : at::autocast::is_enabled());
#endif
  }
}

TEST(Autocast, Fp16OnCpuIsRefusedWithTheReason) {
  auto m = models::create({"resnet20", 1, 10});
  try {
    train::forward_logits(*m, at::randn({2, 1, 28, 28}), train::Precision::kFp16);
    ADD_FAILURE() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what_without_backtrace(), HasSubstr("needs a CUDA device"));
  }
}

// ---- CUDA (run when a GPU is lent; skipped with the reason otherwise)

#define REQUIRE_GPU()                                                                                   \
  if (!have_gpu())                                                                                      \
  GTEST_SKIP() << (device::cuda_built() ? "no CUDA device on this machine"                             \
                                        : "keel built without CUDA (KEEL_CUDA=OFF: a CPU-only LibTorch)")

TEST(Cuda, UploadIsExactAndOrderedWithCompute) {
  REQUIRE_GPU();
  const at::Device gpu(at::kCUDA, 0);
  device::Uploader up(gpu);
  at::Tensor host = at::randint(0, 256, {64, 3, 32, 32}, at::kByte);
  at::Tensor sum = at::zeros({}, at::TensorOptions(at::kLong).device(gpu));
  int64_t expected = 0;
  for (int i = 0; i < 20; ++i) {
    host.add_(1);  // the host buffer is reused at once, as the loader's pool does
    expected += host.sum().item<int64_t>();
    at::Tensor d = up.upload(host);
    ASSERT_TRUE(d.is_cuda());
    sum += d.sum();  // on the compute stream: must see the finished copy
  }
  EXPECT_EQ(sum.item<int64_t>(), expected);
}

// Queues about 20-40 ms of copying on the uploader's side stream (1 GiB host -> device), so that a copy
// queued after it is still waiting while the host goes on: a buffer overwritten then would be caught.
at::Tensor keep_copy_stream_busy(device::Uploader& up) { return up.upload(at::ones({int64_t{1} << 30}, at::kByte)); }

// Pinned memory the caller owns (not a loader buffer), overwritten right after upload() returns.
TEST(Cuda, PinnedTensorOverwrittenAtOnceAfterUploadKeepsItsData) {
  REQUIRE_GPU();
  const at::Device gpu(at::kCUDA, 0);
  device::Uploader up(gpu);
  at::Tensor pinned = at::full({8, 3, 256, 256}, 7, at::TensorOptions(at::kByte).pinned_memory(true));
  ASSERT_TRUE(pinned.is_pinned());
  const at::Tensor busy = keep_copy_stream_busy(up);
  at::Tensor d = up.upload(pinned);
  pinned.fill_(9);  // reused at once
  EXPECT_TRUE(d.eq(7).all().item<bool>()) << "the upload carried the overwritten values, not the uploaded ones";
  EXPECT_EQ(busy.sum().item<int64_t>(), int64_t{1} << 30);
}

// Every sample a constant: its index + 1 (mod 256), so a batch's data shows which samples it holds.
class ConstantImages : public data::Dataset {
 public:
  size_t size() const override { return 64; }
  data::ImageShape shape() const override { return {3, 512, 512}; }
  int64_t num_classes() const override { return 10; }
  int64_t label(size_t i) const override { return static_cast<int64_t>(i % 10); }
  void read_image(size_t i, uint8_t* dst) const override {
    std::memset(dst, static_cast<int>((i + 1) % 256), static_cast<size_t>(shape().numel()));
  }
  std::string describe(size_t i) const override { return "constant[" + std::to_string(i) + "]"; }
};

// The loader's pinned batch buffers, released right after the upload as evaluate() does, so the pool
// refills the same buffer at once (no training step's host sync in between).
TEST(Cuda, PinnedLoaderBufferReusedAtOnceKeepsEachUploadsData) {
  REQUIRE_GPU();
  const at::Device gpu(at::kCUDA, 0);
  auto ds = std::make_shared<ConstantImages>();
  data::SamplerOptions in_order;
  in_order.shuffle = false;
  data::Loader loader(ds, data::LoaderOptions().batch_size(8).workers(0).sampler(in_order).pin_memory(true));
  device::Uploader up(gpu);
  const at::Tensor busy = keep_copy_stream_busy(up);
  loader.start_epoch(0);
  std::vector<at::Tensor> images, labels;
  std::vector<const void*> buffers;
  while (auto b = loader.next()) {
    ASSERT_TRUE(b->images.is_pinned());
    buffers.push_back(b->images.data_ptr());
    images.push_back(up.upload(b->images));
    labels.push_back(up.upload(b->labels));
  }  // b released here: the next next() refills its buffer
  ASSERT_EQ(images.size(), 8u);
  EXPECT_EQ(buffers[1], buffers[0]) << "the test needs the pool to reuse the buffer at once";
  for (size_t k = 0; k < images.size(); ++k) {
    at::Tensor expected = (at::arange(8, at::TensorOptions(at::kLong).device(gpu)) + int64_t(8 * k + 1)).remainder(256);
    at::Tensor per_sample = images[k].view({8, -1});
    EXPECT_TRUE(per_sample.eq(expected.to(at::kByte).view({8, 1})).all().item<bool>())
        << "batch " << k << " holds another batch's pixels: its buffer was refilled during the copy";
    EXPECT_TRUE(labels[k].eq((at::arange(8, at::TensorOptions(at::kLong).device(gpu)) + int64_t(8 * k)).remainder(10))
                    .all().item<bool>()) << "batch " << k << " labels";
  }
  EXPECT_EQ(busy.sum().item<int64_t>(), int64_t{1} << 30);
}

TEST(Cuda, MemoryStatsFollowTheCachingAllocator) {
  REQUIRE_GPU();
  const at::Device gpu(at::kCUDA, 0);
  device::reset_peak(gpu);
  const auto before = device::memory_stats(gpu);
  {
    at::Tensor t = at::empty({64 << 20}, at::TensorOptions(at::kByte).device(gpu));
    const auto during = device::memory_stats(gpu);
    EXPECT_GE(during.current - before.current, 64 << 20);
    EXPECT_GE(during.reserved, during.current);
    EXPECT_GT(during.budget, during.reserved);
  }
  const auto after = device::memory_stats(gpu);
  EXPECT_EQ(after.current, before.current);
  EXPECT_GE(after.peak, before.current + (64 << 20));
}

TEST(Cuda, Fp16StepWithLossScalerTrains) {
  REQUIRE_GPU();
  torch::manual_seed(0);
  auto m = models::create({"resnet20", 1, 10});
  m->to(at::Device(at::kCUDA, 0));
  train::OptimizerOptions oo;
  oo.lr = 0.05;
  auto opt = train::make_optimizer(*m, oo);
  train::StepOptions so;
  so.precision = train::Precision::kFp16;
  so.scaler.enabled = true;
  train::StepRunner r(*m, *opt, so, [](int64_t) { return 0.05; });
  const auto cuda = at::TensorOptions().device(at::kCUDA, 0);
  at::Tensor x = at::randn({32, 1, 28, 28}, cuda), y = at::randint(0, 10, {32}, cuda.dtype(at::kLong));
  double first = 0, last = 0;
  for (int i = 0; i < 30; ++i) {
    auto res = r.run(x, y);
    if (i == 0) first = res.loss.item<double>();
    last = res.loss.item<double>();
  }
  EXPECT_LT(last, 0.5 * first) << "fp16 + scaler must fit one fixed batch";
}
