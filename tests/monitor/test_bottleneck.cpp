// Bottleneck rules on recorded measurements: input-, compute- and memory-bound runs get the right
// advice, a balanced run gets none, and every rule is documented.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>

#include "keel/monitor/bottleneck.h"
#include "monitor_test_util.h"

using namespace keel::monitor;
using testing::HasSubstr;

namespace {

constexpr int64_t kGiB = int64_t{1} << 30;

// Shares in the order data_wait, h2d, forward, backward, optimizer, other.
Measurements shares(double data, double h2d, double fwd, double bwd, double opt, double other) {
  Measurements m;
  m.share = {data, h2d, fwd, bwd, opt, other};
  m.channels_last = true;
  return m;
}

std::vector<std::string> rules(const std::vector<Advice>& a) {
  std::vector<std::string> r;
  for (const auto& x : a) r.push_back(x.rule);
  return r;
}

const Advice* find(const std::vector<Advice>& a, const std::string& rule) {
  for (const auto& x : a)
    if (x.rule == rule) return &x;
  return nullptr;
}

}  // namespace

// Recorded from an input-bound run: two loader workers decoding JPEGs could not keep up.
TEST(Bottleneck, InputBoundWithBusyWorkers) {
  Measurements m = shares(0.38, 0.0, 0.22, 0.31, 0.06, 0.03);
  m.data_workers = 2;
  m.workers_all_busy = true;
  auto a = diagnose(m);
  ASSERT_EQ(rules(a), std::vector<std::string>{"input-bound"});
  EXPECT_EQ(a[0].text,
            "input-bound: 38% of step time waiting for data; workers=2 are all busy; raise data.workers "
            "(cores permitting) or move resize/augmentation to the device");
}

TEST(Bottleneck, InputBoundWithIdleWorkersPointsAtPrefetch) {
  Measurements m = shares(0.25, 0.0, 0.3, 0.35, 0.06, 0.04);
  m.data_workers = 4;
  m.workers_all_busy = false;
  auto a = diagnose(m);
  ASSERT_EQ(rules(a), std::vector<std::string>{"input-bound"});
  EXPECT_THAT(a[0].text, HasSubstr("25% of step time waiting for data; workers=4 are not all busy"));
  EXPECT_THAT(a[0].text, HasSubstr("data.prefetch"));
}

TEST(Bottleneck, InputBoundWithoutWorkers) {
  Measurements m = shares(0.5, 0.0, 0.2, 0.25, 0.03, 0.02);
  m.data_workers = 0;
  auto a = diagnose(m);
  ASSERT_EQ(rules(a), std::vector<std::string>{"input-bound"});
  EXPECT_THAT(a[0].text, HasSubstr("workers=0 loads on the training thread; set data.workers >= 1"));
}

TEST(Bottleneck, InputBoundWithUnknownWorkerBusyness) {
  Measurements m = shares(0.3, 0.0, 0.3, 0.3, 0.05, 0.05);
  m.data_workers = 1;
  auto a = diagnose(m);
  ASSERT_EQ(rules(a), std::vector<std::string>{"input-bound"});
  EXPECT_THAT(a[0].text, HasSubstr("workers=1 may all be busy; raise data.workers"));
}

// Recorded from a compute-bound fp32 run on a CPU with AVX512-BF16.
TEST(Bottleneck, ComputeBoundSuggestsBf16WhenTheCpuSupportsIt) {
  Measurements m = shares(0.01, 0.0, 0.33, 0.55, 0.07, 0.04);
  m.data_workers = 1;
  m.utilisation = 0.61;
  m.cpu_supports_bf16 = true;
  auto a = diagnose(m);
  ASSERT_EQ(rules(a), std::vector<std::string>{"compute-bound"});
  EXPECT_EQ(a[0].text, "compute-bound at 61% of peak; bf16 would help: this CPU supports it (train.precision=bf16)");
}

TEST(Bottleneck, ComputeBoundWithoutUtilisationStatesTheShare) {
  Measurements m = shares(0.01, 0.0, 0.33, 0.55, 0.07, 0.04);
  m.cpu_supports_bf16 = true;
  auto a = diagnose(m);
  ASSERT_EQ(rules(a), std::vector<std::string>{"compute-bound"});
  EXPECT_THAT(a[0].text, HasSubstr("compute-bound (88% of step time in forward/backward); bf16 would help"));
}

TEST(Bottleneck, ComputeBoundOnCudaSuggestsBf16) {
  Measurements m = shares(0.01, 0.05, 0.33, 0.5, 0.07, 0.04);
  m.on_cuda = true;
  auto a = diagnose(m);
  ASSERT_EQ(rules(a), std::vector<std::string>{"compute-bound"});
  EXPECT_THAT(a[0].text, HasSubstr("tensor cores"));
}

TEST(Bottleneck, ComputeBoundConvModelWithoutChannelsLast) {
  Measurements m = shares(0.01, 0.0, 0.33, 0.55, 0.07, 0.04);
  m.channels_last = false;
  auto a = diagnose(m);
  ASSERT_EQ(rules(a), std::vector<std::string>{"channels-last"});
  EXPECT_THAT(a[0].text, HasSubstr("train.channels_last=true"));
  m.conv_model = false;  // a transformer: the memory format does not matter
  EXPECT_TRUE(diagnose(m).empty());
}

TEST(Bottleneck, ComputeBoundAtLowUtilisation) {
  Measurements m = shares(0.01, 0.0, 0.33, 0.55, 0.07, 0.04);
  m.utilisation = 0.08;
  auto a = diagnose(m);
  ASSERT_EQ(rules(a), std::vector<std::string>{"low-utilisation"});
  EXPECT_THAT(a[0].text, HasSubstr("low utilisation: 8% of peak"));
  EXPECT_THAT(a[0].text, HasSubstr("train.batch_size"));
}

