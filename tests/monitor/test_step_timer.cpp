// StepTimer: phases attributed by marks, other as the exact remainder, window/epoch/run aggregates.
#include <gtest/gtest.h>

#include <chrono>

#include "keel/monitor/step_timer.h"

using namespace keel::monitor;
using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using TP = StepTimer::Clock::time_point;

namespace {

int64_t ns(const StepSample& s, Phase p) { return s.phase_ns[static_cast<int>(p)]; }

// Replays one step with the given phase lengths in ms (data, h2d, fwd, bwd, opt) and `tail` ms after.
TP replay(StepTimer& t, TP t0, int data, int h2d, int fwd, int bwd, int opt, int tail, int64_t images) {
  TP now = t0;
  t.begin_step(now);
  t.mark(Phase::kDataWait, now += milliseconds(data));
  t.mark(Phase::kH2D, now += milliseconds(h2d));
  t.mark(Phase::kForward, now += milliseconds(fwd));
  t.mark(Phase::kBackward, now += milliseconds(bwd));
  t.mark(Phase::kOptimizer, now += milliseconds(opt));
  t.end_step(images, now += milliseconds(tail));
  return now;
}

}  // namespace

TEST(StepTimer, PhaseNames) {
  EXPECT_STREQ(phase_name(Phase::kDataWait), "data_wait");
  EXPECT_STREQ(phase_name(Phase::kH2D), "h2d");
  EXPECT_STREQ(phase_name(Phase::kForward), "forward");
  EXPECT_STREQ(phase_name(Phase::kBackward), "backward");
  EXPECT_STREQ(phase_name(Phase::kOptimizer), "optimizer");
  EXPECT_STREQ(phase_name(Phase::kOther), "other");
}

TEST(StepTimer, MarksAttributeTheTimeSinceThePreviousMark) {
  StepTimer t;
  replay(t, TP{}, 3, 1, 5, 8, 2, 1, 128);
  const StepSample& s = t.last_step();
  EXPECT_EQ(s.total_ns, 20'000'000);
  EXPECT_EQ(ns(s, Phase::kDataWait), 3'000'000);
  EXPECT_EQ(ns(s, Phase::kH2D), 1'000'000);
  EXPECT_EQ(ns(s, Phase::kForward), 5'000'000);
  EXPECT_EQ(ns(s, Phase::kBackward), 8'000'000);
  EXPECT_EQ(ns(s, Phase::kOptimizer), 2'000'000);
  EXPECT_EQ(ns(s, Phase::kOther), 1'000'000);
  EXPECT_EQ(s.images, 128);
}

TEST(StepTimer, RepeatedPhasesAccumulateAndExplicitOtherJoinsTheTail) {
  // Two micro-batches (forward/backward twice), a logging pause marked as other, then a tail.
  StepTimer t;
  TP now{};
  t.begin_step(now);
  t.mark(Phase::kDataWait, now += milliseconds(2));
  for (int i = 0; i < 2; ++i) {
    t.mark(Phase::kForward, now += milliseconds(4));
    t.mark(Phase::kBackward, now += milliseconds(6));
  }
  t.mark(Phase::kOther, now += milliseconds(3));
  t.mark(Phase::kOptimizer, now += milliseconds(1));
  const StepSample& s = t.end_step(64, now += milliseconds(2));
  EXPECT_EQ(ns(s, Phase::kForward), 8'000'000);
  EXPECT_EQ(ns(s, Phase::kBackward), 12'000'000);
  EXPECT_EQ(ns(s, Phase::kOther), 5'000'000);
  EXPECT_EQ(ns(s, Phase::kH2D), 0);
  EXPECT_EQ(s.total_ns, 28'000'000);
}

