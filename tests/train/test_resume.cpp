// Checkpoint and resume: an interrupted run resumed with --resume auto ends bit-identical to an
// uninterrupted one, with no duplicated or missing step in metrics.jsonl.
#include <gtest/gtest.h>

#include "../test_util.h"
#include <gmock/gmock.h>

#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "keel/config/config.h"
#include "keel/models/state_dict.h"
#include "keel/train/trainer.h"

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
  keel::train::FitResult a = keel::train::Trainer(small(dir, "a")).fit();
  ASSERT_EQ(a.steps, 20);

  // Killed after step 7 (mid-epoch, one step after the step-6 checkpoint), then resumed.
  keel::train::FitResult b1 = keel::train::Trainer(small(dir, "b", {"debug.stop_after_steps=7"})).fit();
  EXPECT_TRUE(b1.interrupted);
  keel::train::FitResult b = keel::train::Trainer(small(dir, "b")).fit("auto");
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
  keel::train::FitResult r =
      keel::train::Trainer(small(dir, "f", {"train.epochs=1", "checkpoint.every_steps=0"})).fit("auto");
  EXPECT_EQ(r.steps, 10);
}

TEST(Resume, RefusesACheckpointOfAnotherModel) {
  const std::string dir = tmp_dir("other");
  keel::train::Trainer(small(dir, "m", {"debug.stop_after_steps=4"})).fit();
  try {
    keel::train::Trainer(small(dir, "m", {"model.name=resnet32"})).fit("auto");
    FAIL() << "expected a refusal";
  } catch (const std::exception& e) {
    EXPECT_THAT(e.what(), testing::HasSubstr("cannot resume"));
    EXPECT_THAT(e.what(), testing::HasSubstr("resnet20"));
  }
}