// Recorded from a run whose peak came within 5% of an 8 GiB budget.
TEST(Bottleneck, MemoryBoundNearTheBudget) {
  Measurements m = shares(0.01, 0.0, 0.33, 0.55, 0.07, 0.04);
  m.peak_memory_bytes = static_cast<int64_t>(7.6 * kGiB);
  m.memory_budget_bytes = 8 * kGiB;
  m.precision = "bf16";
  auto a = diagnose(m);
  ASSERT_EQ(rules(a), std::vector<std::string>{"memory-bound"});
  EXPECT_EQ(a[0].text,
            "memory-bound: peak 7.60 GiB is 95% of the 8.00 GiB budget; lower the micro-batch (accumulate "
            "gradients to keep the global batch) or enable activation checkpointing");
}

TEST(Bottleneck, MemoryBoundFp32MentionsBf16WhereItRuns) {
  Measurements m = shares(0.01, 0.0, 0.33, 0.55, 0.07, 0.04);
  m.peak_memory_bytes = 8 * kGiB;
  m.memory_budget_bytes = 8 * kGiB;
  m.cpu_supports_bf16 = true;
  auto a = diagnose(m);
  ASSERT_EQ(rules(a), (std::vector<std::string>{"memory-bound", "compute-bound"}));
  EXPECT_THAT(a[0].text, HasSubstr("bf16 autocast also halves activation memory"));
}

TEST(Bottleneck, MemoryWellUnderBudgetOrUnknownIsSilent) {
  Measurements m = shares(0.01, 0.0, 0.33, 0.55, 0.07, 0.04);
  m.peak_memory_bytes = 2 * kGiB;
  m.memory_budget_bytes = 8 * kGiB;
  EXPECT_TRUE(diagnose(m).empty());
  m.memory_budget_bytes.reset();
  m.peak_memory_bytes = 100 * kGiB;
  EXPECT_TRUE(diagnose(m).empty());
}

TEST(Bottleneck, H2dOptimizerAndUnaccountedTime) {
  Measurements m = shares(0.05, 0.20, 0.15, 0.2, 0.22, 0.18);
  auto a = diagnose(m);
  ASSERT_EQ(rules(a), (std::vector<std::string>{"h2d-bound", "optimizer-bound", "unaccounted-time"}));
  EXPECT_THAT(find(a, "h2d-bound")->text, HasSubstr("20% of step time copying batches"));
  EXPECT_THAT(find(a, "optimizer-bound")->text, HasSubstr("22% of step time in the optimizer"));
  EXPECT_THAT(find(a, "unaccounted-time")->text, HasSubstr("18% of step time outside"));
  EXPECT_THAT(find(a, "unaccounted-time")->text, HasSubstr("train.log_every"));
}

// A balanced run: little waiting, compute dominates, and nothing in reach would speed it up
// (no fast bf16 on this CPU, channels_last already on, utilisation reasonable, memory fits).
TEST(Bottleneck, BalancedRunGetsNoAdvice) {
  Measurements m = shares(0.02, 0.0, 0.35, 0.50, 0.08, 0.05);
  m.data_workers = 1;
  m.workers_all_busy = false;
  m.utilisation = 0.55;
  m.peak_memory_bytes = 1 * kGiB;
  m.memory_budget_bytes = 8 * kGiB;
  EXPECT_TRUE(diagnose(m).empty()) << diagnose(m)[0].text;
  m.cpu_supports_bf16 = true;
  m.precision = "bf16";  // already using it
  EXPECT_TRUE(diagnose(m).empty());
}

TEST(Bottleneck, ThresholdsAreAdjustable) {
  Measurements m = shares(0.12, 0.0, 0.35, 0.40, 0.08, 0.05);
  m.data_workers = 2;
  EXPECT_TRUE(diagnose(m).empty());
  Thresholds t;
  t.input_bound_share = 0.10;
  EXPECT_EQ(rules(diagnose(m, t)), std::vector<std::string>{"input-bound"});
}

TEST(Bottleneck, MeasurementsFromStepTimerAggregate) {
  StepTimer timer;
  StepTimer::Clock::time_point now{};
  using std::chrono::milliseconds;
  for (int i = 0; i < 4; ++i) {
    timer.begin_step(now);
    timer.mark(Phase::kDataWait, now += milliseconds(40));
    timer.mark(Phase::kForward, now += milliseconds(20));
    timer.mark(Phase::kBackward, now += milliseconds(30));
    timer.mark(Phase::kOptimizer, now += milliseconds(5));
    timer.end_step(128, now += milliseconds(5));
  }
  Measurements m = Measurements::from(timer.epoch());
  EXPECT_DOUBLE_EQ(m.share[static_cast<int>(Phase::kDataWait)], 0.40);
  m.data_workers = 2;
  m.workers_all_busy = true;
  auto a = diagnose(m);
  ASSERT_EQ(rules(a), std::vector<std::string>{"input-bound"});
  EXPECT_THAT(a[0].text, HasSubstr("input-bound: 40% of step time waiting for data; workers=2 are all busy"));
}

TEST(Bottleneck, EveryRuleIsDocumented) {
  const std::string doc = keel::monitor::test_util::read_file(std::string(KEEL_SOURCE_DIR) + "/docs/monitoring.md");
  ASSERT_FALSE(doc.empty()) << "docs/monitoring.md is missing";
  for (const auto& id : bottleneck_rules()) EXPECT_THAT(doc, HasSubstr("### `" + id + "`")) << id;
}