TEST(StepTimer, PartsAddUpToTheStepExactlyWithTheRealClock) {
  StepTimer t;
  volatile double sink = 0;
  for (int step = 0; step < 20; ++step) {
    t.begin_step();
    for (Phase p : {Phase::kDataWait, Phase::kH2D, Phase::kForward, Phase::kBackward, Phase::kOptimizer}) {
      for (int i = 0; i < 1000 * (static_cast<int>(p) + 1); ++i) sink = sink + i;
      t.mark(p);
    }
    t.end_step(32);
    int64_t sum = 0;
    for (int64_t v : t.last_step().phase_ns) {
      EXPECT_GE(v, 0);
      sum += v;
    }
    EXPECT_EQ(sum, t.last_step().total_ns);
  }
  int64_t sum = 0;
  for (int64_t v : t.run().phase_ns) sum += v;
  EXPECT_EQ(sum, t.run().total_ns);
  EXPECT_EQ(t.run().steps, 20);
  EXPECT_EQ(t.run().images, 640);
}

TEST(StepTimer, AggregatesMeansSharesAndThroughput) {
  StepTimer t;
  TP now{};
  now = replay(t, now, 3, 1, 5, 8, 2, 1, 100);  // 20 ms
  now = replay(t, now, 13, 1, 5, 8, 2, 1, 100); // 30 ms
  const StepStats& w = t.window();
  EXPECT_EQ(w.steps, 2);
  EXPECT_EQ(w.images, 200);
  EXPECT_DOUBLE_EQ(w.total_seconds(), 0.050);
  EXPECT_DOUBLE_EQ(w.mean_step_seconds(), 0.025);
  EXPECT_DOUBLE_EQ(w.mean_phase_seconds(Phase::kDataWait), 0.008);
  EXPECT_DOUBLE_EQ(w.share(Phase::kDataWait), 16.0 / 50.0);
  EXPECT_DOUBLE_EQ(w.share(Phase::kBackward), 16.0 / 50.0);
  EXPECT_DOUBLE_EQ(w.images_per_second(), 200 / 0.050);
  double shares = 0;
  for (int i = 0; i < kNumPhases; ++i) shares += w.share(static_cast<Phase>(i));
  EXPECT_NEAR(shares, 1.0, 1e-12);
}

TEST(StepTimer, WindowsAndEpochsResetIndependently) {
  StepTimer t;
  TP now{};
  now = replay(t, now, 1, 1, 1, 1, 1, 1, 10);
  now = replay(t, now, 1, 1, 1, 1, 1, 1, 10);
  StepStats w1 = t.take_window();
  EXPECT_EQ(w1.steps, 2);
  EXPECT_EQ(t.window().steps, 0);
  now = replay(t, now, 1, 1, 1, 1, 1, 1, 10);
  EXPECT_EQ(t.window().steps, 1);
  EXPECT_EQ(t.epoch().steps, 3);
  StepStats e1 = t.take_epoch();
  EXPECT_EQ(e1.steps, 3);
  EXPECT_EQ(e1.images, 30);
  EXPECT_EQ(t.epoch().steps, 0);
  EXPECT_EQ(t.window().steps, 0);
  now = replay(t, now, 1, 1, 1, 1, 1, 1, 10);
  EXPECT_EQ(t.run().steps, 4);
  EXPECT_EQ(t.run().total_ns, 4 * 6'000'000);
}

TEST(StepTimer, EmptyAggregatesAreZeroNotNan) {
  StepStats s;
  EXPECT_EQ(s.mean_step_seconds(), 0.0);
  EXPECT_EQ(s.share(Phase::kForward), 0.0);
  EXPECT_EQ(s.images_per_second(), 0.0);
}

TEST(StepTimer, RecordAddsAStepMeasuredElsewhere) {
  StepTimer t;
  StepSample s;
  s.total_ns = 10;
  s.phase_ns = {1, 2, 3, 2, 1, 1};
  s.images = 4;
  t.record(s);
  EXPECT_EQ(t.run().phase_ns[2], 3);
  EXPECT_EQ(t.epoch().images, 4);
  EXPECT_EQ(t.last_step().total_ns, 10);
}

TEST(StepTimer, MisuseThrows) {
  StepTimer t;
  EXPECT_THROW(t.mark(Phase::kForward), std::logic_error);
  EXPECT_THROW(t.end_step(1), std::logic_error);
  t.begin_step();
  EXPECT_TRUE(t.in_step());
  EXPECT_THROW(t.begin_step(), std::logic_error);
  t.end_step(1);
  EXPECT_FALSE(t.in_step());
}
