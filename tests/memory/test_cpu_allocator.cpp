// CPU allocator wrapper: byte counting, budget enforcement, the raw (oneDNN) path, and a ResNet
// forward/backward that runs out of budget and leaves nothing allocated behind.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <torch/torch.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <iostream>
#include <thread>
#include <vector>

#include "keel/memory/cpu_allocator.h"
#include "keel/memory/oom.h"
#include "keel/models/registry.h"

namespace km = keel::memory;

namespace {

// Installs the wrapper and guarantees each test starts and ends without a budget.
class CpuAllocator : public ::testing::Test {
 protected:
  void SetUp() override {
    km::install_cpu_allocator();
    km::set_cpu_budget(std::nullopt);
  }
  void TearDown() override { km::set_cpu_budget(std::nullopt); }
};

// Converts every 4-D parameter and buffer of a module to channels_last in place.
void to_channels_last(torch::nn::Module& m) {
  torch::NoGradGuard ng;
  for (auto& p : m.parameters())
    if (p.dim() == 4) p.set_data(p.contiguous(at::MemoryFormat::ChannelsLast));
}

}  // namespace

TEST_F(CpuAllocator, InstallIsIdempotentAndReplacesTheCpuAllocator) {
  km::install_cpu_allocator();
  km::install_cpu_allocator();
  EXPECT_TRUE(km::cpu_allocator_installed());
  EXPECT_EQ(c10::GetCPUAllocator(), km::budget_allocator());
  EXPECT_NE(km::budget_allocator()->raw_deleter(), nullptr);
}

TEST_F(CpuAllocator, CountsCurrentPeakAndReturnsToBaseline) {
  const km::MemoryStats before = km::cpu_stats();
  km::reset_peak();
  EXPECT_EQ(km::cpu_stats().peak, before.current);
  {
    at::Tensor a = at::empty({1000}, at::kFloat);  // 4000 bytes
    EXPECT_EQ(km::cpu_stats().current, before.current + 4000);
    {
      at::Tensor b = at::empty({250, 4}, at::kDouble);  // 8000 bytes
      EXPECT_EQ(km::cpu_stats().current, before.current + 12000);
      EXPECT_EQ(km::cpu_stats().live_blocks, before.live_blocks + 2);
    }
    EXPECT_EQ(km::cpu_stats().current, before.current + 4000);
    EXPECT_EQ(km::cpu_stats().peak, before.current + 12000);
    // Data is usable and aligned as the default allocator aligns it (64 bytes).
    EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data_ptr()) % 64, 0u);
    a.fill_(2.0f);
    EXPECT_EQ(a.sum().item<float>(), 2000.0f);
  }
  const km::MemoryStats after = km::cpu_stats();
  EXPECT_EQ(after.current, before.current);
  EXPECT_EQ(after.live_blocks, before.live_blocks);
  EXPECT_GE(after.allocations, before.allocations + 2);
  EXPECT_GE(after.peak, before.current + 12000);
  km::reset_peak();
  EXPECT_EQ(km::cpu_stats().peak, after.current);
  // Empty tensors own no memory.
  at::Tensor e = at::empty({0}, at::kFloat);
  EXPECT_EQ(km::cpu_stats().current, after.current);
}

TEST_F(CpuAllocator, BudgetThrowsOutOfMemoryErrorWithRequestCurrentAndBudget) {
  const int64_t base = km::cpu_stats().current;
  const int64_t ooms = km::cpu_stats().ooms;
  km::set_cpu_budget(base + (1 << 20));
  EXPECT_EQ(km::cpu_stats().budget, base + (1 << 20));
  at::Tensor fits = at::empty({(1 << 20) / 8}, at::kFloat);  // half the budget
  try {
    at::Tensor over = at::empty({(1 << 20) / 4}, at::kFloat);  // 1 MiB more: over
    FAIL() << "expected c10::OutOfMemoryError";
  } catch (const c10::OutOfMemoryError& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_NE(msg.find("tried to allocate 1.00 MiB (1048576 bytes)"), std::string::npos) << msg;
    EXPECT_NE(msg.find(std::to_string(base + (1 << 19)) + " bytes) already allocated"), std::string::npos) << msg;
    EXPECT_NE(msg.find("budget of"), std::string::npos) << msg;
    EXPECT_NE(msg.find(std::to_string(base + (1 << 20)) + " bytes"), std::string::npos) << msg;
    EXPECT_TRUE(km::is_out_of_memory(e));
  }
  EXPECT_EQ(km::cpu_stats().ooms, ooms + 1);
  EXPECT_EQ(km::cpu_stats().current, base + (1 << 19));
  // Exactly up to the budget is allowed.
  at::Tensor rest = at::empty({(1 << 19)}, at::kByte);
  EXPECT_EQ(km::cpu_stats().current, base + (1 << 20));
  EXPECT_THROW(at::empty({1}, at::kByte), c10::OutOfMemoryError);
  km::set_cpu_budget(std::nullopt);
  EXPECT_EQ(km::cpu_stats().budget, -1);
  EXPECT_NO_THROW(at::empty({1 << 20}, at::kByte));
  EXPECT_THROW(km::set_cpu_budget(0), std::invalid_argument);
}

