// The training engine's epoch: batch -> upload -> augmentation (and mixing) -> layout -> StepRunner::run, with
// the epoch's sums kept on the device and read back only on logging steps. It reads no config and writes no
// file: what a run does around its steps (logs, progress, checkpoints, profiling, stopping) comes in through
// EpochHooks, supplied by the composition root (run/fit.cpp).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <optional>

#include "keel/data/augment.h"
#include "keel/data/loader.h"
#include "keel/device/device.h"
#include "keel/models/net.h"
#include "keel/monitor/step_timer.h"
#include "keel/train/step.h"

namespace keel::train {

struct EpochOptions {
  int64_t total_steps = 0;     // the run ends after this many applied steps
  int64_t per_epoch = 0;       // batches per epoch
  bool channels_last = false;  // the step's inputs in channels-last layout
  int64_t log_every = 0;       // applied steps between logging read-backs (and the run's last step); 0 = none
  // Data-parallel (world_size > 1): the augmentation stream is reseeded for every batch from (seed, rank,
  // global batch index), so that a resumed run draws what the uninterrupted one would have on every rank.
  uint64_t seed = 0;
  int64_t rank = 0, world_size = 1;
};

// The running sums of an epoch's applied steps, read back (what a checkpoint keeps).
struct HostSums {
  double loss_sum = 0;  // the loss summed over samples
  int64_t correct = 0;  // top-1 hits
  int64_t seen = 0;     // samples
};

// The same sums on the training device, where the steps add to them without a host sync.
struct EpochSums {
  at::Tensor loss_sum;  // double, 0-dim
  at::Tensor correct;   // long, 0-dim
  int64_t seen = 0;
  HostSums host() const;  // reads both back (a host sync)
};

// A logging step's read-back: the window since the previous one.
struct LogWindow {
  monitor::StepStats stats;  // the step timer's window
  double loss = 0;           // mean of the window's step losses
  double grad_norm = 0;      // the last step's gradient norm (before clipping)
};

// An applied step, as the hooks see it.
struct AppliedStep {
  int64_t epoch = 0;           // 0-based
  int64_t step = 0;            // applied steps so far (this one included)
  int64_t batch_in_epoch = 0;  // batches consumed in the epoch (this one included)
  double lr = 0;
  bool stop = false;           // data-parallel: some rank asked to stop (Ctrl-C), agreed in this step
  std::optional<LogWindow> window;  // on logging steps
};

struct EpochHooks {
  std::function<void(int64_t next_step)> before_step;  // before the batch is fetched (profiler)
  // Every attempt, applied or skipped, with its batch (sample ids, out-of-memory notes, guard events).
  std::function<void(int64_t epoch, const data::Batch& batch, const StepResult& r)> after_attempt;
  // After each applied step (logs, progress, checkpoints); returns true to leave the run now (interrupted).
  std::function<bool(const AppliedStep& s, const EpochSums& sums)> after_applied;
};

struct EpochOutcome {
  EpochSums sums;
  bool interrupted = false;  // after_applied asked to leave
  double seconds = 0;        // wall time of the epoch's loop, the loader's stop included
};

// Runs epoch `epoch` until the loader is exhausted, the runner reaches options.total_steps, or a hook leaves.
// resume_batches > 0 (a resumed run's first epoch): that many batches are skipped (the order is a pure function
// of the seed and the epoch, so this puts the loader where the checkpoint was taken) and the sums start from
// `resumed`.
EpochOutcome run_epoch(models::Net& model, StepRunner& runner, data::Loader& loader, data::DeviceAugment& aug,
                       device::Uploader& upload, monitor::StepTimer& timer, const EpochOptions& options,
                       int64_t epoch, int64_t resume_batches, const HostSums& resumed, const EpochHooks& hooks);

}  // namespace keel::train
