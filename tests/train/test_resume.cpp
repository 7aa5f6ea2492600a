// Checkpoint and resume: an interrupted run resumed with --resume auto ends bit-identical to an
// uninterrupted one, with no duplicated or missing step in metrics.jsonl.
#include <gtest/gtest.h>

#include "../test_util.h"
#include <gmock/gmock.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "keel/config/config.h"
#include "keel/models/state_dict.h"
#include "keel/run/trainer.h"

namespace {

std::string tmp_dir(const std::string& name) { return keel::test::fresh_dir("resume-" + name); }

keel::config::Config small(const std::string& dir, const std::string& name, std::vector<std::string> extra = {}) {
  std::vector<std::string> sets = {"run.dir=\"" + dir + "\"", "run.name=" + name, "data.train_limit=640",
                                   "data.test_limit=200", "train.batch_size=64", "train.epochs=2",
                                   "train.log_every=1", "checkpoint.every_steps=3", "ema.enabled=true",
                                   "early_stop.enabled=true", "early_stop.patience=5", "data.random_crop_padding=2"};
  sets.insert(sets.end(), extra.begin(), extra.end());
  return keel::config::parse("", "test", sets);
}

std::vector<int64_t> logged_steps(const std::string& run_dir) {
  std::vector<int64_t> steps;
  std::ifstream in(run_dir + "/metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j["event"] == "step") steps.push_back(j["step"]);
  }
  return steps;
}

}  // namespace

TEST(Resume, InterruptedRunResumesBitIdentical) {
  const std::string dir = tmp_dir("bits");
  keel::run::FitResult a = keel::run::Trainer(small(dir, "a")).fit();
  ASSERT_EQ(a.steps, 20);

  // Killed after step 7 (mid-epoch, one step after the step-6 checkpoint), then resumed.
  keel::run::FitResult b1 = keel::run::Trainer(small(dir, "b", {"debug.stop_after_steps=7"})).fit();
  EXPECT_TRUE(b1.interrupted);
  keel::run::FitResult b = keel::run::Trainer(small(dir, "b")).fit("auto");
  EXPECT_EQ(b.steps, 20);

  auto wa = keel::models::read_state_dict(a.checkpoint), wb = keel::models::read_state_dict(b.checkpoint);
  ASSERT_EQ(wa.size(), wb.size());
  for (size_t i = 0; i < wa.size(); ++i) {
    EXPECT_EQ(wa[i].first, wb[i].first);
    EXPECT_TRUE(at::equal(wa[i].second, wb[i].second)) << wa[i].first << " differs after resume";
  }
  EXPECT_EQ(a.test.top1, b.test.top1);
  EXPECT_EQ(a.train_loss, b.train_loss) << "epoch accumulators are restored too";

  std::vector<int64_t> expect(20);
  for (int i = 0; i < 20; ++i) expect[i] = i + 1;
  EXPECT_EQ(logged_steps(dir + "/b"), expect) << "no duplicated or missing step records";
}

TEST(Resume, AutoWithoutCheckpointStartsFresh) {
  const std::string dir = tmp_dir("fresh");
  keel::run::FitResult r =
      keel::run::Trainer(small(dir, "f", {"train.epochs=1", "checkpoint.every_steps=0"})).fit("auto");
  EXPECT_EQ(r.steps, 10);
}

TEST(Resume, RefusesACheckpointOfAnotherModel) {
  const std::string dir = tmp_dir("other");
  keel::run::Trainer(small(dir, "m", {"debug.stop_after_steps=4"})).fit();
  try {
    keel::run::Trainer(small(dir, "m", {"model.name=resnet32"})).fit("auto");
    FAIL() << "expected a refusal";
  } catch (const std::exception& e) {
    EXPECT_THAT(e.what(), testing::HasSubstr("cannot resume"));
    EXPECT_THAT(e.what(), testing::HasSubstr("resnet20"));
  }
}