TEST_F(CpuAllocator, SystemAllocationFailureBecomesOutOfMemoryError) {
  const km::MemoryStats before = km::cpu_stats();
  // 4 PiB: more than the address space, so posix_memalign fails at once (no budget set).
  try {
    at::Tensor huge = at::empty({int64_t{1} << 52}, at::kByte);
    FAIL() << "expected c10::OutOfMemoryError";
  } catch (const c10::OutOfMemoryError& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_NE(msg.find("4503599627370496 bytes"), std::string::npos) << msg;
    EXPECT_NE(msg.find("no budget set"), std::string::npos) << msg;
  }
  EXPECT_EQ(km::cpu_stats().current, before.current);
  EXPECT_EQ(km::cpu_stats().peak, before.peak) << "a failed request must not count towards the peak";
  EXPECT_EQ(km::cpu_stats().ooms, before.ooms + 1);
}

TEST_F(CpuAllocator, RawPathKeepsDataEqualToContextAndCounts) {
  c10::Allocator* a = c10::GetCPUAllocator();
  const int64_t base = km::cpu_stats().current;
  void* p = a->raw_allocate(1000);  // asserts data == context inside
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u);
  EXPECT_EQ(km::cpu_stats().current, base + 1000);
  std::memset(p, 0xab, 1000);
  a->raw_deallocate(p);
  EXPECT_EQ(km::cpu_stats().current, base);
  EXPECT_EQ(a->raw_allocate(0), nullptr);
  a->raw_deallocate(nullptr);

  km::set_cpu_budget(base + 100);
  EXPECT_THROW(a->raw_allocate(1000), c10::OutOfMemoryError);
  EXPECT_EQ(km::cpu_stats().current, base);
}

TEST_F(CpuAllocator, RawBlockFromTheWrappedAllocatorIsHandedBack) {
  // A oneDNN buffer allocated before install and freed after it goes back to its own allocator.
  c10::Allocator* def = c10::GetDefaultCPUAllocator();
  ASSERT_NE(def, km::budget_allocator());
  const int64_t base = km::cpu_stats().current;
  void* p = def->raw_allocate(4096);
  km::budget_allocator()->raw_deallocate(p);
  EXPECT_EQ(km::cpu_stats().current, base);
}

TEST_F(CpuAllocator, OneDnnConvolutionRunsThroughTheWrapper) {
  ASSERT_TRUE(at::hasMKLDNN()) << "this LibTorch has no oneDNN: the raw-path check cannot run";
  at::manual_seed(0);
  at::Tensor x = at::randn({2, 8, 20, 20});
  at::Tensor w = at::randn({16, 8, 3, 3});
  at::Tensor b = at::randn({16});
  const at::Tensor ref = at::conv2d(x, w, b, 1, 1);
  const int64_t base = km::cpu_stats().current;
  {
    at::Tensor xl = x.contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor wl = w.contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor y1 = at::conv2d(xl, wl, b, 1, 1);  // channels_last float dispatches to oneDNN
    at::Tensor y2 = at::mkldnn_convolution(x, w, b, {1, 1}, {1, 1}, {1, 1}, 1);
    at::Tensor y3 = at::mkldnn_convolution(xl, wl, b, {1, 1}, {1, 1}, {1, 1}, 1);
    EXPECT_TRUE(at::allclose(y1, ref, 1e-4, 1e-4));
    EXPECT_TRUE(at::allclose(y2, ref, 1e-4, 1e-4));
    EXPECT_TRUE(at::allclose(y3, ref, 1e-4, 1e-4));
  }
  EXPECT_EQ(km::cpu_stats().current, base);
  // Under a budget too small for the output, oneDNN's allocation throws the OOM type.
  km::set_cpu_budget(base + 1024);
  EXPECT_THROW(at::mkldnn_convolution(x, w, b, {1, 1}, {1, 1}, {1, 1}, 1), c10::OutOfMemoryError);
  EXPECT_EQ(km::cpu_stats().current, base);
}

