// Learning-rate schedules as pure functions of the optimizer-step count, plus the one stateful
// schedule (reduce-on-plateau) whose state is saved in checkpoints.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace keel::train {

// ReduceLROnPlateau's settings (torch.optim.lr_scheduler.ReduceLROnPlateau's meaning).
struct PlateauOptions {
  std::string mode = "min";            // min | max (resolved; "auto" is decided by the caller)
  double factor = 0.1;                 // lr multiplier at each reduction
  int64_t patience = 10;               // bad epochs tolerated before a reduction
  double threshold = 1e-4;             // what counts as an improvement, see threshold_mode
  std::string threshold_mode = "rel";  // rel: beat best * (1 -/+ threshold); abs: best -/+ threshold
  int64_t cooldown = 0;                // epochs after a reduction in which bad epochs are not counted
  double min_lr = 0.0;                 // floor of the (decay group's) learning rate, absolute
};

struct ScheduleOptions {
  // onecycle | warmup_cosine | constant | step | multistep | exponential | reduce_on_plateau
  std::string name = "onecycle";
  double warmup_fraction = 0.15;  // onecycle / warmup_cosine: share of all steps warming up
  double start_factor = 0.04;     // factor at step 0 (every warm-up)
  double final_factor = 0.001;    // onecycle / warmup_cosine: factor at the last step
  int64_t warmup_steps = 0;       // step family and reduce_on_plateau: linear warm-up in optimizer steps
  std::string interval = "epoch";  // epoch | step: unit of step_size, milestones and exponential's gamma
  int64_t step_size = 30;          // step: decay every step_size intervals
  std::vector<int64_t> milestones;  // multistep: decay at these interval counts
  double gamma = 0.1;              // step / multistep / exponential: decay multiplier
  PlateauOptions plateau;
};

// Multiplier of the peak learning rate at `step` (0-based applied-step count) of `total_steps`.
// onecycle: cosine rise start->1 then cosine fall 1->final (OneCycleLR's shape);
// warmup_cosine: linear rise start->1 then cosine fall; constant: 1.
// step / multistep / exponential: gamma^k with k from the interval count (epochs = step / steps_per_epoch,
// or steps), times the linear warm-up start_factor -> 1 over warmup_steps (ChainedScheduler's product).
// reduce_on_plateau: the warm-up factor only (the plateau factor is state, see Schedule).
// steps_per_epoch is needed (> 0) only for interval = "epoch" of the step family.
double lr_factor(const ScheduleOptions& o, int64_t step, int64_t total_steps, int64_t steps_per_epoch = 0);

// Linear warm-up multiplier start_factor -> 1 over warmup_steps (LinearLR's values); 1 after it.
double warmup_factor(const ScheduleOptions& o, int64_t step);

// ReduceLROnPlateau's rule on a factor of a base learning rate, with the state PyTorch keeps.
class Plateau {
 public:
  explicit Plateau(PlateauOptions o, double base_lr = 1.0);
  // One epoch's metric. `current_multiplier` is what else scales the base lr right now (warm-up),
  // so min_lr and PyTorch's eps test see the same learning rate PyTorch would. True = reduced.
  bool update(double metric, double current_multiplier = 1.0);
  double factor() const { return factor_; }  // current plateau multiplier of the base lr
  double best() const { return best_; }
  int64_t num_bad_epochs() const { return num_bad_; }
  int64_t cooldown_counter() const { return cooldown_counter_; }

  nlohmann::json state() const;
  void load_state(const nlohmann::json& s);

 private:
  bool is_better(double a) const;
  PlateauOptions o_;
  double base_lr_;
  double best_;
  int64_t num_bad_ = 0, cooldown_counter_ = 0, epochs_ = 0;
  double factor_ = 1.0;
};

// The run's schedule: the pure lr_factor plus the plateau state; what the StepRunner's lr_at reads.
class Schedule {
 public:
  // base_lr: the resolved (batch-scaled) peak lr, used only to turn plateau.min_lr into a factor.
  Schedule(ScheduleOptions o, int64_t total_steps, int64_t steps_per_epoch, double base_lr);
  double factor(int64_t step) const;  // multiplier of the base lr at the 0-based applied step
  bool uses_metric() const { return o_.name == "reduce_on_plateau"; }
  // At an epoch's end, after `steps_done` applied steps: feeds the monitored metric to the plateau
  // rule (no-op for the other schedules). True = the lr was reduced.
  bool epoch_end(double metric, int64_t steps_done);
  const Plateau& plateau() const { return plateau_; }
  const ScheduleOptions& options() const { return o_; }

  nlohmann::json state() const;
  void load_state(const nlohmann::json& s);

 private:
  ScheduleOptions o_;
  int64_t total_steps_, steps_per_epoch_;
  Plateau plateau_;
};

}  // namespace keel::train
