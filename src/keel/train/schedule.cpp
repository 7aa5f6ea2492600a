// Schedule shapes; golden values in tests/train come from torch.optim.lr_scheduler (OneCycleLR, StepLR,
// MultiStepLR, ExponentialLR, ReduceLROnPlateau, LinearLR chained with each).
#include "keel/train/schedule.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace keel::train {
namespace {
// Cosine interpolation from a (t = 0) to b (t = 1), as OneCycleLR's _annealing_cos.
double cos_anneal(double a, double b, double t) { return b + (a - b) * 0.5 * (1.0 + std::cos(M_PI * t)); }

// The number of decay intervals completed after `step` applied steps (epochs or steps).
int64_t intervals(const ScheduleOptions& o, int64_t step, int64_t steps_per_epoch) {
  if (o.interval == "step") return step;
  if (o.interval != "epoch") {
    throw std::invalid_argument("schedule.interval = '" + o.interval + "' (expected epoch | step)");
  }
  if (steps_per_epoch <= 0) {
    throw std::invalid_argument("schedule.interval = \"epoch\" needs the steps per epoch (got " +
                                std::to_string(steps_per_epoch) + ")");
  }
  return step / steps_per_epoch;
}

// PyTorch's ReduceLROnPlateau ignores reductions smaller than this (its eps argument, default).
constexpr double kPlateauEps = 1e-8;
}  // namespace

double warmup_factor(const ScheduleOptions& o, int64_t step) {
  if (o.warmup_steps <= 0 || step >= o.warmup_steps) return 1.0;
  const double t = static_cast<double>(std::max<int64_t>(step, 0)) / static_cast<double>(o.warmup_steps);
  return o.start_factor + (1.0 - o.start_factor) * t;
}

double lr_factor(const ScheduleOptions& o, int64_t step, int64_t total_steps, int64_t steps_per_epoch) {
  if (o.name == "constant") return 1.0;
  if (o.name == "step" || o.name == "multistep" || o.name == "exponential" || o.name == "reduce_on_plateau") {
    step = std::max<int64_t>(step, 0);
    const double warm = warmup_factor(o, step);
    if (o.name == "reduce_on_plateau") return warm;
    const int64_t k = intervals(o, step, steps_per_epoch);
    if (o.name == "exponential") return warm * std::pow(o.gamma, static_cast<double>(k));
    if (o.name == "step") {
      if (o.step_size <= 0) throw std::invalid_argument("schedule.step_size must be >= 1");
      return warm * std::pow(o.gamma, static_cast<double>(k / o.step_size));
    }
    // multistep: one decay per milestone already reached (a repeated milestone decays twice, as in PyTorch).
    const auto reached = std::count_if(o.milestones.begin(), o.milestones.end(), [k](int64_t m) { return m <= k; });
    return warm * std::pow(o.gamma, static_cast<double>(reached));
  }
  if (total_steps <= 1) return 1.0;
  step = std::clamp<int64_t>(step, 0, total_steps - 1);
  // OneCycleLR: phase 1 ends at step (pct_start * total - 1), phase 2 at (total - 1).
  const double warm_end = std::max(0.0, o.warmup_fraction * static_cast<double>(total_steps) - 1.0);
  const double last = static_cast<double>(total_steps - 1);
  const double s = static_cast<double>(step);
  if (o.name == "onecycle" || o.name == "warmup_cosine") {
    if (s <= warm_end && warm_end > 0) {
      const double t = s / warm_end;
      return o.name == "onecycle" ? cos_anneal(o.start_factor, 1.0, t)
                                  : o.start_factor + (1.0 - o.start_factor) * t;
    }
    const double t = (s - warm_end) / std::max(1.0, last - warm_end);
    return cos_anneal(1.0, o.final_factor, t);
  }
  throw std::invalid_argument("unknown schedule '" + o.name +
                              "' (expected onecycle | warmup_cosine | constant | step | multistep | exponential | "
                              "reduce_on_plateau)");
}

