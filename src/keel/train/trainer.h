// Trainer: owns data, model, optimizer, schedule and logs of one run, and drives epochs.
#pragma once
#include <memory>
#include <optional>
#include <vector>
#include <string>

#include <nlohmann/json.hpp>

#include "keel/config/config.h"
#include "keel/data/augment.h"
#include "keel/data/dataset.h"
#include "keel/data/loader.h"
#include "keel/models/net.h"
#include "keel/train/optimizer.h"
#include "keel/train/planner.h"
#include "keel/monitor/profiler.h"
#include "keel/train/schedule.h"
#include "keel/train/step.h"

namespace torch::optim {
class Optimizer;
}
namespace keel::dist {
class Comm;
class SyncBatchNorm;
}

namespace keel::train {

// Loss and accuracies over one split.
struct EvalResult {
  double loss = 0, top1 = 0, top5 = 0;  // mean loss; accuracies in [0, 1]
  int64_t samples = 0;
  double seconds = 0;
  std::vector<std::string> notes;  // out-of-memory recoveries during the pass
  nlohmann::json to_json() const;
};

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

// Sets LibTorch's intra-op threads (0 = every core) and returns the number in use.
int configure_threads(int64_t requested);

// Throws ConfigError unless a config can train data-parallel over world_size ranks: the global batch
// train.batch_size divisible by world_size, train.micro_batch dividing the per-rank batch, a file store
// with its path. (`keel train --nproc` checks before starting any rank; each rank checks again.)
void check_data_parallel(const config::Config& c, int64_t world_size);

// Builds the dataset split a config names (train or test), honouring the *_limit keys.
std::shared_ptr<const data::Dataset> make_dataset(const config::Config& cfg, bool train);

// Builds the model a config names, loads model.weights and puts it on run.device (resolved).
models::NetPtr make_model(const config::Config& cfg);

// Converts 4-D parameters (conv weights) to channels-last so oneDNN runs NHWC end to end.
void model_to_channels_last(torch::nn::Module& m);

// The optimizer (lr after optim.lr_scaling) and step settings a config asks for. step_options leaves
// micro_batch 0 for train.micro_batch = "auto" (the planner resolves it).
OptimizerOptions optimizer_options(const config::Config& c);
StepOptions step_options(const config::Config& c);

// Loader and augmentation settings of a config, for the training (shuffled) or test split; for one rank
// of world_size data-parallel ranks, the rank's shard with train.batch_size / world_size per batch (the
// test split unpadded: every sample evaluated once over all ranks).
data::LoaderOptions loader_options(const config::Config& c, bool train, int64_t rank = 0, int64_t world_size = 1);
data::AugmentOptions augment_options(const config::Config& c);

// Evaluates `model` on `loader`'s epoch 0 order; no gradients, eval mode. micro_batch (optional,
// in/out): samples per forward (0 = the whole batch); with oom_recovery, an out-of-memory error halves
// it and the batch is evaluated again (noted in EvalResult::notes), so evaluation never shrinks the
// training batch. sync (data-parallel): the loader holds this rank's shard and the results are summed
// over ranks (every rank returns the same).
EvalResult evaluate(models::Net& model, data::Loader& loader, const data::DeviceAugment& aug,
                    bool channels_last, const std::string& precision, int64_t* micro_batch = nullptr,
                    bool oom_recovery = false, StepSync* sync = nullptr);

// The bytes memory.budget grants on `dev` (the device's whole memory when it is empty).
int64_t run_budget(const config::Config& cfg, const at::Device& dev);

// Runs the batch planner (planner.h) for a config on `model` and `opt` (built from it, on the run's
// device), with the run's step options and the image shape the loader feeds.
PlanResult plan_for_config(const config::Config& cfg, models::Net& model, torch::optim::Optimizer& opt,
                           const data::ImageShape& shape);

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
  config::Config cfg_;
  std::string run_dir_;
  std::shared_ptr<const data::Dataset> train_set_, test_set_;
  models::NetPtr model_;
  at::Device device_{at::kCPU};  // resolved run.device
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
  ScheduleOptions schedule_;
  double lr_ = 0;                       // optim.lr after optim.lr_scaling (the resolved peak rate)
  std::vector<double> group_lr_factors_;  // per parameter group lr multiplier
  monitor::ProfileRange profile_;         // off unless set_profile_steps()
  // Data-parallel training (RANK/WORLD_SIZE from the launcher): this rank's connection; null for one process.
  int64_t rank_ = 0, world_ = 1;
  std::unique_ptr<dist::Comm> comm_;
  std::unique_ptr<dist::SyncBatchNorm> sync_bn_;
};

}  // namespace keel::train
