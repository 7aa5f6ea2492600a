// Profiler tables and traces from given events: inclusive/self time per operator, sort order, trace format,
// and the --profile-steps syntax.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "keel/monitor/profiler.h"

using testing::HasSubstr;
using namespace keel::monitor;

TEST(Profiler, ParsesStepRangesAndNamesBadOnes) {
  ProfileRange r = parse_profile_steps("2:3");
  EXPECT_EQ(r.first, 2);
  EXPECT_EQ(r.last, 3);
  r = parse_profile_steps("7");
  EXPECT_EQ(r.first, 7);
  EXPECT_EQ(r.last, 7);
  for (const char* bad : {"3:2", "0:1", "a:b", "1:", ":2", "-1:2", ""}) {
    try {
      parse_profile_steps(bad);
      ADD_FAILURE() << bad << " accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_THAT(e.what(), HasSubstr(std::string("--profile-steps '") + bad + "'"));
    }
  }
}

TEST(Profiler, TableHasInclusiveAndSelfTimeSortedByTotal) {
  // Thread 1: conv2d [0, 100) calls convolution [10, 90) which calls mkldnn [20, 80); then addmm [100, 130).
  // Thread 2: an addmm [0, 40) of its own.
  std::vector<OpEvent> ev = {{"aten::conv2d", 0, 100, 1},      {"aten::convolution", 10, 80, 1},
                             {"aten::mkldnn_conv", 20, 60, 1}, {"aten::addmm", 100, 30, 1},
                             {"aten::addmm", 0, 40, 2}};
  auto t = op_table(ev);
  ASSERT_EQ(t.size(), 4u);
  EXPECT_EQ(t[0].name, "aten::conv2d");
  EXPECT_EQ(t[0].total_ns, 100u);
  EXPECT_EQ(t[0].self_ns, 20u);
  EXPECT_EQ(t[1].name, "aten::convolution");
  EXPECT_EQ(t[1].self_ns, 20u);
  EXPECT_EQ(t[2].name, "aten::addmm");
  EXPECT_EQ(t[2].calls, 2);
  EXPECT_EQ(t[2].total_ns, 70u);
  EXPECT_EQ(t[2].self_ns, 70u) << "the other thread's addmm is not a child of conv2d";
  EXPECT_EQ(t[3].name, "aten::mkldnn_conv");
  EXPECT_EQ(t[3].self_ns, 60u);
  const std::string text = format_op_table(t);
  EXPECT_THAT(text, HasSubstr("operator"));
  EXPECT_LT(text.find("aten::conv2d"), text.find("aten::mkldnn_conv"));

  const nlohmann::json tr = chrome_trace({{"ProfilerStep#2", 1000, 5000, 1}, {"aten::addmm", 2000, 1500, 1}});
  ASSERT_EQ(tr["traceEvents"].size(), 2u);
  EXPECT_EQ(tr["traceEvents"][0]["cat"], "step");
  EXPECT_EQ(tr["traceEvents"][1]["ph"], "X");
  EXPECT_DOUBLE_EQ(tr["traceEvents"][1]["ts"].get<double>(), 1.0) << "microseconds from the first event";
  EXPECT_DOUBLE_EQ(tr["traceEvents"][1]["dur"].get<double>(), 1.5);
}
