// The optimizer step, in the one place its order is enforced:
//   (micro-batches: autocast forward -> scaled loss -> backward) -> unscale -> non-finite check
//   -> clip -> optimizer step -> scaler update -> step counter / schedule -> EMA
// plus the non-finite guard (skip, roll back, lower the learning rate, stop with a report).
#pragma once
#include <ATen/ATen.h>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/optim/optimizer.h>

#include "keel/models/net.h"
#include "keel/monitor/step_timer.h"
#include "keel/train/locator.h"
#include "keel/train/loss_scaler.h"
#include "keel/train/precision.h"
#include "keel/dist/sync.h"

namespace keel::train {

using dist::StepSync;

class Ema;

struct GuardOptions {
  bool enabled = true;
  int64_t max_consecutive_skips = 3;  // K: after K skipped steps in a row, roll back
  int64_t max_rollbacks = 5;          // R: after R rollbacks, stop with a report
  double lr_factor = 0.5;             // learning rate multiplier applied at each rollback
  int64_t snapshot_every = 50;        // applied steps between in-memory snapshots
  bool locate = true;                 // on a skip, re-run the batch instrumented to name the module
                                      // (for a loss spike: the first module whose output grew most)
  double spike_factor = 10.0;         // also skip a finite loss above this x its running mean (0 = off)
  int64_t spike_warmup = 20;          // applied steps before the spike check starts
};

struct StepOptions {
  Precision precision = Precision::kFp32;
  bool channels_last = false;
  int64_t micro_batch = 0;         // samples per forward/backward; 0 = the whole batch
  bool oom_recovery = true;        // on out-of-memory: halve the micro-batch and replay the batch
  double label_smoothing = 0.0;
  double clip_norm = 0.0;          // global L2 norm clip; 0 = off
  double clip_value = 0.0;         // element-wise clip; 0 = off
  std::vector<double> group_lr_factors;  // per parameter group lr multiplier (empty = all 1), see group_lr_factors()
  LossScalerOptions scaler;        // off unless the caller turns it on (fp16, amp.scaler = "on")
  GuardOptions guard;
  InjectOptions inject;
};

// One thing the non-finite guard did during a step (also kept in StepRunner::events()).
struct GuardEvent {
  std::string kind;     // "skip" | "rollback"
  std::string message;  // human-readable: the step, the reason, where it started / what was restored
};

// What one call of StepRunner::run did. Tensors are 0-dim and not read back (no sync) unless
// the step was skipped (the guard needs to know, which is the step's one host sync).
struct StepResult {
  bool applied = false;     // false: skipped (non-finite, a loss spike, or a loss-scale overflow)
  bool overflow = false;    // skipped by the loss scaler: finite loss, inf/NaN gradients at this scale (the
                            // scale backed off; not a guard skip: no locator, no rollback)
  at::Tensor loss;          // mean loss over the batch (double)
  at::Tensor correct;       // top-1 hits (long)
  at::Tensor grad_norm;     // global gradient norm before clipping (float)
  int64_t samples = 0;
  double lr = 0;            // learning rate used (of group 0; group i uses lr x group_lr_factors[i])
  std::vector<GuardEvent> guard;    // what the guard did, in order: a skip, then a rollback if it caused one
  std::vector<std::string> notes;  // e.g. an out-of-memory recovery during this step
  bool stop = false;        // data-parallel: some rank asked to stop (Ctrl-C) before this step's agreement
};

// Thrown when the guard gives up (R rollbacks exhausted); what() is the full report.
class TrainingDiverged : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Runs optimizer steps on batches. Owns the applied-step counter that the schedule reads, so a
// skipped step advances neither the schedule, the EMA, nor the counter.
class StepRunner {
 public:
  // lr_at(step) gives the scheduled learning rate for the 0-based applied-step count.
  StepRunner(models::Net& model, torch::optim::Optimizer& opt, StepOptions o,
             std::function<double(int64_t)> lr_at, Ema* ema = nullptr,
             monitor::StepTimer* timer = nullptr);

  // One optimizer step on (x, y): x float (N, C, H, W) already augmented/normalised, y long (N) class
  // indices or float (N, K) class probabilities (mixup/cutmix soft targets).
  StepResult run(const at::Tensor& x, const at::Tensor& y);

  int64_t steps() const { return steps_; }          // applied steps so far
  int64_t skipped() const { return skipped_total_; }  // guard skips (loss-scale overflows not counted)
  int64_t overflows() const { return overflows_; }    // steps the loss scaler skipped (gradient overflow)
  int64_t rollbacks() const { return rollbacks_; }
  int64_t micro_batch() const { return o_.micro_batch; }  // resolved (shrinks after an OOM); 0 = whole batch
  void set_micro_batch(int64_t m) { o_.micro_batch = m; }  // 0 = whole batch (the planner's trials)
  // Data-parallel training (null = one process): gradients are reduced over ranks after the last
  // micro-batch, and every decision of the step (an out-of-memory replay, a skip) is agreed by all ranks.
  // StepResult's loss, correct and samples are then over the global batch.
  // stop_probe (optional): whether this rank was asked to stop (Ctrl-C); it rides in the agreement, so every
  // rank learns it in the same step (StepResult::stop) and all stop after the same step.
  void set_sync(StepSync* s, std::function<bool()> stop_probe = {}) {
    sync_ = s;
    stop_probe_ = std::move(stop_probe);
  }
  int64_t oom_recoveries() const { return oom_recoveries_; }
  const LossScaler& scaler() const { return scaler_; }
  const std::vector<std::string>& events() const { return events_; }  // guard log, human-readable

