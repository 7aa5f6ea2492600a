// report.html from recorded run records: reading errors name file and line; the page is self-contained and
// renders in headless Chromium without script errors, with every chart drawn.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <regex>

#include "../chromium.h"
#include "keel/monitor/report.h"
#include "monitor_test_util.h"

using testing::HasSubstr;
using testing::Not;
using namespace keel::monitor;

namespace {

// A recorded two-epoch run: 20 logging windows, 2 epochs, a guard skip, a checkpoint and the final summary.
std::string write_recorded_run(const std::string& name) {
  const std::string dir = test_util::fresh_dir(name);
  std::ofstream m(dir + "/metrics.jsonl");
  m << R"({"event":"lr_resolved","lr":0.2})" << "\n";
  for (int i = 1; i <= 20; ++i) {
    const double step_s = 0.17 + 0.01 * std::sin(i);
    nlohmann::json s = {{"event", "step"}, {"epoch", i <= 10 ? 1 : 2}, {"step", i * 10}, {"loss", 2.3 / (1 + 0.2 * i)},
                        {"lr", 0.2 * std::sin(3.14159 * i / 21)}, {"grad_norm", 1.0 + 0.1 * i},
                        {"images_per_second", 128 / step_s}, {"step_seconds", step_s},
                        {"data_wait_share", 0.01}, {"h2d_share", 0.0}, {"forward_share", 0.35},
                        {"backward_share", 0.5}, {"optimizer_share", 0.1}, {"other_share", 0.04},
                        {"utilisation", 0.3}, {"memory_current_bytes", 2.0e8 + 1e6 * i},
                        {"memory_peak_bytes", 3.1e8}, {"rss_bytes", 6.0e8}, {"loss_scale", 1.0},
                        {"micro_batch", 128}};
    m << s.dump() << "\n";
    if (i == 7) m << R"({"event":"skip","epoch":1,"step":70,"message":"non-finite loss <in layer1>"})" << "\n";
    if (i % 10 == 0) {
      nlohmann::json e = {{"event", "epoch"}, {"epoch", i / 10}, {"step", i * 10}, {"train_loss", 0.6 / (i / 10)},
                          {"train_top1", 0.8 + 0.05 * (i / 10)}, {"test_loss", 0.5 / (i / 10)},
                          {"test_top1", 0.85 + 0.04 * (i / 10)}, {"test_top5", 0.99}, {"seconds", 35.0},
                          {"images_per_second", 740}, {"memory_peak_bytes", 3.1e8}, {"data_wait_share", 0.01},
                          {"advice", {"compute-bound at 30% of peak; bf16 would help"}}};
      m << e.dump() << "\n";
    }
  }
  m << R"J({"event":"final","summary":{"test_top1":0.9171,"test_top5":0.9987,"test_loss":0.2271,"steps":200,)J"
       R"J("epochs":2,"images_per_second":741.2,"data_wait_share":0.001,"advice":["compute-bound at 30% of peak; )J"
       R"J(bf16 would help: this CPU supports it (train.precision=bf16)"],"train_seconds":70.1,"wall_seconds":80.0}})J"
    << "\n";
  m.close();
  std::ofstream(dir + "/config.resolved.toml") << "[model]\nname = \"resnet20\"\n\n[train]\nepochs = 2\n";
  return dir;
}

nlohmann::json fake_environment() {
  return {{"lines", {"LibTorch        2.14.1", "fp32 GEMM       44.8 GFLOP/s <via OpenBLAS>"}},
          {"advice", nlohmann::json::array()}};
}

}  // namespace

TEST(Report, MissingRunDirectoryOrMetricsIsNamed) {
  try {
    read_run("/nonexistent/keel-run");
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("/nonexistent/keel-run: no such run directory"));
  }
  const std::string dir = test_util::fresh_dir("report-empty");
  try {
    read_run(dir);
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr(dir + "/metrics.jsonl: missing"));
  }
}

TEST(Report, BadLineIsNamedTornLastLineIsSkipped) {
  const std::string dir = test_util::fresh_dir("report-bad");
  std::ofstream(dir + "/metrics.jsonl") << R"({"event":"step","step":1,"loss":2})" << "\n"
                                        << "garbage here\n"
                                        << R"({"event":"step","step":2,"loss":1})" << "\n";
  try {
    read_run(dir);
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr(dir + "/metrics.jsonl:2: not a JSON object: garbage here"));
  }
  std::ofstream(dir + "/metrics.jsonl") << R"({"event":"step","step":1,"loss":2})" << "\n"
                                        << R"({"event":"step","st)";
  RunRecords r = read_run(dir);
  EXPECT_EQ(r.steps.size(), 1u);
  ASSERT_FALSE(r.notes.empty());
  EXPECT_THAT(r.notes[0], HasSubstr("metrics.jsonl:2: incomplete last line skipped"));
  EXPECT_TRUE(r.final.is_null());
}

