// The keel executable end to end: help, config errors on the command line, --json summaries.
#include <gtest/gtest.h>

#include "../test_util.h"
#include "cli_util.h"
#include <gmock/gmock.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

using testing::HasSubstr;

namespace {

using keel::test::last_line;

// Runs `keel ARGS` to completion.
keel::test::RunResult run(const std::string& args) { return keel::test::run_keel(args); }

std::string tmp_dir(const std::string& name) { return keel::test::fresh_dir("cli-" + name); }

}  // namespace

TEST(Cli, HelpListsSubcommands) {
  auto r = run("--help");
  EXPECT_EQ(r.code, 0);
  for (const char* s : {"train", "eval", "doctor", "config"}) EXPECT_THAT(r.out, HasSubstr(s));
  for (const char* s : {"train", "eval", "doctor"}) {
    auto h = run(std::string(s) + " --help");
    EXPECT_EQ(h.code, 0) << s;
  }
}

TEST(Cli, BadSetIsAnErrorNamingTheKey) {
  auto r = run("train configs/default.toml --set train.epochs=many");
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.out, HasSubstr("--set train.epochs=many"));
  EXPECT_THAT(r.out, HasSubstr("'train.epochs' expects integer"));
  r = run("train configs/default.toml --set optim.learning_rate=0.1");
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.out, HasSubstr("unknown key 'optim.learning_rate'"));
}

TEST(Cli, UnknownKeyInFileNamesFileAndLine) {
  const std::string dir = tmp_dir("badcfg");
  {
    std::ofstream f(dir + "/bad.toml");
    f << "[train]\nepochs = 1\nbatchsize = 3\n";
  }
  auto r = run("train " + dir + "/bad.toml");
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.out, HasSubstr(dir + "/bad.toml:3"));
  EXPECT_THAT(r.out, HasSubstr("'train.batchsize'"));
}

TEST(Cli, TrainAndEvalPrintJsonSummary) {
  const std::string dir = tmp_dir("json");
  auto r = run("train configs/default.toml --json --set run.dir=" + dir +
                 " --set run.name=tiny --set data.train_limit=256 --set data.test_limit=200"
                 " --set train.batch_size=64 --set train.epochs=1");
  ASSERT_EQ(r.code, 0) << r.out;
  nlohmann::json j = nlohmann::json::parse(last_line(r.out));
  EXPECT_EQ(j["steps"], 4);
  EXPECT_GE(j["test_top1"].get<double>(), 0.0);
  EXPECT_GT(j["images_per_second"].get<double>(), 0.0);
  EXPECT_THAT(r.out, HasSubstr("test accuracy"));
  const std::string ckpt = j["checkpoint"];
  EXPECT_TRUE(std::filesystem::exists(ckpt));

  auto e = run("eval configs/default.toml --json --checkpoint " + ckpt + " --set data.test_limit=200");
  ASSERT_EQ(e.code, 0) << e.out;
  nlohmann::json ej = nlohmann::json::parse(last_line(e.out));
  EXPECT_EQ(ej["samples"], 200);
  EXPECT_NEAR(ej["top1"].get<double>(), j["test_top1"].get<double>(), 1e-9) << "eval reproduces the final test";
}

TEST(Cli, DoctorReportsMachineFacts) {
  auto r = run("doctor --json");
  ASSERT_EQ(r.code, 0) << r.out;
  nlohmann::json j = nlohmann::json::parse(last_line(r.out));
  EXPECT_GE(j["threads"].get<int>(), 1);
  EXPECT_EQ(j["threads"].get<int>(), j["cores"].get<int>()) << "keel uses every core by default";
  EXPECT_GT(j["fp32_gemm_gflops"].get<double>(), 0.0);
  EXPECT_TRUE(j.contains("onednn"));
  EXPECT_TRUE(j.contains("cuda"));
  EXPECT_TRUE(j["data_ok"].get<bool>()) << j["data"];
}

TEST(Cli, PlanBatchPrintsMicroBatchAccumulationAndPeak) {
  auto r = run("plan-batch configs/default.toml --json --set memory.budget=40MiB --set train.batch_size=128");
  ASSERT_EQ(r.code, 0) << r.out;
  nlohmann::json j = nlohmann::json::parse(last_line(r.out));
  const int64_t m = j["micro_batch"];
  EXPECT_GT(m, 0);
  EXPECT_LT(m, 128);
  EXPECT_EQ(128 % m, 0);
  EXPECT_EQ(j["accumulation_steps"].get<int64_t>() * m, 128);
  EXPECT_LE(j["train_peak_bytes"].get<int64_t>(), j["limit_bytes"].get<int64_t>());
  EXPECT_THAT(r.out, HasSubstr("accumulation steps: a full training step peaked at"));
  EXPECT_THAT(r.out, HasSubstr("set train.micro_batch = " + std::to_string(m)));
  // Nothing fits: an error that says what to change, exit code 1.
  auto none = run("plan-batch configs/default.toml --set memory.budget=2MiB");
  EXPECT_EQ(none.code, 1) << none.out;
  EXPECT_THAT(none.out, HasSubstr("raise memory.budget"));
}