// Reduce-on-plateau across an interruption: the plateau state (best, bad epochs, cooldown, factor) comes back
// from the checkpoint, so the resumed run's learning rates and final weights equal an uninterrupted run's.
// Also checks the resolved lr (optim.lr_scaling) and the no-decay group's factor are logged.
TEST(Resume, ReduceOnPlateauStateSurvivesResume) {
  const std::string dir = tmp_dir("plateau");
  // abs threshold 100: no epoch after the first counts as an improvement, so with patience 0 the rate drops
  // after epoch 2 and after epoch 4 (cooldown 1: epoch 3's bad epoch is not counted).
  const std::vector<std::string> sets = {
      "train.epochs=4", "early_stop.enabled=false", "schedule.name=reduce_on_plateau", "schedule.warmup_steps=4",
      "schedule.start_factor=0.5", "schedule.plateau.monitor=train_loss", "schedule.plateau.patience=0",
      "schedule.plateau.threshold=100", "schedule.plateau.threshold_mode=abs", "schedule.plateau.cooldown=1",
      "schedule.plateau.factor=0.5", "optim.lr_scaling=sqrt", "optim.base_batch_size=256",
      "optim.no_decay_lr_factor=0.5"};
  keel::run::FitResult a = keel::run::Trainer(small(dir, "a", sets)).fit();
  ASSERT_EQ(a.steps, 40);

  // Killed in epoch 4 (after the step-33 checkpoint, which holds the plateau state of 3 epoch ends).
  std::vector<std::string> killed = sets;
  killed.push_back("debug.stop_after_steps=35");
  EXPECT_TRUE(keel::run::Trainer(small(dir, "b", killed)).fit().interrupted);
  keel::run::FitResult b = keel::run::Trainer(small(dir, "b", sets)).fit("auto");
  EXPECT_EQ(b.steps, 40);

  // Learning rates per step, and the resolved-lr record, from metrics.jsonl.
  auto read = [](const std::string& run_dir, nlohmann::json* resolved, int* reductions) {
    std::map<int64_t, double> lr;
    std::ifstream in(run_dir + "/metrics.jsonl");
    for (std::string line; std::getline(in, line);) {
      auto j = nlohmann::json::parse(line);
      if (j["event"] == "step") lr[j["step"].get<int64_t>()] = j["lr"].get<double>();
      if (j["event"] == "lr_resolved") *resolved = j;
      if (j["event"] == "lr_reduced") ++*reductions;
    }
    return lr;
  };
  nlohmann::json ra, rb;
  int reduced_a = 0, reduced_b = 0;
  auto lr_a = read(dir + "/a", &ra, &reduced_a);
  auto lr_b = read(dir + "/b", &rb, &reduced_b);
  EXPECT_EQ(reduced_a, 2) << "the scripted plateau must reduce the rate, or this test proves nothing";
  EXPECT_EQ(reduced_b, 2) << "epoch 2's reduction before the kill, epoch 4's after the resume";
  // lr = 0.2 x sqrt(64 / 256) = 0.1; no-decay group 0.05.
  EXPECT_DOUBLE_EQ(ra.value("lr", 0.0), 0.1);
  EXPECT_DOUBLE_EQ(ra["group_lr"][1].get<double>(), 0.05);
  EXPECT_DOUBLE_EQ(lr_a.at(1), 0.05);   // warm-up from start_factor 0.5
  EXPECT_DOUBLE_EQ(lr_a.at(10), 0.1);   // warm-up over after 4 steps
  EXPECT_DOUBLE_EQ(lr_a.at(25), 0.05);  // after epoch 2's reduction
  EXPECT_DOUBLE_EQ(lr_a.at(40), 0.05);  // epoch 3 was cooldown: no second reduction before epoch 4 ends
  ASSERT_EQ(lr_a.size(), lr_b.size());
  for (const auto& [step, lr] : lr_a) EXPECT_EQ(lr_b.at(step), lr) << "step " << step;

  auto wa = keel::models::read_state_dict(a.checkpoint), wb = keel::models::read_state_dict(b.checkpoint);
  ASSERT_EQ(wa.size(), wb.size());
  for (size_t i = 0; i < wa.size(); ++i) {
    EXPECT_TRUE(at::equal(wa[i].second, wb[i].second)) << wa[i].first << " differs after resume";
  }
}
