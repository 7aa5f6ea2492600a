// The keel executable's monitoring features end to end: report.html of a real run (rendered in headless
// Chromium), --profile-steps, and Ctrl-C (SIGINT to a real child process) with resume.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "../chromium.h"
#include "../test_util.h"
#include "cli_util.h"

using testing::HasSubstr;
namespace fs = std::filesystem;

namespace {

using keel::test::last_line;
using keel::test::run_keel;

std::string read(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A tiny real run: 256 Fashion-MNIST images, batch 64 (4 steps), a record every step.
std::string tiny(const std::string& dir, const std::string& name) {
  return "configs/default.toml --set run.dir=" + dir + " --set run.name=" + name +
         " --set data.train_limit=256 --set data.test_limit=200 --set train.batch_size=64 --set train.epochs=1"
         " --set train.log_every=1";
}

std::vector<std::string> split_args(const std::string& s) {
  std::istringstream in(s);
  std::vector<std::string> v;
  for (std::string w; in >> w;) v.push_back(w);
  return v;
}

}  // namespace

TEST(CliReport, RealRunReportRendersInChromium) {
  const std::string dir = keel::test::fresh_dir("cli-report");
  auto t = run_keel("train " + tiny(dir, "r"));
  ASSERT_EQ(t.code, 0) << t.out;
  auto r = run_keel("report " + dir + "/r");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_THAT(r.out, HasSubstr("keel: report " + dir + "/r/report.html"));
  const std::string html = read(dir + "/r/report.html");
  EXPECT_THAT(html, HasSubstr("fp32 GEMM")) << "keel doctor's facts";
  EXPECT_THAT(html, HasSubstr("LibTorch"));
  EXPECT_THAT(html, HasSubstr("name = 'resnet20'")) << "the resolved config";
  EXPECT_EQ(keel::test::count_of(html, "<figure class=\"chart\""), 9u);

  if (keel::test::chromium_binary().empty()) {
    GTEST_SKIP() << "chromium is not installed (scripts/setup.sh installs Debian's `chromium`)";
  }
  const auto page = keel::test::render_in_chromium(dir + "/r/report.html", dir);
  ASSERT_EQ(page.dom_status, 0) << page.console;
  EXPECT_EQ(page.dom.find("data-report-error=\""), std::string::npos) << page.dom.substr(0, 400);
  EXPECT_EQ(page.console.find("Uncaught"), std::string::npos) << page.console;
  EXPECT_THAT(page.dom, HasSubstr("data-charts-drawn=\"9\""));
  EXPECT_GT(keel::test::count_of(page.dom, "class=\"series"), 15u);
  ASSERT_EQ(page.shot_status, 0);
  EXPECT_GT(page.width, 0);
}

TEST(CliReport, BadRunDirIsNamed) {
  auto r = run_keel("report /nonexistent/run");
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.out, HasSubstr("/nonexistent/run: no such run directory"));
}

TEST(CliProfile, ProfileStepsWritesChromeTraceAndOperatorTable) {
  const std::string dir = keel::test::fresh_dir("cli-profile");
  auto t = run_keel("train " + tiny(dir, "p") + " --profile-steps 2:3");
  ASSERT_EQ(t.code, 0) << t.out;
  EXPECT_THAT(t.out, HasSubstr("profile: steps 2..3"));
  const std::string trace_path = dir + "/p/profile_steps_2-3.trace.json";
  ASSERT_TRUE(fs::exists(trace_path)) << t.out;
  const nlohmann::json trace = nlohmann::json::parse(read(trace_path));  // throws if not valid JSON
  ASSERT_TRUE(trace["traceEvents"].is_array());
  size_t conv = 0, addmm = 0, steps = 0;
  for (const auto& e : trace["traceEvents"]) {
    const std::string n = e["name"];
    EXPECT_EQ(e["ph"], "X");
    EXPECT_GE(e["dur"].get<double>(), 0.0);
    conv += n.find("conv") != std::string::npos;
    addmm += n.find("addmm") != std::string::npos;
    steps += n.rfind("ProfilerStep#", 0) == 0;
  }
  EXPECT_GT(conv, 0u);
  EXPECT_GT(addmm, 0u);
  EXPECT_EQ(steps, 2u) << "one range per profiled step";

  const std::string table = read(dir + "/p/profile_steps_2-3.ops.txt");
  EXPECT_THAT(table, HasSubstr("operator"));
  EXPECT_THAT(table, HasSubstr("conv"));
  // Sorted by total time (third column), largest first.
  std::istringstream in(table);
  std::string line;
  std::getline(in, line);  // comment
  std::getline(in, line);  // header
  double prev = 1e300;
  int rows = 0;
  while (std::getline(in, line)) {
    // name (may contain spaces), calls, total ms, self ms, self %, mean us: read from the right.
    std::istringstream ls(line);
    std::vector<std::string> w;
    for (std::string t; ls >> t;) w.push_back(t);
    ASSERT_GE(w.size(), 6u) << line;
    const double total = std::stod(w[w.size() - 4]);
    EXPECT_LE(total, prev + 1e-9) << line;
    prev = total;
    ++rows;
  }
  EXPECT_GT(rows, 10);
  // The run's records name the files (keel report shows the table).
  EXPECT_THAT(read(dir + "/p/metrics.jsonl"), HasSubstr("\"event\":\"profile\""));
}

