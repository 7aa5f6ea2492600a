// Kill test: `keel train` child processes killed with SIGKILL mid-epoch, right after an epoch, inside a
// checkpoint write (one run killed three times) and at an unplanned moment (another run), each resumed with --resume auto, end with final weights
// identical bit for bit to an uninterrupted run (train.deterministic), and metrics.jsonl holds every step
// and every epoch exactly once.
#include <gtest/gtest.h>

#include "../test_util.h"
#include "cli_util.h"
#include <gmock/gmock.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <vector>

#include <nlohmann/json.hpp>

#include "keel/models/state_dict.h"

using testing::HasSubstr;
namespace fs = std::filesystem;

namespace {

// 320 Fashion-MNIST images, batch 32: 10 steps per epoch, 2 epochs; a checkpoint every 3 steps and at each
// epoch end, only the newest kept besides the best (by test top-1).
std::vector<std::string> train_args(const std::string& dir, const std::string& name,
                                    const std::vector<std::string>& extra = {}) {
  std::vector<std::string> a = {"train", "configs/default.toml"};
  for (const std::string& s :
       {"run.dir=\"" + dir + "\"", "run.name=" + name, std::string("data.train_limit=320"), std::string("data.test_limit=100"),
        std::string("train.batch_size=32"), std::string("train.epochs=2"), std::string("train.log_every=1"),
        std::string("train.deterministic=true"), std::string("checkpoint.every_steps=3"),
        std::string("checkpoint.keep_last=1"), std::string("checkpoint.keep_best=test_top1"),
        std::string("ema.enabled=true"), std::string("data.random_crop_padding=2")}) {
    a.push_back("--set");
    a.push_back(s);
  }
  for (const auto& s : extra) {
    a.push_back("--set");
    a.push_back(s);
  }
  return a;
}

std::vector<std::string> resume_args(const std::string& dir, const std::string& name,
                                     const std::vector<std::string>& extra = {}) {
  auto a = train_args(dir, name, extra);
  a.push_back("--resume");
  a.push_back("auto");
  return a;
}

// Runs to completion; expects exit status 0.
std::string complete(const std::vector<std::string>& args) {
  keel::test::KeelChild c(args);
  EXPECT_TRUE(c.started());
  const int status = c.finish();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << c.log();
  return c.log();
}

// Starts a run that pauses at `step` / `where`, waits for the pause, and kills it with SIGKILL.
std::string kill_at(const std::vector<std::string>& args) {
  keel::test::KeelChild c(args);
  EXPECT_TRUE(c.started());
  EXPECT_TRUE(c.wait_for("keel: debug pause")) << "the run ended without reaching its pause:\n" << c.log();
  const int status = c.kill_now();
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "status " << status;
  return c.log();
}

struct Logged {
  std::vector<int64_t> steps, epochs;
};
Logged logged(const std::string& run_dir) {
  Logged l;
  std::ifstream in(run_dir + "/metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);  // a torn line would throw: the file must be clean
    if (j["event"] == "step") l.steps.push_back(j["step"]);
    if (j["event"] == "epoch") l.epochs.push_back(j["epoch"]);
  }
  return l;
}

void expect_bit_identical(const std::string& a_path, const std::string& b_path) {
  auto wa = keel::models::read_state_dict(a_path), wb = keel::models::read_state_dict(b_path);
  ASSERT_EQ(wa.size(), wb.size());
  for (size_t i = 0; i < wa.size(); ++i) {
    EXPECT_EQ(wa[i].first, wb[i].first);
    EXPECT_TRUE(at::equal(wa[i].second, wb[i].second)) << wa[i].first << " differs after kill + resume";
  }
}

void expect_complete_log(const std::string& run_dir) {
  std::vector<int64_t> steps(20);
  for (int i = 0; i < 20; ++i) steps[i] = i + 1;
  Logged l = logged(run_dir);
  EXPECT_EQ(l.steps, steps) << "every step exactly once";
  EXPECT_EQ(l.epochs, (std::vector<int64_t>{1, 2})) << "every epoch exactly once";
}

// The temporary directories of `step_name`'s writes under `dir` (step-N.tmp, or step-N.tmp.XXXXXX).
std::vector<std::string> tmp_dirs(const std::string& dir, const std::string& step_name) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().filename().string().rfind(step_name + ".tmp", 0) == 0) out.push_back(e.path().string());
  }
  return out;
}

std::set<std::string> entries(const std::string& dir) {
  std::set<std::string> s;
  for (const auto& e : fs::directory_iterator(dir)) s.insert(e.path().filename().string());
  return s;
}

}  // namespace