TEST(Report, ChartsCarryTheRecordedSeries) {
  RunRecords r = read_run(write_recorded_run("report-charts"));
  EXPECT_EQ(r.steps.size(), 20u);
  EXPECT_EQ(r.epochs.size(), 2u);
  const nlohmann::json charts = report_charts(r);
  std::vector<std::string> ids;
  for (const auto& c : charts) ids.push_back(c["id"]);
  EXPECT_THAT(ids, testing::ElementsAre("loss", "accuracy", "lr", "throughput", "breakdown", "memory", "data_wait",
                                        "utilisation", "grad_norm"));
  // Breakdown: the stacked phases of a window add up to its step time (in ms).
  const auto& bd = charts[4];
  EXPECT_EQ(bd["kind"], "stacked");
  ASSERT_EQ(bd["series"].size(), 6u);
  double sum = 0;
  for (const auto& s : bd["series"]) sum += s["points"][0][1].get<double>();
  EXPECT_NEAR(sum, 1000 * (0.17 + 0.01 * std::sin(1)), 1e-6);
  EXPECT_EQ(charts[1]["series"][1]["points"].size(), 2u) << "test top-1 per epoch";
}

TEST(Report, PageIsSelfContainedAndEscaped) {
  const std::string dir = write_recorded_run("report-html");
  const std::string path = write_report(dir, fake_environment(), "measured here");
  const std::string html = test_util::read_file(path);
  EXPECT_THAT(html, HasSubstr("non-finite loss &lt;in layer1&gt;"));
  EXPECT_THAT(html, HasSubstr("44.8 GFLOP/s &lt;via OpenBLAS&gt;"));
  EXPECT_THAT(html, HasSubstr("name = &quot;resnet20&quot;"));
  EXPECT_THAT(html, HasSubstr("bf16 would help: this CPU supports it"));
  // Nothing is fetched: no external scripts, styles or images (the SVG namespace URI is an identifier).
  for (const char* s : {"<link", "src=", "@import", "url("}) EXPECT_EQ(html.find(s), std::string::npos) << s;
  std::string stripped = std::regex_replace(html, std::regex("http://www.w3.org/2000/svg"), "");
  EXPECT_EQ(stripped.find("http://"), std::string::npos);
  EXPECT_EQ(stripped.find("https://"), std::string::npos);
}

TEST(Report, ShowsKeelTuneTrialsOfTheRunName) {
  const std::string dir = write_recorded_run("report-tune");
  std::filesystem::create_directories(dir + "/tune");
  std::ofstream(dir + "/tune/tune.json") << R"J({"config":"bad.toml","tuned_config":"bad.tuned.toml",)J"
      R"J("start_images_per_second":100.0,"best_images_per_second":250.0,"speedup":2.5,)J"
      R"J("changes":[{"key":"train.micro_batch","value":"0","reason":"keel tune: was 8; trial 2 (memory)"}],)J"
      R"J("trials":[{"group":"start","images_per_second":100.0,"data_wait_share":0.1,"peak_memory_bytes":1e6,)J"
      R"J("resolved_micro_batch":8,"error":"","settings":{"workers":1}},{"group":"memory","images_per_second":0,)J"
      R"J("error":"out of memory <at 1>","settings":{"workers":1}}]})J";
  const std::string html = test_util::read_file(write_report(dir, fake_environment(), "here"));
  EXPECT_THAT(html, HasSubstr("Tuning (keel tune)"));
  EXPECT_THAT(html, HasSubstr("100.0 &rarr; 250.0 images/s (x2.50)"));
  EXPECT_THAT(html, HasSubstr("train.micro_batch = 0 &mdash; keel tune: was 8; trial 2 (memory)"));
  EXPECT_THAT(html, HasSubstr("out of memory &lt;at 1&gt;"));
  EXPECT_THAT(html, HasSubstr("<td>failed</td>"));
  // A hand-edited file with a field of the wrong type: a note in place of the section, the rest of the report kept.
  std::ofstream(dir + "/tune/tune.json") << R"J({"config":7,"trials":"none"})J";
  const std::string bad = test_util::read_file(write_report(dir, fake_environment(), "here"));
  EXPECT_THAT(bad, Not(HasSubstr("Tuning (keel tune)")));
  EXPECT_THAT(bad, HasSubstr("tune/tune.json: a field has an unexpected type, not shown"));
  EXPECT_THAT(bad, HasSubstr("Resolved config"));
}