  nlohmann::json state() const;  // counters, lr scale, scaler (for checkpoints)
  void load_state(const nlohmann::json& s);

 private:
  // The training state a rollback returns to: everything the applied steps changed (the loss scaler is
  // deliberately not in it: a rollback keeps the current, backed-off scale).
  struct Snapshot {
    std::vector<at::Tensor> params, buffers, ema_params, ema_buffers;
    std::string optimizer;
    int64_t step = 0;
    int64_t healthy_steps = 0;
    double loss_ema = 0;
  };
  // The step's phases, in the order run() calls them:
  // BatchNorm statistics into buffer_backup_ (what a skipped or replayed step puts back).
  void backup_buffers();
  // forward + backward over micro-batches with the out-of-memory replay (train/oom_replay.h) and, data-parallel,
  // the step's agreement; leaves r.loss the batch's mean loss (global batch when data-parallel), r.correct, notes.
  void forward_backward_replayed(const at::Tensor& x, const at::Tensor& y, bool inject, StepResult& r);
  // A non-finite or spiking step the guard skips: its message (located), and a rollback after
  // guard.max_consecutive_skips in a row, or the stop with the guard log after guard.max_rollbacks.
  void guard_skip(const at::Tensor& x, const at::Tensor& y, int64_t attempt, bool spike, bool loss_finite,
                  double loss_value, StepResult& r);
  // forward + backward over micro-batches; accumulates loss/correct.
  // sync: reduce the gradients over ranks after the last micro-batch (null: local gradients only).
  void forward_backward(const at::Tensor& x, const at::Tensor& y, bool inject_loss, models::Watcher* watcher,
                        at::Tensor& loss_sum, at::Tensor& correct, StepSync* sync);
  std::string locate(const at::Tensor& x, const at::Tensor& y);
  // Inside the catch of a diagnostic replay (locate / locate_spike) that the caller has already undone: an
  // out-of-memory error does not end the run, it becomes the location's text ("not located (out of memory
  // ...)"); anything else is rethrown.
  std::string replay_out_of_memory(const std::exception& e);
  void maybe_inject_replay_oom() const;  // InjectOptions::oom_replay_steps
  // The stop when the loss scaler's backoffs took the scale below LossScalerOptions::min_scale: divergence, named.
  [[noreturn]] void scale_collapsed(const at::Tensor& x, const at::Tensor& y, int64_t attempt);
  // For a finite loss spike: the first module whose output grew by more than guard.spike_factor
  // between the last good (snapshot) weights and the current ones, on this batch.
  std::string locate_spike(const at::Tensor& x);
  // The current parameters, optimizer, EMA and counters; BatchNorm statistics from buffers_before when given
  // (the step's copy from before its forward, which has already updated the model's).
  void take_snapshot(const std::vector<at::Tensor>* buffers_before = nullptr);
  void restore_snapshot();

  models::Net& model_;
  torch::optim::Optimizer& opt_;
  StepOptions o_;
  std::function<double(int64_t)> lr_at_;
  Ema* ema_;
  monitor::StepTimer* timer_;
  StepSync* sync_ = nullptr;
  std::function<bool()> stop_probe_;
  LossScaler scaler_;
  at::Device device_{at::kCPU};  // where the parameters live (the training device)
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> buffer_backup_;  // BN statistics before this step's forward
  int64_t oom_recoveries_ = 0;
  std::vector<int64_t> oom_injected_;
  int64_t steps_ = 0, attempts_ = 0, consecutive_skips_ = 0, skipped_total_ = 0, rollbacks_ = 0;
  int64_t overflows_ = 0, consecutive_overflows_ = 0;  // loss-scaler skips: in all, and in a row
  double lr_scale_ = 1.0;
  double loss_ema_ = 0.0;      // running mean of applied steps' loss (spike check)
  int64_t healthy_steps_ = 0;
  std::optional<Snapshot> snapshot_;
  std::vector<std::string> events_;
};

// Gradient clipping as PyTorch users write it: clip_grad_value_(clip_value) first (when > 0), then
// clip_grad_norm_(clip_norm) over the clamped gradients (when > 0). In place; no host sync. `norm`: the
// gradients' global L2 norm when the caller has it (used only when no value clamp changed them).
void clip_gradients(const std::vector<at::Tensor>& grads, double clip_value, double clip_norm,
                    const at::Tensor& norm = {});

// Cross-entropy forward of `model` under the precision's autocast (bf16 on CPU); logits fp32.
at::Tensor forward_logits(models::Net& model, const at::Tensor& x, Precision precision);

}  // namespace keel::train
