// Batch planner, train.micro_batch = "auto", evaluation out-of-memory, the sample audit under injected
// out-of-memory errors, and leak freedom after repeated recoveries.
#include <gtest/gtest.h>
#include <gmock/gmock.h>

#include "../test_util.h"

#include <fstream>
#include <map>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "keel/config/config.h"
#include "keel/memory/cpu_allocator.h"
#include "keel/models/registry.h"
#include "keel/train/planner.h"
#include "keel/run/trainer.h"

namespace mem = keel::memory;
namespace tr = keel::train;
using ::testing::HasSubstr;

namespace {

keel::config::Config small(const std::string& dir, const std::string& name, std::vector<std::string> extra = {}) {
  std::vector<std::string> sets = {"run.dir=\"" + dir + "\"", "run.name=" + name, "data.train_limit=256",
                                   "data.test_limit=200", "train.batch_size=64", "train.epochs=1",
                                   "train.log_every=1", "run.threads=1", "data.workers=1"};
  sets.insert(sets.end(), extra.begin(), extra.end());
  return keel::config::parse("", "test", sets);
}

// A StepRunner on a fresh copy of `cfg`'s model, the way the planner and the trainer build it.
struct RunnerSetup {
  keel::models::NetPtr model;
  std::unique_ptr<torch::optim::Optimizer> opt;
  std::unique_ptr<tr::StepRunner> runner;
  RunnerSetup(const keel::config::Config& cfg, bool recovery) {
    model = keel::run::make_model(cfg);
    if (cfg.train.channels_last) keel::run::model_to_channels_last(*model);
    opt = tr::make_optimizer(*model, keel::run::optimizer_options(cfg));
    tr::StepOptions so = keel::run::step_options(cfg);
    so.oom_recovery = recovery;
    runner = std::make_unique<tr::StepRunner>(*model, *opt, so, [](int64_t) { return 0.01; });
  }
};

// Two full steps at `micro` on a whole batch (28x28 gray, as Fashion-MNIST) under `budget`; true if no OOM.
bool trains_at(const keel::config::Config& cfg, int64_t micro, int64_t budget) {
  mem::set_cpu_budget(std::nullopt);
  RunnerSetup s(cfg, /*recovery=*/false);
  s.runner->set_micro_batch(micro);
  at::Tensor x = at::randn({cfg.train.batch_size, 1, 28, 28}).contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = at::randint(0, 10, {cfg.train.batch_size}, at::kLong);
  mem::set_cpu_budget(budget);
  bool ok = true;
  try {
    for (int i = 0; i < 2; ++i) s.runner->run(x, y);
  } catch (const c10::OutOfMemoryError&) {
    ok = false;
  }
  mem::set_cpu_budget(std::nullopt);
  return ok;
}

std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

}  // namespace

TEST(Planner, Divisors) {
  EXPECT_EQ(tr::divisors(12), (std::vector<int64_t>{1, 2, 3, 4, 6, 12}));
  EXPECT_EQ(tr::divisors(1), (std::vector<int64_t>{1}));
}

TEST(Planner, ChosenMicroBatchTrainsUnderTheBudgetAndOneDoublingDoesNot) {
  mem::install_cpu_allocator();
  const std::string dir = keel::test::fresh_dir("planner-fit");
  // Margin 0: the planner's limit is the budget itself, so its answer is exactly checkable.
  keel::config::Config cfg = small(dir, "p", {"memory.plan_margin=0.0", "train.batch_size=128"});
  mem::set_cpu_budget(std::nullopt);
  const int64_t budget = 40LL << 20;  // between the peaks of a step at micro-batch 16 and 128 (~10 and ~52 MiB)
  // plan_for_config reads the budget from the config: give it the same number of bytes.
  cfg.memory.budget = std::to_string(budget);
  tr::PlanResult plan;
  {
    RunnerSetup s(cfg, false);
    plan = keel::run::plan_for_config(cfg, *s.model, *s.opt, {1, 28, 28});
  }
  std::cout << plan.summary();
  ASSERT_GT(plan.micro_batch, 1);
  ASSERT_LT(plan.micro_batch, 128) << "the budget is chosen so that the whole batch does not fit";
  EXPECT_EQ(128 % plan.micro_batch, 0);
  EXPECT_EQ(plan.accumulation_steps * plan.micro_batch, 128);
  EXPECT_GT(plan.train_peak, 0);
  EXPECT_LE(plan.train_peak, budget);
  EXPECT_GT(plan.eval_micro_batch, 0);
  EXPECT_EQ(mem::cpu_budget(), std::optional<int64_t>(budget)) << "the budget is restored after planning";
  mem::set_cpu_budget(std::nullopt);
  EXPECT_TRUE(trains_at(cfg, plan.micro_batch, budget)) << "micro-batch " << plan.micro_batch;
  EXPECT_FALSE(trains_at(cfg, 2 * plan.micro_batch, budget)) << "micro-batch " << 2 * plan.micro_batch;
}