TEST_F(CpuAllocator, ConcurrentAllocationsNeverPassTheBudget) {
  constexpr int kThreads = 4, kRounds = 20, kHeld = 24;  // 4 x 24 blocks held at once > 64 allowed
  const int64_t base = km::cpu_stats().current;
  const int64_t budget = base + 64 * 4096;
  km::set_cpu_budget(budget);
  km::reset_peak();
  std::atomic<int64_t> refused{0};
  std::atomic<int> arrived{0};
  // Spin barrier: every thread holds its blocks at the same time before any releases them.
  auto barrier = [&](int generation) {
    arrived.fetch_add(1);
    while (arrived.load() < kThreads * generation) std::this_thread::yield();
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      int generation = 0;
      for (int r = 0; r < kRounds; ++r) {
        std::vector<at::Tensor> held;
        for (int i = 0; i < kHeld; ++i) {
          try {
            held.push_back(at::empty({4096}, at::kByte));
          } catch (const c10::OutOfMemoryError&) {
            refused.fetch_add(1);
          }
        }
        barrier(++generation);
        held.clear();
        barrier(++generation);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_LE(km::cpu_stats().peak, budget);
  // Each round, exactly the blocks beyond the budget are refused: 4 x 24 - 64 = 32.
  EXPECT_EQ(refused.load(), int64_t{kRounds} * (kThreads * kHeld - 64));
  EXPECT_EQ(km::cpu_stats().current, base);
}

// The acceptance behaviour: a ResNet forward (and backward) under a budget throws
// c10::OutOfMemoryError from wherever it runs out, oneDNN convolutions included, and once the
// exception is caught and the partial step's gradients are dropped, nothing is left allocated.
class ResNetUnderBudget : public CpuAllocator, public ::testing::WithParamInterface<bool> {};

TEST_P(ResNetUnderBudget, ThrowsOutOfMemoryAndLeaksNothing) {
  const bool channels_last = GetParam();
  at::manual_seed(0);
  auto model = keel::models::create({"resnet18", 3, 1000});
  model->train();
  if (channels_last) to_channels_last(*model);
  at::Tensor x = at::randn({4, 3, 96, 96});
  if (channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);

  // Drops the gradients a (partial) backward may have left, as OOM recovery does.
  auto drop_grads = [&] {
    for (auto& p : model->parameters()) p.mutable_grad().reset();
  };

  // Unlimited run: how much a forward + backward needs above the baseline.
  const int64_t base = km::cpu_stats().current;
  km::reset_peak();
  {
    at::Tensor loss = model->forward(x).logsumexp(1).mean();
    loss.backward();
  }
  drop_grads();
  const int64_t need = km::cpu_stats().peak - base;
  ASSERT_EQ(km::cpu_stats().current, base) << "an unbudgeted step leaked";
  ASSERT_GT(need, 4 << 20);

  // Budgets from far too small to almost enough: each run fails at a different allocation
  // (forward convolutions, batch norm, backward), and each must leave nothing behind.
  int failed_in_forward = 0, failed_in_backward = 0;
  for (double share : {0.02, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.97}) {
    const int64_t ooms = km::cpu_stats().ooms;
    km::set_cpu_budget(base + static_cast<int64_t>(share * need));
    bool forward_done = false;
    try {
      at::Tensor loss = model->forward(x).logsumexp(1).mean();
      forward_done = true;
      loss.backward();
      ADD_FAILURE() << "a step needing " << need << " bytes fit in " << share << " of it";
    } catch (const c10::OutOfMemoryError& e) {
      EXPECT_TRUE(km::is_out_of_memory(e));
      (forward_done ? failed_in_backward : failed_in_forward) += 1;
    }
    km::set_cpu_budget(std::nullopt);
    drop_grads();
    EXPECT_EQ(km::cpu_stats().current, base) << "leak after OOM at budget share " << share;
    EXPECT_GT(km::cpu_stats().ooms, ooms);
  }
  EXPECT_GT(failed_in_forward, 0);
  EXPECT_GT(failed_in_backward, 0);
  std::cout << "[ info ] need " << need << " bytes; OOM in forward " << failed_in_forward << ", in backward "
            << failed_in_backward << " of 8 budgets\n";

  // And the model still trains normally afterwards.
  {
    at::Tensor loss = model->forward(x).logsumexp(1).mean();
    loss.backward();
    EXPECT_TRUE(std::isfinite(loss.item<float>()));
  }
  drop_grads();
  EXPECT_EQ(km::cpu_stats().current, base);
}

INSTANTIATE_TEST_SUITE_P(MemoryFormats, ResNetUnderBudget, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& i) {
                           return i.param ? std::string("ChannelsLast") : std::string("Contiguous");
                         });