Plateau::Plateau(PlateauOptions o, double base_lr) : o_(std::move(o)), base_lr_(base_lr) {
  if (o_.mode != "min" && o_.mode != "max") {
    throw std::invalid_argument("schedule.plateau_mode = '" + o_.mode + "' (expected min | max)");
  }
  if (o_.threshold_mode != "rel" && o_.threshold_mode != "abs") {
    throw std::invalid_argument("schedule.plateau_threshold_mode = '" + o_.threshold_mode + "' (expected rel | abs)");
  }
  if (!(o_.factor > 0 && o_.factor < 1)) throw std::invalid_argument("schedule.plateau_factor must be in (0, 1)");
  // PyTorch's mode_worse: the first metric always improves on it.
  best_ = o_.mode == "min" ? std::numeric_limits<double>::infinity() : -std::numeric_limits<double>::infinity();
}

// ReduceLROnPlateau.is_better, same four cases.
bool Plateau::is_better(double a) const {
  if (o_.mode == "min") return o_.threshold_mode == "rel" ? a < best_ * (1.0 - o_.threshold) : a < best_ - o_.threshold;
  return o_.threshold_mode == "rel" ? a > best_ * (o_.threshold + 1.0) : a > best_ + o_.threshold;
}

bool Plateau::update(double metric, double current_multiplier) {
  ++epochs_;
  if (is_better(metric)) {
    best_ = metric;
    num_bad_ = 0;
  } else {
    ++num_bad_;
  }
  if (cooldown_counter_ > 0) {
    --cooldown_counter_;
    num_bad_ = 0;  // bad epochs during cooldown are ignored
  }
  if (num_bad_ <= o_.patience) return false;
  // PyTorch's _reduce_lr on the learning rate it would see: base * other multipliers * factor.
  const double scale = base_lr_ * current_multiplier;
  const double old_lr = scale * factor_;
  const double new_lr = std::max(old_lr * o_.factor, o_.min_lr);
  bool reduced = false;
  if (old_lr - new_lr > kPlateauEps && scale > 0) {
    factor_ = new_lr / scale;
    reduced = true;
  }
  cooldown_counter_ = o_.cooldown;
  num_bad_ = 0;
  return reduced;
}

nlohmann::json Plateau::state() const {
  // best may be +-inf before the first epoch; JSON has no infinity, so it is stored with a flag.
  return {{"best", std::isfinite(best_) ? best_ : 0.0}, {"best_set", std::isfinite(best_)},
          {"num_bad_epochs", num_bad_}, {"cooldown_counter", cooldown_counter_},
          {"factor", factor_},          {"epochs", epochs_}};
}

void Plateau::load_state(const nlohmann::json& s) {
  if (s.at("best_set").get<bool>()) {
    best_ = s.at("best").get<double>();
  } else {
    best_ = o_.mode == "min" ? std::numeric_limits<double>::infinity() : -std::numeric_limits<double>::infinity();
  }
  num_bad_ = s.at("num_bad_epochs");
  cooldown_counter_ = s.at("cooldown_counter");
  factor_ = s.at("factor");
  epochs_ = s.at("epochs");
}

Schedule::Schedule(ScheduleOptions o, int64_t total_steps, int64_t steps_per_epoch, double base_lr)
    : o_(std::move(o)), total_steps_(total_steps), steps_per_epoch_(steps_per_epoch), plateau_(o_.plateau, base_lr) {
  lr_factor(o_, 0, total_steps_, steps_per_epoch_);  // reject a bad name or interval now, not at step 1
}

double Schedule::factor(int64_t step) const {
  const double f = lr_factor(o_, step, total_steps_, steps_per_epoch_);
  return uses_metric() ? f * plateau_.factor() : f;
}

bool Schedule::epoch_end(double metric, int64_t steps_done) {
  if (!uses_metric()) return false;
  // The warm-up multiplier in force for the next step is the one PyTorch's lr carries at this point.
  return plateau_.update(metric, warmup_factor(o_, steps_done));
}

nlohmann::json Schedule::state() const { return {{"name", o_.name}, {"plateau", plateau_.state()}}; }

void Schedule::load_state(const nlohmann::json& s) {
  if (s.contains("plateau")) plateau_.load_state(s.at("plateau"));
}

}  // namespace keel::train
