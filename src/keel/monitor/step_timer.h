// Per-step time breakdown (data wait, host-to-device, forward, backward, optimizer, other) with
// logging-window, epoch and run aggregates.
#pragma once
#include <array>
#include <chrono>
#include <cstdint>

namespace keel::monitor {

// The parts of one training step, in the order they usually happen.
enum class Phase : int { kDataWait = 0, kH2D, kForward, kBackward, kOptimizer, kOther };
inline constexpr int kNumPhases = 6;

// Short lower-case name for logs and column headers: "data_wait", "h2d", "forward", ...
const char* phase_name(Phase p);

// One measured step: nanoseconds per phase; phase_ns sums to total_ns exactly (other is the remainder).
struct StepSample {
  int64_t total_ns = 0;
  std::array<int64_t, kNumPhases> phase_ns{};
  int64_t images = 0;
};

// Sum of steps (a logging window, an epoch or the whole run) and the figures derived from it.
// Kept in integer nanoseconds so that the phases add up to the step time exactly.
struct StepStats {
  int64_t steps = 0;
  int64_t images = 0;
  int64_t total_ns = 0;
  std::array<int64_t, kNumPhases> phase_ns{};

  void add(const StepSample& s);
  void add(const StepStats& s);
  double total_seconds() const { return total_ns * 1e-9; }
  double phase_seconds(Phase p) const { return phase_ns[static_cast<int>(p)] * 1e-9; }
  double mean_step_seconds() const;           // 0 when no steps
  double mean_phase_seconds(Phase p) const;   // 0 when no steps
  double share(Phase p) const;                // fraction of step time in p; 0 when no time
  double images_per_second() const;           // 0 when no time
};

// Records where each step's time goes using host timestamps only (steady_clock, no device syncs):
//   t.begin_step(); batch = next(); t.mark(Phase::kDataWait); ... t.mark(Phase::kForward); ...
//   t.end_step(batch_images);
// mark(p) attributes the time since the previous mark (or begin_step) to p, the phase that just
// ended; marking a phase twice in a step (micro-batches) accumulates. Time after the last mark
// goes to kOther, so the parts add up to the step exactly.
class StepTimer {
 public:
  using Clock = std::chrono::steady_clock;

  // A disabled timer (monitor.enabled = false) reads no clock and records nothing: only to measure its cost.
  void set_enabled(bool on) { enabled_ = on; }
  bool enabled() const { return enabled_; }

  void begin_step() { if (enabled_) begin_step(Clock::now()); }
  void mark(Phase just_ended) { if (enabled_) mark(just_ended, Clock::now()); }
  const StepSample& end_step(int64_t images) { return enabled_ ? end_step(images, Clock::now()) : last_; }

  // The same with explicit time points (tests, replaying recorded timestamps).
  void begin_step(Clock::time_point now);
  void mark(Phase just_ended, Clock::time_point now);
  const StepSample& end_step(int64_t images, Clock::time_point now);  // returns the finished step

  // Adds a step measured elsewhere (for example from CUDA events) to every aggregate.
  void record(const StepSample& s);

  bool in_step() const { return in_step_; }
  const StepSample& last_step() const { return last_; }
  const StepStats& window() const { return window_; }
  const StepStats& epoch() const { return epoch_; }
  const StepStats& run() const { return run_; }
  StepStats take_window();  // returns the logging window's aggregate and starts a new window
  StepStats take_epoch();   // returns the epoch's aggregate and starts a new epoch (and window)

 private:
  bool enabled_ = true;
  bool in_step_ = false;
  Clock::time_point begin_{};
  Clock::time_point last_mark_{};
  StepSample cur_{};
  StepSample last_{};
  StepStats window_{};
  StepStats epoch_{};
  StepStats run_{};
};

}  // namespace keel::monitor
