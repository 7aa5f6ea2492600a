// Schedules: golden values from PyTorch's OneCycleLR (scripts/golden_schedule.py) and shape checks.
#include <gtest/gtest.h>

#include <vector>

#include "keel/train/schedule.h"

using keel::train::lr_factor;
using keel::train::ScheduleOptions;

TEST(Schedule, OneCycleMatchesPyTorch) {
  // /usr/bin/python3 scripts/golden_schedule.py (torch 1.13 OneCycleLR, total 40, pct 0.15)
  const std::vector<double> golden = {0.040000000000000036, 0.1316718427000253, 0.3716718427000253, 0.6683281572999747, 0.9083281572999747, 1.0, 0.9978692210593697, 0.991495063292109, 0.9809319087648232, 0.9662698785874757, 0.9476340640318537, 0.9251834592969423, 0.8991096050264797, 0.8696349541517192, 0.8370109740014554, 0.8015160008714386, 0.7634528653572392, 0.723146308710381, 0.680940212260483, 0.6371946635410055, 0.5922828841493769, 0.5465880455519193, 0.5005, 0.4544119544480807, 0.40871711585062304, 0.3638053364589946, 0.3200597877395171, 0.2778536912896192, 0.2375471346427607, 0.1994839991285615, 0.16398902599854467, 0.13136504584828085, 0.10189039497352037, 0.07581654070305781, 0.05336593596814642, 0.03473012141252433, 0.020068091235176888, 0.009504936707891057, 0.0031307789406302836, 0.001};
  ScheduleOptions o;
  o.name = "onecycle";
  o.warmup_fraction = 0.15;
  o.start_factor = 0.04;
  o.final_factor = 0.001;
  for (size_t i = 0; i < golden.size(); ++i) {
    EXPECT_NEAR(lr_factor(o, static_cast<int64_t>(i), 40), golden[i], 1e-9) << "step " << i;
  }
}

TEST(Schedule, WarmupCosineIsLinearThenFalls) {
  ScheduleOptions o;
  o.name = "warmup_cosine";
  o.warmup_fraction = 0.1;
  o.start_factor = 0.0;
  o.final_factor = 0.0;
  // warm-up ends at step 0.1 * 101 - 1 = 9.1
  EXPECT_NEAR(lr_factor(o, 0, 101), 0.0, 1e-12);
  EXPECT_NEAR(lr_factor(o, 1, 101) * 2, lr_factor(o, 2, 101), 1e-12);  // linear
  EXPECT_NEAR(lr_factor(o, 100, 101), 0.0, 1e-12);
  double prev = 2;
  for (int s = 10; s < 101; ++s) {
    const double f = lr_factor(o, s, 101);
    EXPECT_LE(f, prev);
    prev = f;
  }
}

TEST(Schedule, ConstantAndEdgeCases) {
  ScheduleOptions o;
  o.name = "constant";
  EXPECT_EQ(lr_factor(o, 5, 10), 1.0);
  o.name = "onecycle";
  EXPECT_EQ(lr_factor(o, 0, 1), 1.0);             // a one-step run uses the peak
  EXPECT_NEAR(lr_factor(o, 1000, 10), o.final_factor, 1e-12);  // past the end: clamped
  o.name = "bogus";
  EXPECT_THROW(lr_factor(o, 0, 10), std::invalid_argument);
}
