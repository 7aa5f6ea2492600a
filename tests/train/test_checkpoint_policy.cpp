// checkpoint.keep_best (the best epoch-end checkpoint survives keep_last pruning, and export --from best
// finds it) and train.deterministic (the switches, and a resumed run keeping the checkpoint's threads).
#include <gtest/gtest.h>

#include "../test_util.h"
#include <gmock/gmock.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <thread>

#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>

#include "keel/checkpoint/checkpoint.h"
#include "keel/config/config.h"
#include "keel/models/state_dict.h"
#include "keel/train/determinism.h"
#include "keel/run/trainer.h"

using testing::HasSubstr;
namespace fs = std::filesystem;

namespace {

keel::config::Config small(const std::string& dir, const std::string& name, std::vector<std::string> extra = {}) {
  std::vector<std::string> sets = {"run.dir=\"" + dir + "\"", "run.name=" + name, "data.train_limit=192",
                                   "data.test_limit=100", "train.batch_size=32", "train.log_every=5"};
  sets.insert(sets.end(), extra.begin(), extra.end());
  return keel::config::parse("", "test", sets);
}

std::set<std::string> entries(const std::string& dir) {
  std::set<std::string> s;
  for (const auto& e : fs::directory_iterator(dir)) s.insert(e.path().filename().string());
  return s;
}

void expect_same(const keel::models::StateDict& a, const keel::models::StateDict& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].first, b[i].first) << what;
    EXPECT_TRUE(at::equal(a[i].second.contiguous(), b[i].second.contiguous())) << what << ": " << a[i].first;
  }
}

}  // namespace

// Three epochs (6 steps each) with keep_last = 1 and keep_best on test_loss, once with min and once with max: the epochs'
// losses (from metrics.jsonl) say which epoch-end checkpoint must survive; at least one of the two modes
// has its best before the last epoch, so pruning had to spare it.
TEST(KeepBest, BestCheckpointSurvivesPruning) {
  const std::string dir = keel::test::fresh_dir("keep-best");
  int protected_older = 0;
  for (const std::string mode : {"min", "max"}) {
    const std::string name = "best-" + mode;
    keel::run::FitResult r = keel::run::Trainer(
        small(dir, name, {"train.epochs=3", "checkpoint.every_steps=4", "checkpoint.keep_last=1",
                          "checkpoint.keep_best=test_loss", "checkpoint.keep_best_mode=" + mode}))
                                   .fit();
    ASSERT_EQ(r.steps, 18);
    const std::string run = dir + "/" + name;
    // Epoch-end (step, test loss), and the checkpoint events marked best.
    std::vector<std::pair<int64_t, double>> epochs;
    std::vector<int64_t> marked;
    std::ifstream in(run + "/metrics.jsonl");
    for (std::string line; std::getline(in, line);) {
      auto j = nlohmann::json::parse(line);
      if (j["event"] == "epoch") epochs.emplace_back(j["step"].get<int64_t>(), j["test_loss"].get<double>());
      if (j["event"] == "checkpoint" && j.value("best", false)) marked.push_back(j["step"]);
    }
    ASSERT_EQ(epochs.size(), 3u);
    std::vector<int64_t> improved;
    double best = 0;
    int64_t best_step = 0;
    for (const auto& [step, loss] : epochs) {
      if (improved.empty() || (mode == "min" ? loss < best : loss > best)) {
        best = loss;
        best_step = step;
        improved.push_back(step);
      }
    }
    EXPECT_EQ(marked, improved) << mode;
    std::set<std::string> expect = {"final.pt", "final.toml", "step-00000018",
                                    keel::checkpoint::dir_name_for_step(best_step)};
    EXPECT_EQ(entries(run + "/checkpoints"), expect) << mode << ": best at step " << best_step;
    if (best_step != 18) ++protected_older;

    // The newest checkpoint records the best, and export --from best writes its weights.
    std::ifstream st(run + "/checkpoints/step-00000018/state.json");
    nlohmann::json state = nlohmann::json::parse(st);
    EXPECT_EQ(state["best_checkpoint"]["step"], best_step);
    EXPECT_DOUBLE_EQ(state["best_checkpoint"]["value"].get<double>(), best);
    const std::string out = run + "/best.pt";
    const std::string cmd = std::string(KEEL_BINARY_DIR) + "/keel export " + run + " --from best --output " + out +
                            " > " + run + "/export.txt 2>&1";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    expect_same(keel::models::read_state_dict(out),
                keel::models::read_state_dict(run + "/checkpoints/" + keel::checkpoint::dir_name_for_step(best_step) +
                                              "/model.pt"),
                mode);
  }
  EXPECT_GE(protected_older, 1) << "neither mode's best came before the last epoch: pruning was not exercised";
}

TEST(KeepBest, UnknownMetricIsAConfigError) {
  try {
    keel::config::parse("", "test", {"checkpoint.keep_best=top1"});
    FAIL() << "expected a config error";
  } catch (const keel::config::ConfigError& e) {
    EXPECT_THAT(e.what(), HasSubstr("checkpoint.keep_best"));
    EXPECT_THAT(e.what(), HasSubstr("test_top1"));
  }
}

TEST(Deterministic, SwitchesAndCheckpointThreads) {
  const int before = at::get_num_threads();
  keel::train::set_deterministic(true);
  EXPECT_TRUE(keel::train::deterministic());
  EXPECT_EQ(keel::train::keep_checkpoint_threads(before), "");
  EXPECT_EQ(keel::train::keep_checkpoint_threads(0), "") << "checkpoints without a thread count";
  const std::string note = keel::train::keep_checkpoint_threads(before + 1);
  EXPECT_EQ(at::get_num_threads(), before + 1);
  EXPECT_THAT(note, HasSubstr("using " + std::to_string(before + 1) + " intra-op threads"));
  at::set_num_threads(before);
  keel::train::set_deterministic(false);
  EXPECT_FALSE(keel::train::deterministic());
}

// A deterministic run written with 1 thread and resumed where 2 are configured keeps 1 thread, and ends
// bit-identical to an uninterrupted 1-thread run.
TEST(Deterministic, ResumeKeepsTheCheckpointsThreadCount) {
  const std::string dir = keel::test::fresh_dir("det-threads");
  const std::vector<std::string> base = {"train.epochs=2", "train.deterministic=true", "checkpoint.every_steps=3"};
  auto with = [&](std::vector<std::string> v, std::vector<std::string> more) {
    v.insert(v.end(), more.begin(), more.end());
    return v;
  };
  keel::run::FitResult a = keel::run::Trainer(small(dir, "a", with(base, {"run.threads=1"}))).fit();
  EXPECT_TRUE(keel::train::deterministic());
  EXPECT_TRUE(keel::run::Trainer(small(dir, "b", with(base, {"run.threads=1", "debug.stop_after_steps=7"})))
                  .fit()
                  .interrupted);
  testing::internal::CaptureStdout();
  keel::run::FitResult b = keel::run::Trainer(small(dir, "b", with(base, {"run.threads=2"}))).fit("auto");
  const std::string out = testing::internal::GetCapturedStdout();
  EXPECT_THAT(out, HasSubstr("using 1 intra-op threads as the checkpoint's run did (this run would use 2)"));
  EXPECT_EQ(b.steps, 12);
  expect_same(keel::models::read_state_dict(a.checkpoint), keel::models::read_state_dict(b.checkpoint), "weights");
  keel::train::set_deterministic(false);
  at::set_num_threads(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
}