TEST(Report, ShowsTheInferenceBenchmarkOfTheRunsWeights) {
  const std::string dir = write_recorded_run("report-infer");
  std::filesystem::create_directories(dir + "/bench");
  std::ofstream(dir + "/bench/infer.json") << R"J({"model":"resnet20","size":28,"channels":1,"weights":"checkpoint x",)J"
      R"J("device":"cpu","threads":2,"rounds":1,"latency_iters":5,"batches":[1,32],"settings":[{"setting":"im+fold",)J"
      R"J("latency_ms":{"p50":1.5,"p90":2.0,"p99":2.5,"max":3.0},"images_per_second":{"1":600.0,"32":4100.0},)J"
      R"J("peak_extra_bytes":1048576}]})J";
  std::string html = test_util::read_file(write_report(dir, fake_environment(), "here"));
  EXPECT_THAT(html, HasSubstr("Inference benchmark (keel bench infer)"));
  EXPECT_THAT(html, HasSubstr("<th>batch 32 images/s</th>"));
  EXPECT_THAT(html, HasSubstr("<td class=\"l\">im+fold</td><td>1.5</td><td>2</td><td>2.5</td><td>3</td><td>600</td><td>4100</td>"));
  // A damaged file is a note, not a failed report.
  std::ofstream(dir + "/bench/infer.json") << "[1, 2";
  html = test_util::read_file(write_report(dir, fake_environment(), "here"));
  EXPECT_THAT(html, Not(HasSubstr("Inference benchmark")));
  EXPECT_THAT(html, HasSubstr("bench/infer.json: not a JSON object, not shown"));
  // Valid JSON with a field of the wrong type (settings not an array of objects): a note, not a failed report.
  std::ofstream(dir + "/bench/infer.json") << R"J({"model":"resnet20","batches":[1],"settings":[3]})J";
  html = test_util::read_file(write_report(dir, fake_environment(), "here"));
  EXPECT_THAT(html, Not(HasSubstr("Inference benchmark")));
  EXPECT_THAT(html, HasSubstr("bench/infer.json: a field has an unexpected type, not shown"));
  EXPECT_THAT(html, HasSubstr("Resolved config"));
}

TEST(Report, RendersInHeadlessChromiumWithEveryChartDrawn) {
  if (keel::test::chromium_binary().empty()) {
    GTEST_SKIP() << "chromium is not installed (scripts/setup.sh installs Debian's `chromium`)";
  }
  const std::string dir = write_recorded_run("report-chromium");
  const std::string path = write_report(dir, fake_environment(), "measured here");
  const auto r = keel::test::render_in_chromium(path, dir);
  ASSERT_EQ(r.dom_status, 0) << r.console;
  EXPECT_EQ(r.dom.find("data-report-error=\""), std::string::npos) << "script error: " << r.dom.substr(0, 400);
  EXPECT_EQ(r.console.find("Uncaught"), std::string::npos) << r.console;
  EXPECT_THAT(r.dom, HasSubstr("data-charts-total=\"9\""));
  EXPECT_THAT(r.dom, HasSubstr("data-charts-drawn=\"9\""));
  EXPECT_EQ(keel::test::count_of(r.dom, "data-drawn=\"1\""), 9u);
  // Every series with data became a path with a real outline: 3 loss + 3 accuracy + 1 lr + 2 throughput +
  // 6 breakdown + 3 memory + 2 data wait + 1 utilisation + 1 grad norm.
  std::smatch m;
  size_t paths = 0;
  std::string rest = r.dom;
  const std::regex path_re("<path d=\"M[0-9.]+,[0-9.]+L[^\"]+\" class=\"series");
  for (auto it = std::sregex_iterator(r.dom.begin(), r.dom.end(), path_re); it != std::sregex_iterator(); ++it)
    ++paths;
  EXPECT_EQ(paths, 22u);
  // The screenshot is not blank: a fair part of it is drawn, including the charts' blue.
  ASSERT_EQ(r.shot_status, 0) << r.console;
  ASSERT_GT(r.width, 0);
  size_t ink = 0, blue = 0;
  for (size_t i = 0; i + 2 < static_cast<size_t>(r.width) * r.height * 3; i += 3) {
    const int R = r.rgb[i], G = r.rgb[i + 1], B = r.rgb[i + 2];
    if (R < 235 || G < 235 || B < 235) ++ink;
    if (std::abs(R - 0x33) < 30 && std::abs(G - 0x66) < 30 && std::abs(B - 0xcc) < 30) ++blue;
  }
  const double n = static_cast<double>(r.width) * r.height;
  EXPECT_GT(ink / n, 0.03) << "mostly blank screenshot";
  EXPECT_GT(blue, 200u) << "no chart lines in the screenshot";
}
