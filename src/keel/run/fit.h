// Fit: one call of Trainer::fit, as named phases over the objects it builds. Trainer::fit (run/trainer.cpp)
// calls them in order; each reads the config through the Trainer and hands the engine (train/) plain options
// and hooks. Internal to run/.
#pragma once
#include <chrono>
#include <fstream>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "keel/checkpoint/checkpoint.h"
#include "keel/data/augment.h"
#include "keel/data/loader.h"
#include "keel/device/device.h"
#include "keel/dist/data_parallel.h"
#include "keel/monitor/bottleneck.h"
#include "keel/monitor/profiler.h"
#include "keel/monitor/progress.h"
#include "keel/monitor/run_logger.h"
#include "keel/monitor/step_timer.h"
#include "keel/run/run_state.h"
#include "keel/run/trainer.h"
#include "keel/train/early_stopping.h"
#include "keel/train/ema.h"
#include "keel/train/loop.h"
#include "keel/train/schedule.h"
#include "keel/train/step.h"

namespace keel::run {

// The run's logs (metrics.jsonl, CSV, TensorBoard): written by rank 0 alone; on other ranks every call
// does nothing.
class RankLog {
 public:
  RankLog(bool writer, const std::string& run_dir, int64_t resume_step) {
    if (writer) log_.emplace(run_dir, resume_step);
  }
  void step(int64_t step, int64_t epoch, const monitor::RunLogger::Scalars& v) { if (log_) log_->step(step, epoch, v); }
  void epoch(int64_t step, int64_t epoch, const monitor::RunLogger::Scalars& v, const nlohmann::json& extra = {}) {
    if (log_) log_->epoch(step, epoch, v, extra);
  }
  void event(const nlohmann::json& r) { if (log_) log_->event(r); }

 private:
  std::optional<monitor::RunLogger> log_;
};

// debug.pause: at the configured step and place ("step", "epoch_end", "checkpoint_write",
// "checkpoint_rename"), announce it and wait to be killed (kill tests).
void debug_pause(const config::Config& c, const char* where, int64_t step);

// Phases in run/fit.cpp; the checkpoint ones (open_checkpoint, register_state, save_checkpoint, restore) in
// run/fit_checkpoint.cpp.
class Fit {
 public:
  using Clock = std::chrono::steady_clock;
  Fit(Trainer& t, Clock::time_point start) : t_(t), cfg_(t.cfg_), t_fit_(start) {}

  // The phases, in the order Trainer::fit calls them.
  void open_checkpoint(const std::string& resume);  // the checkpoint to resume from, if any (read, not applied)
  void prepare();          // threads, determinism, memory accounting, loaders, augmentation, logs, totals
  void announce();         // the run's banner and lr_resolved event
  void plan();             // train.micro_batch = "auto" on a fresh run: the batch planner
  void build_engine();     // EMA, schedule, step timer, step runner, early stopping, the checkpointed parts
  void restore();          // resume: every checkpointed part from the checkpoint
  void connect_ranks();    // data-parallel: gradient hooks, the step's agreement, synchronised BatchNorm
  void start_loop();       // evaluation, sample-id log, progress, profiler
  bool run_epoch(int64_t epoch);  // false once the run is over (steps done, early stop, or interrupted)
  FitResult finish();

  int64_t start_epoch() const { return start_epoch_; }
  int64_t epochs() const { return epochs_; }

 private:
  void register_state();  // the one list of what a checkpoint holds (RunState)
  // A full checkpoint of the run as it stands (epoch: 0-based current epoch; batch: consumed in it).
  void save_checkpoint(int64_t epoch, int64_t batch, const train::HostSums& sums, bool is_best = false);
  std::vector<monitor::Advice> advise(const monitor::StepStats& st);
  EvalResult run_eval(models::Net& m);
  train::EpochHooks hooks();
  bool after_applied(const train::AppliedStep& s, const train::EpochSums& sums);
  void log_window(const train::AppliedStep& s, monitor::ProgressStats& ps);
  void end_epoch(int64_t epoch, const train::EpochOutcome& out);
  void profile_written();

  Trainer& t_;
  config::Config& cfg_;
  const Clock::time_point t_fit_;
  std::string ckpt_dir_, resume_dir_;
  std::optional<checkpoint::CheckpointContents> ckpt_;
  int threads_ = 0;
  std::optional<int64_t> budget_;
  std::unique_ptr<data::Loader> train_loader_, test_loader_;
  std::unique_ptr<data::DeviceAugment> aug_;
  std::unique_ptr<RankLog> log_;
  int64_t per_epoch_ = 0, total_steps_ = 0, epochs_ = 0;
  double flops_per_image_ = 0, peak_gflops_ = 0;
  at::ScalarType peak_dtype_ = at::kFloat;
  train::StepOptions so_;
  int64_t eval_micro_ = 0;  // evaluation micro-batch (0 = whole eval batch); halves on out-of-memory
  std::unique_ptr<train::Ema> ema_;
  double peak_lr_ = 0;
  std::unique_ptr<train::Schedule> schedule_;
  monitor::StepTimer timer_;
  std::unique_ptr<train::StepRunner> runner_;
  std::optional<train::EarlyStopping> stopper_;
  models::StateDict best_weights_;
  RunState state_;
  int64_t start_epoch_ = 0, skip_batches_ = 0;
  train::HostSums resumed_sums_;
  nlohmann::json best_ckpt_;  // checkpoint.keep_best: {monitor, value, step, epoch, dir} of the best so far
  double train_seconds_ = 0;
  FitResult res_;
  std::unique_ptr<dist::DataParallel> dp_;
  dist::StepSync* sync_ = nullptr;
  // Where the loop stands, for the checkpoint being written: the epoch (0-based), batches consumed in it, sums.
  int64_t pos_epoch_ = 0, pos_batch_ = 0;
  train::HostSums pos_sums_;
  bool checkpointing_ = false;
  Clock::time_point last_save_;
  std::unique_ptr<std::ofstream> ids_log_;
  std::unique_ptr<monitor::Progress> progress_;
  std::unique_ptr<device::Uploader> upload_;
  std::optional<monitor::StepProfiler> profiler_;
  bool stop_ = false, killed_ = false, user_stop_ = false;  // early stop; left mid-epoch; by Ctrl-C
  std::set<std::string> advised_;  // advice rules already printed
};

}  // namespace keel::run
