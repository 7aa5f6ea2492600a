// Learning-rate schedules as pure functions of the optimizer-step count.
#pragma once
#include <cstdint>
#include <string>

namespace keel::train {

struct ScheduleOptions {
  std::string name = "onecycle";  // onecycle | warmup_cosine | constant
  double warmup_fraction = 0.15;
  double start_factor = 0.04;
  double final_factor = 0.001;
};

// Multiplier of the peak learning rate at `step` (0-based) of `total_steps`.
// onecycle: cosine rise start->1 then cosine fall 1->final (OneCycleLR's shape);
// warmup_cosine: linear rise start->1 then cosine fall; constant: 1.
double lr_factor(const ScheduleOptions& o, int64_t step, int64_t total_steps);

}  // namespace keel::train