TEST(CliProfile, BadProfileStepsAreErrors) {
  auto r = run_keel("train configs/default.toml --profile-steps 3:2");
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.out, HasSubstr("--profile-steps '3:2': B is before A"));
  r = run_keel("train configs/default.toml --profile-steps two");
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.out, HasSubstr("'two' is not a step number"));
  const std::string dir = keel::test::fresh_dir("cli-profile-bad");
  r = run_keel("train " + tiny(dir, "p") + " --profile-steps 9:10");
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.out, HasSubstr("--profile-steps 9:10: the run has 4 steps"));
}

TEST(CliCtrlC, SigintStopsAfterTheStepWithACheckpointAndResumeFinishes) {
  const std::string dir = keel::test::fresh_dir("cli-sigint");
  // 512 images in batches of 32: 16 steps, interrupted at step 3 (it stops at the end of the step running then).
  const std::string args = "configs/default.toml --set run.dir=" + dir +
                           " --set run.name=c --set data.train_limit=512 --set data.test_limit=200"
                           " --set train.batch_size=32 --set train.epochs=1 --set train.log_every=1";
  keel::test::KeelChild child(split_args("train " + args));
  ASSERT_TRUE(child.wait_for("step 3/16")) << child.log();
  child.send(SIGINT);
  const int code = keel::test::exit_code(child.finish());
  EXPECT_EQ(code, 130) << child.log();
  EXPECT_THAT(child.log(), HasSubstr("Ctrl-C: stopping after this step"));
  EXPECT_THAT(child.log(), HasSubstr("--resume auto"));
  std::smatch m;
  ASSERT_TRUE(std::regex_search(child.log(), m, std::regex("stopped after (\\d+) steps \\(Ctrl-C\\)"))) << child.log();
  const int stopped = std::stoi(m[1]);
  EXPECT_GE(stopped, 3);
  EXPECT_LT(stopped, 16);
  char name[32];
  std::snprintf(name, sizeof name, "step-%08d", stopped);
  EXPECT_TRUE(fs::exists(dir + "/c/checkpoints/" + name)) << child.log();

  auto r = run_keel("train " + args + " --resume auto --json");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_THAT(r.out, HasSubstr("resumed from " + dir + "/c/checkpoints/" + name + " (step " + std::to_string(stopped)));
  const nlohmann::json j = nlohmann::json::parse(last_line(r.out));
  EXPECT_EQ(j["steps"], 16);
  EXPECT_FALSE(j["interrupted"].get<bool>());
}

TEST(CliCtrlC, SecondSigintExitsAtOnce) {
  const std::string dir = keel::test::fresh_dir("cli-sigint2");
  // Batches of 256: steps long enough (~0.3 s here) that the second signal lands inside the step the first
  // one lets finish. (Two signals sent back to back could merge into one pending SIGINT.)
  keel::test::KeelChild child(split_args("train configs/default.toml --set run.dir=" + dir +
                         " --set run.name=c --set data.train_limit=2560 --set data.test_limit=200"
                         " --set train.batch_size=256 --set train.epochs=1 --set train.log_every=1"));
  ASSERT_TRUE(child.wait_for("step 1/10")) << child.log();
  child.send(SIGINT);
  ASSERT_TRUE(child.wait_for("Ctrl-C: stopping after this step")) << child.log();
  child.send(SIGINT);
  EXPECT_EQ(keel::test::exit_code(child.finish()), 130) << child.log();
  EXPECT_THAT(child.log(), HasSubstr("second Ctrl-C: exiting now"));
  EXPECT_THAT(child.log(), testing::Not(HasSubstr("resume with")));
}
