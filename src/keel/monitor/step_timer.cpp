// Per-step time breakdown recorder and its aggregates.
#include "keel/monitor/step_timer.h"

#include <stdexcept>

namespace keel::monitor {

const char* phase_name(Phase p) {
  switch (p) {
    case Phase::kDataWait: return "data_wait";
    case Phase::kH2D: return "h2d";
    case Phase::kForward: return "forward";
    case Phase::kBackward: return "backward";
    case Phase::kOptimizer: return "optimizer";
    case Phase::kOther: return "other";
  }
  return "?";
}

void StepStats::add(const StepSample& s) {
  steps += 1;
  images += s.images;
  total_ns += s.total_ns;
  for (int i = 0; i < kNumPhases; ++i) phase_ns[i] += s.phase_ns[i];
}

void StepStats::add(const StepStats& s) {
  steps += s.steps;
  images += s.images;
  total_ns += s.total_ns;
  for (int i = 0; i < kNumPhases; ++i) phase_ns[i] += s.phase_ns[i];
}

double StepStats::mean_step_seconds() const { return steps ? total_seconds() / steps : 0.0; }

double StepStats::mean_phase_seconds(Phase p) const { return steps ? phase_seconds(p) / steps : 0.0; }

double StepStats::share(Phase p) const {
  return total_ns > 0 ? static_cast<double>(phase_ns[static_cast<int>(p)]) / total_ns : 0.0;
}

double StepStats::images_per_second() const { return total_ns > 0 ? images / total_seconds() : 0.0; }

void StepTimer::begin_step(Clock::time_point now) {
  // A misplaced call would silently corrupt every figure after it: fail loudly instead.
  if (in_step_) throw std::logic_error("StepTimer::begin_step: previous step not ended");
  in_step_ = true;
  begin_ = last_mark_ = now;
  cur_ = StepSample{};
}

void StepTimer::mark(Phase just_ended, Clock::time_point now) {
  if (!in_step_) throw std::logic_error(std::string("StepTimer::mark(") + phase_name(just_ended) +
                                        "): no step begun");
  cur_.phase_ns[static_cast<int>(just_ended)] +=
      std::chrono::duration_cast<std::chrono::nanoseconds>(now - last_mark_).count();
  last_mark_ = now;
}

const StepSample& StepTimer::end_step(int64_t images, Clock::time_point now) {
  if (!in_step_) throw std::logic_error("StepTimer::end_step: no step begun");
  in_step_ = false;
  cur_.total_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(now - begin_).count();
  cur_.images = images;
  // Other is the remainder rather than the last interval so that explicit kOther marks and the
  // tail both land there and the parts sum to the total by construction.
  int64_t named = 0;
  for (int i = 0; i < kNumPhases; ++i)
    if (i != static_cast<int>(Phase::kOther)) named += cur_.phase_ns[i];
  cur_.phase_ns[static_cast<int>(Phase::kOther)] = cur_.total_ns - named;
  record(cur_);
  return last_;
}

void StepTimer::record(const StepSample& s) {
  last_ = s;
  window_.add(s);
  epoch_.add(s);
  run_.add(s);
}

StepStats StepTimer::take_window() {
  StepStats w = window_;
  window_ = StepStats{};
  return w;
}

StepStats StepTimer::take_epoch() {
  StepStats e = epoch_;
  epoch_ = StepStats{};
  window_ = StepStats{};
  return e;
}

}  // namespace keel::monitor