TEST(Planner, NothingFitsIsAClearError) {
  mem::install_cpu_allocator();
  mem::set_cpu_budget(std::nullopt);
  const std::string dir = keel::test::fresh_dir("planner-none");
  keel::config::Config cfg = small(dir, "p", {"memory.budget=\"3MiB\""});
  RunnerSetup s(cfg, false);
  try {
    keel::run::plan_for_config(cfg, *s.model, *s.opt, {1, 28, 28});
    FAIL() << "a 3 MiB budget cannot hold a ResNet-20 step";
  } catch (const tr::PlanError& e) {
    EXPECT_THAT(e.what(), HasSubstr("memory.budget"));
    EXPECT_THAT(e.what(), HasSubstr("3.00 MiB"));
  }
  EXPECT_EQ(mem::cpu_budget(), std::optional<int64_t>(3LL << 20));
  mem::set_cpu_budget(std::nullopt);
}

TEST(Planner, AutoMicroBatchTrainsThroughABudgetAFixedBatchCannot) {
  const std::string dir = keel::test::fresh_dir("planner-auto");
  // Fixed micro-batch = the whole batch, no recovery: fails with a clear out-of-memory error.
  keel::config::Config plain = small(dir, "plain", {"memory.budget=\"24MiB\"", "memory.oom_recovery=false",
                                                    "train.batch_size=128", "train.max_steps=2"});
  try {
    keel::run::Trainer(plain).fit();
    FAIL() << "batch 128 in 24 MiB without recovery must run out of memory";
  } catch (const c10::OutOfMemoryError& e) {
    EXPECT_THAT(e.what(), HasSubstr("memory.budget"));
  }
  keel::config::Config cfg = small(dir, "auto", {"memory.budget=\"24MiB\"", "train.micro_batch=\"auto\"",
                                                 "train.batch_size=128", "train.max_steps=2"});
  const keel::run::FitResult r = keel::run::Trainer(cfg).fit();
  EXPECT_EQ(r.steps, 2);
  EXPECT_GT(r.micro_batch, 0);
  EXPECT_LT(r.micro_batch, 128);
  EXPECT_EQ(r.oom_recoveries, 0) << "the planned micro-batch fits: no recovery needed";
  EXPECT_LE(r.peak_memory_bytes, 24LL << 20);
  bool planned = false;
  for (const auto& e : read_jsonl(r.run_dir + "/metrics.jsonl")) {
    if (e.value("event", "") == "batch_plan") {
      planned = true;
      EXPECT_EQ(e["plan"]["micro_batch"], r.micro_batch);
    }
  }
  EXPECT_TRUE(planned) << "the plan is logged";
}

TEST(OomRecovery, EvaluationOutOfMemoryNeverShrinksTheTrainingBatch) {
  const std::string dir = keel::test::fresh_dir("oom-eval");
  // Training micro-batch 8 fits in 24 MiB; one evaluation forward of 1000 images does not.
  keel::config::Config cfg = small(dir, "e", {"memory.budget=\"24MiB\"", "train.micro_batch=8",
                                              "train.eval_batch_size=1000", "data.test_limit=1000",
                                              "train.max_steps=2"});
  const keel::run::FitResult r = keel::run::Trainer(cfg).fit();
  EXPECT_EQ(r.micro_batch, 8);
  EXPECT_EQ(r.oom_recoveries, 0);
  EXPECT_EQ(r.test.samples, 1000) << "every test image evaluated once";
  int eval_recoveries = 0;
  for (const auto& e : read_jsonl(r.run_dir + "/metrics.jsonl")) {
    if (e.value("event", "") == "oom_recovery" && e.value("phase", "") == "eval") ++eval_recoveries;
  }
  EXPECT_GE(eval_recoveries, 1);
}