TEST(Kill, SigkillAtFourPointsThenResumeIsBitIdentical) {
  const std::string dir = keel::test::fresh_dir("kill-points");
  complete(train_args(dir, "a"));
  const std::string b = dir + "/b";

  // 1. Mid-epoch, after step 7 (the newest checkpoint is step 6): step 7 is redone after the resume.
  kill_at(train_args(dir, "b", {"debug.pause.step=7", "debug.pause.where=\"step\""}));
  EXPECT_FALSE(fs::exists(b + "/checkpoints/final.pt"));

  // 2. Right after epoch 1 (evaluated, logged, checkpointed at step 10).
  std::string out = kill_at(resume_args(dir, "b", {"debug.pause.step=10", "debug.pause.where=\"epoch_end\""}));
  EXPECT_THAT(out, HasSubstr("resumed from " + b + "/checkpoints/step-00000006"));

  // 3. Inside the checkpoint write of step 15: model.pt is in step-00000015.tmp/, no manifest, no rename.
  out = kill_at(resume_args(dir, "b", {"debug.pause.step=15", "debug.pause.where=\"checkpoint_write\""}));
  EXPECT_THAT(out, HasSubstr("resumed from " + b + "/checkpoints/step-00000010 (step 10, epoch 2, batch 0"));
  const std::vector<std::string> tmps = tmp_dirs(b + "/checkpoints", "step-00000015");
  ASSERT_EQ(tmps.size(), 1u) << "one temporary directory of the step-15 write";
  ASSERT_TRUE(fs::exists(tmps[0] + "/model.pt")) << "the kill must land inside the write";
  EXPECT_FALSE(fs::exists(tmps[0] + "/manifest.json"));
  EXPECT_FALSE(fs::exists(b + "/checkpoints/step-00000015"));

  out = complete(resume_args(dir, "b"));
  EXPECT_THAT(out, HasSubstr("resumed from " + b + "/checkpoints/step-00000012"));

  expect_bit_identical(dir + "/a/checkpoints/final.pt", b + "/checkpoints/final.pt");
  expect_complete_log(b);
  // keep_last = 1 plus the best epoch-end checkpoint; the torn .tmp is gone.
  const std::set<std::string> left = entries(b + "/checkpoints");
  EXPECT_TRUE(tmp_dirs(b + "/checkpoints", "step-00000015").empty());
  EXPECT_EQ(left.count("step-00000020"), 1u);
  EXPECT_EQ(left, entries(dir + "/a/checkpoints")) << "same checkpoints kept as the uninterrupted run";

  // 4. At an unplanned moment: as soon as step 13's progress line is out, while the run goes on.
  {
    keel::test::KeelChild c(train_args(dir, "c"));
    ASSERT_TRUE(c.started());
    ASSERT_TRUE(c.wait_for("step 13/20")) << c.log();
    const int status = c.kill_now();
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << c.log();
  }
  out = complete(resume_args(dir, "c"));
  EXPECT_THAT(out, HasSubstr("resumed from " + dir + "/c/checkpoints/step-000000"));
  expect_bit_identical(dir + "/a/checkpoints/final.pt", dir + "/c/checkpoints/final.pt");
  expect_complete_log(dir + "/c");
}

// 5. Between the two renames of a re-saved step: a run stopped after step 13 (checkpoints 10 and 12) is
// resumed from step 10 by name, so that it writes step 12 again, and is killed after the existing step-12
// was moved aside to step-00000012.old and before the new one took its name. --resume auto then finds
// step 12 (the moved-aside copy) and the run ends bit-identical to the uninterrupted one.
TEST(Kill, SigkillBetweenTheRenamesOfAResavedStepKeepsThatStep) {
  const std::string dir = keel::test::fresh_dir("kill-rename");
  complete(train_args(dir, "a"));
  const std::string d = dir + "/d", ck = d + "/checkpoints";
  kill_at(train_args(dir, "d", {"debug.pause.step=13", "debug.pause.where=\"step\""}));
  ASSERT_TRUE(fs::exists(ck + "/step-00000010"));
  ASSERT_TRUE(fs::exists(ck + "/step-00000012"));

  auto args = train_args(dir, "d", {"debug.pause.step=12", "debug.pause.where=\"checkpoint_rename\""});
  args.push_back("--resume");
  args.push_back(ck + "/step-00000010");
  std::string out = kill_at(args);
  EXPECT_THAT(out, HasSubstr("resumed from " + ck + "/step-00000010"));
  EXPECT_FALSE(fs::exists(ck + "/step-00000012")) << "the kill must land between the renames";
  EXPECT_TRUE(fs::exists(ck + "/step-00000012.old/manifest.json"));
  const std::vector<std::string> tmps = tmp_dirs(ck, "step-00000012");
  ASSERT_EQ(tmps.size(), 1u);
  EXPECT_TRUE(fs::exists(tmps[0] + "/manifest.json")) << "the new copy is complete, only not renamed";

  out = complete(resume_args(dir, "d"));
  EXPECT_THAT(out, HasSubstr("resumed from " + ck + "/step-00000012"));
  expect_bit_identical(dir + "/a/checkpoints/final.pt", ck + "/final.pt");
  expect_complete_log(d);
  EXPECT_EQ(entries(ck), entries(dir + "/a/checkpoints")) << "same checkpoints kept as the uninterrupted run";
}
