// Trainer (trainer.h): the run's composition (rendezvous, datasets, model, optimizer) and fit(), the story of
// the run told by Fit's phases (fit.h).
#include "keel/run/trainer.h"

#include <filesystem>

#include <fmt/format.h>
#include <torch/torch.h>

#include "keel/device/device.h"
#include "keel/dist/comm.h"
#include "keel/dist/env.h"
#include "keel/dist/sync_bn.h"
#include "keel/memory/cpu_allocator.h"
#include "keel/models/state_dict.h"
#include "keel/run/fit.h"
#include "keel/util/fs.h"

namespace keel::run {

nlohmann::json FitResult::to_json() const {
  return {{"test_top1", test.top1},     {"test_top5", test.top5},
          {"test_loss", test.loss},     {"train_loss", train_loss},
          {"train_top1", train_top1},   {"steps", steps},
          {"epochs", epochs},           {"train_seconds", train_seconds},
          {"wall_seconds", wall_seconds}, {"images_per_second", images_per_second},
          {"data_wait_share", data_wait_share}, {"run_dir", run_dir},
          {"checkpoint", checkpoint},  {"skipped_steps", skipped_steps}, {"scaler_overflows", scaler_overflows},
          {"rollbacks", rollbacks},    {"early_stopped", early_stopped},
          {"best_epoch", best_epoch},  {"oom_recoveries", oom_recoveries},
          {"micro_batch", micro_batch}, {"peak_memory_bytes", peak_memory_bytes},
          {"advice", advice},          {"interrupted", interrupted},  {"breakdown_seconds", breakdown_seconds},  {"ema_test_top1", ema_test ? nlohmann::json(ema_test->top1) : nlohmann::json()},
          {"dist", dist}};
}

Trainer::Trainer(config::Config cfg) : cfg_(std::move(cfg)) {
  // CPU memory accounting from the first tensor on, so the model and optimizer state are counted.
  memory::install_cpu_allocator();
  run_dir_ = (std::filesystem::path(cfg_.run.dir) / cfg_.run.name).string();
  // Data-parallel: the launcher's RANK/WORLD_SIZE (torchrun, SLURM, keel train --nproc). The rendezvous
  // comes first, so that a bad environment or a missing rank is reported before any data is read.
  dist::DistEnv env;
  try {
    env = dist::read_env(cfg_.dist.store == "tcp");
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(std::string("data-parallel launch: ") + e.what());
  }
  if (!env.source.empty()) {  // a launcher started this process (also WORLD_SIZE=1: one rank, same code path)
    const int64_t w = env.world_size;
    const int64_t per_rank = cfg_.train.batch_size / w;
    check_data_parallel(cfg_, w);
    const dist::CommOptions co = comm_options(cfg_);
    comm_ = dist::Comm::connect(env, co);
    rank_ = env.rank;
    world_ = env.world_size;
    if (co.backend == "nccl" && (cfg_.run.device == "auto" || cfg_.run.device == "cuda")) {
      // One GPU per rank: this machine's LOCAL_RANK-th (after the config agreement, which compares the
      // configs as written).
      cfg_.run.device = fmt::format("cuda:{}", env.local_rank);
    }
    if (rank_ == 0) {
      fmt::print("keel: data-parallel, {} ranks ({} backend, {} store), global batch {} = {} x {} per rank{}\n", w,
                 co.backend, co.store, cfg_.train.batch_size, w, per_rank,
                 cfg_.model.sync_bn ? ", synchronised BatchNorm" : "");
    }
  }
  util::make_dirs(run_dir_);
  if (rank_ == 0) util::atomic_write_file(run_dir_ + "/config.resolved.toml", config::to_toml(cfg_));

  train_set_ = make_dataset(cfg_, true);
  test_set_ = make_dataset(cfg_, false);
  const auto shape = train_set_->shape();
  if (shape.channels != cfg_.model.in_channels) {
    throw config::ConfigError(fmt::format(
        "model.in_channels = {} but the dataset at {} has {}-channel images; set model.in_channels = {}",
        cfg_.model.in_channels, cfg_.data.root, shape.channels, shape.channels));
  }
  if (train_set_->num_classes() > cfg_.model.num_classes) {
    throw config::ConfigError(fmt::format(
        "model.num_classes = {} but the dataset at {} has labels up to {}; set model.num_classes >= {}",
        cfg_.model.num_classes, cfg_.data.root, train_set_->num_classes() - 1, train_set_->num_classes()));
  }
  model_ = make_model(cfg_);
  device_ = device::of(*model_);
  if (cfg_.train.channels_last) model_to_channels_last(*model_);

  const train::OptimizerOptions oo = optimizer_options(cfg_);
  lr_ = oo.lr;
  group_lr_factors_ = train::group_lr_factors(oo);
  optimizer_ = train::make_optimizer(*model_, oo);

  schedule_ = schedule_options(cfg_);
}

Trainer::~Trainer() {
  if (sync_bn_) models::set_batch_norm_sync(nullptr);
}

FitResult Trainer::fit(const std::string& resume) {
  Fit f(*this, Fit::Clock::now());
  // Restore: the checkpoint to resume from, read; the run's loaders, logs and totals.
  f.open_checkpoint(resume);
  f.prepare();
  f.announce();
  // Plan: the micro-batches (train.micro_batch = "auto"), then the engine and its checkpointed parts.
  f.plan();
  f.build_engine();
  f.restore();
  f.connect_ranks();
  // Loop: epochs until the steps are done, early stopping, or an interruption.
  f.start_loop();
  int64_t epoch = f.start_epoch();
  while (f.run_epoch(epoch)) ++epoch;
  // Finish: best weights, advice, the summary and the final weights.
  return f.finish();
}

}  // namespace keel::run