TEST(OomRecovery, SampleAuditEverySampleOncePerEpochWithInjectedOoms) {
  const std::string dir = keel::test::fresh_dir("oom-audit");
  // 200 samples, batch 32: 7 batches per epoch, the last one partial; OOMs injected at several steps.
  keel::config::Config cfg = small(dir, "a", {"data.train_limit=200", "train.batch_size=32", "train.epochs=2",
                                              "debug.inject_oom_steps=[2, 5, 9, 13]", "debug.log_sample_ids=true"});
  const keel::run::FitResult r = keel::run::Trainer(cfg).fit();
  EXPECT_EQ(r.oom_recoveries, 4);
  EXPECT_EQ(r.micro_batch, 2) << "32 halved four times, kept for the rest of the run";
  std::map<int64_t, std::map<int64_t, int>> uses;  // epoch -> sample id -> times consumed
  int64_t last_step = 0;
  for (const auto& e : read_jsonl(r.run_dir + "/sample_ids.jsonl")) {
    EXPECT_TRUE(e["applied"].get<bool>());
    EXPECT_EQ(e["step"].get<int64_t>(), last_step + 1) << "one applied step per batch, in order";
    last_step = e["step"];
    for (int64_t id : e["ids"].get<std::vector<int64_t>>()) ++uses[e["epoch"]][id];
  }
  ASSERT_EQ(uses.size(), 2u);
  for (const auto& [epoch, ids] : uses) {
    EXPECT_EQ(ids.size(), 200u) << "epoch " << epoch;
    for (const auto& [id, n] : ids) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, 200);
      EXPECT_EQ(n, 1) << "sample " << id << " in epoch " << epoch;
    }
  }
}

TEST(OomRecovery, TenRecoveriesLeakNothing) {
  mem::install_cpu_allocator();
  mem::set_cpu_budget(std::nullopt);
  // A small conv net (no batch statistics), batch 1024: ten injected OOMs (each after the last
  // micro-batch's forward, with earlier gradients allocated) bring the micro-batch from 1024 to 1.
  struct Small : keel::models::Net {
    torch::nn::Conv2d conv{nullptr};
    torch::nn::Linear fc{nullptr};
    Small() {
      conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 8, 3).padding(1)));
      fc = register_module("fc", torch::nn::Linear(8, 10));
    }
    at::Tensor forward(at::Tensor x) override { return fc(conv(x).relu().mean({2, 3})); }
  };
  auto run = [](std::vector<int64_t> oom_steps) {
    torch::manual_seed(3);
    Small model;
    tr::OptimizerOptions oo;
    auto opt = tr::make_optimizer(model, oo);
    tr::StepOptions so;
    so.inject.oom_steps = std::move(oom_steps);
    so.micro_batch = so.inject.oom_steps.empty() ? 1 : 0;
    const int64_t warmup = so.inject.oom_steps.empty() ? 1 : 10;  // the clean run: optimizer state only
    tr::StepRunner r(model, *opt, so, [](int64_t) { return 0.01; });
    at::Tensor x = at::randn({1024, 1, 8, 8}), y = at::randint(0, 10, {1024}, at::kLong);
    for (int64_t i = 0; i < warmup; ++i) r.run(x, y);
    EXPECT_EQ(r.micro_batch(), 1);
    const int64_t before = mem::cpu_stats().current;
    mem::reset_peak();
    r.run(x, y);
    const int64_t after = mem::cpu_stats().current;
    EXPECT_EQ(after, before) << "a step leaves what it found";
    return std::make_pair(r.oom_recoveries(), mem::cpu_stats().peak);
  };
  const auto [recovered, peak_oom] = run({1, 2, 3, 4, 5, 6, 7, 8, 9, 10});
  const auto [none, peak_clean] = run({});
  EXPECT_EQ(recovered, 10);
  EXPECT_EQ(none, 0);
  EXPECT_LE(std::abs(static_cast<double>(peak_oom - peak_clean)), 0.05 * static_cast<double>(peak_clean))
      << "peak after 10 recoveries " << peak_oom << " vs " << peak_clean << " without";
}
