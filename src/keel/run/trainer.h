// Trainer: the composition root of one training run. It reads the config (through compose.h), connects the
// data-parallel ranks, builds the datasets, model and optimizer, and fit() tells the story of the run:
// restore -> plan -> loop -> finish (the phases are Fit's, run/fit.h).
#pragma once
#include <memory>
#include <optional>
#include <vector>
#include <string>

#include <nlohmann/json.hpp>

#include "keel/config/config.h"
#include "keel/data/dataset.h"
#include "keel/models/net.h"
#include "keel/monitor/profiler.h"
#include "keel/run/compose.h"
#include "keel/train/evaluate.h"
#include "keel/train/schedule.h"

namespace torch::optim {
class Optimizer;
}
namespace keel::dist {
class Comm;
class SyncBatchNorm;
}

namespace keel::run {

using train::EvalResult;
class Fit;

// The outcome of fit().
struct FitResult {
  EvalResult test;
  double train_loss = 0;     // mean over the last epoch
  double train_top1 = 0;
  int64_t steps = 0;
  int64_t epochs = 0;
  double train_seconds = 0;  // wall time of the training loop (evaluation excluded)
  double wall_seconds = 0;   // whole fit(), evaluation included
  double images_per_second = 0;  // training samples / train_seconds
  double data_wait_share = 0;    // fraction of training time spent waiting for batches
  std::string run_dir;
  std::string checkpoint;        // final weights, or empty
  int64_t skipped_steps = 0;     // non-finite steps the guard skipped
  int64_t scaler_overflows = 0;  // steps the loss scaler skipped (gradient overflow; the scale backed off)
  int64_t rollbacks = 0;
  int64_t oom_recoveries = 0;    // out-of-memory errors recovered by shrinking the micro-batch
  int64_t micro_batch = 0;       // resolved micro-batch at the end of the run
  int64_t peak_memory_bytes = 0; // peak CPU bytes allocated (keel's allocator)
  std::vector<std::string> advice;  // bottleneck diagnosis of the whole run
  std::vector<std::string> guard_events;
  bool early_stopped = false;
  bool interrupted = false;      // stopped by debug.stop_after_steps or Ctrl-C (util::stop_requested())
  nlohmann::json breakdown_seconds;  // per phase: training-step seconds summed over the run (step timer)
  nlohmann::json dist;               // data-parallel runs: world size and communication statistics
  int64_t best_epoch = 0;        // with early stopping: the epoch whose weights were kept
  std::optional<EvalResult> ema_test;
  nlohmann::json to_json() const;
};

class Trainer {
 public:
  explicit Trainer(config::Config cfg);
  ~Trainer();
  // Trains for train.epochs (or train.max_steps), evaluating on the test split after each epoch;
  // writes metrics.jsonl and, when asked, the final checkpoint under the run directory.
  // resume: "" (fresh), "auto" (newest valid checkpoint of the run directory, if any) or a
  // checkpoint directory.
  FitResult fit(const std::string& resume = "");

  const std::string& run_dir() const { return run_dir_; }
  // Records these steps with LibTorch's profiler (`keel train --profile-steps A:B`); files go to the run dir.
  void set_profile_steps(monitor::ProfileRange r) { profile_ = r; }
  models::NetPtr model() const { return model_; }
  int64_t rank() const { return rank_; }
  int64_t world_size() const { return world_; }

 private:
  friend class Fit;  // one fit() call's phases (run/fit.h)
  config::Config cfg_;
  std::string run_dir_;
  std::shared_ptr<const data::Dataset> train_set_, test_set_;
  models::NetPtr model_;
  at::Device device_{at::kCPU};  // resolved run.device
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
  train::ScheduleOptions schedule_;
  double lr_ = 0;                       // optim.lr after optim.lr_scaling (the resolved peak rate)
  std::vector<double> group_lr_factors_;  // per parameter group lr multiplier
  monitor::ProfileRange profile_;         // off unless set_profile_steps()
  // Data-parallel training (RANK/WORLD_SIZE from the launcher): this rank's connection; null for one process.
  int64_t rank_ = 0, world_ = 1;
  std::unique_ptr<dist::Comm> comm_;
  std::unique_ptr<dist::SyncBatchNorm> sync_bn_;
};

}  // namespace keel::run
