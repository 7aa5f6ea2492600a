// Rule-based bottleneck diagnosis: turns a run's measurements into short, actionable advice.
#pragma once
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "keel/monitor/step_timer.h"

namespace keel::monitor {

// What was measured over an epoch or a run. Unknown quantities stay std::nullopt and the rules
// that need them stay silent.
struct Measurements {
  std::array<double, kNumPhases> share{};     // fraction of step time per phase (StepStats::share)
  int data_workers = 0;                       // loader worker threads (0 = loads on the training thread)
  std::optional<bool> workers_all_busy;       // every worker busy most of the time (no idle waits)
  std::optional<double> utilisation;          // achieved FLOP/s / device peak FLOP/s, in [0, 1]
  std::optional<int64_t> peak_memory_bytes;   // peak allocated during the steps
  std::optional<int64_t> memory_budget_bytes; // the budget (or device capacity) it must fit in
  std::string precision = "fp32";             // train.precision: fp32, bf16 (fp16 on CUDA)
  bool cpu_supports_bf16 = false;             // CPU flags (avx512_bf16 / amx_bf16) say bf16 is fast
  bool on_cuda = false;                       // the step ran on a CUDA device
  bool channels_last = false;                 // train.channels_last
  bool conv_model = true;                     // the model is convolutional (channels_last matters)

  static Measurements from(const StepStats& s);  // fills `share`; the rest stays at defaults
};

// Where each rule switches on; the defaults are documented in docs/monitoring.md.
struct Thresholds {
  double input_bound_share = 0.20;      // data_wait share at or above which the run is input-bound
  double h2d_share = 0.15;              // host-to-device copy share worth acting on
  double compute_share = 0.60;          // forward + backward share at or above which it is compute-bound
  double low_utilisation = 0.25;        // compute-bound below this fraction of peak: kernels too small
  double optimizer_share = 0.20;        // optimizer share worth acting on
  double other_share = 0.15;            // unattributed share (logging, host syncs) worth acting on
  double memory_near_budget = 0.90;     // peak / budget at or above which memory is the limit
};

// One piece of advice: a stable rule id (for tests and docs) and the sentence shown to the user.
struct Advice {
  std::string rule;
  std::string text;
};

// Every rule id diagnose() can return, in its order; each has a section in docs/monitoring.md.
const std::vector<std::string>& bottleneck_rules();

// Applies every rule to `m`; returns advice in a fixed rule order, empty when nothing needs changing.
std::vector<Advice> diagnose(const Measurements& m, const Thresholds& t = {});

}  // namespace keel::monitor
