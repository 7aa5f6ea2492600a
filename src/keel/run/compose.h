// The composition root's mapping from a config to keel's components: every dataset, model, optimizer and
// options struct a run (or `keel plan`, `keel bench`, `keel tune`) builds is built here, once, from the config.
// This is the only layer below cli/ and tune/ that reads config::Config; train/, data/, models/, dist/ and
// the floors below take plain options structs (docs/architecture.md).
#pragma once
#include <memory>

#include <torch/nn/module.h>

#include "keel/config/config.h"
#include "keel/data/augment.h"
#include "keel/data/dataset.h"
#include "keel/data/loader.h"
#include "keel/dist/comm.h"
#include "keel/dist/data_parallel.h"
#include "keel/models/net.h"
#include "keel/train/early_stopping.h"
#include "keel/train/optimizer.h"
#include "keel/train/planner.h"
#include "keel/train/schedule.h"
#include "keel/train/step.h"

namespace torch::optim {
class Optimizer;
}

namespace keel::run {

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
train::OptimizerOptions optimizer_options(const config::Config& c);
train::StepOptions step_options(const config::Config& c);

// The learning-rate schedule (schedule.*) and early stopping (early_stop.*) a config asks for; "auto" modes
// resolved from their monitor (test_top1: max, else min).
train::ScheduleOptions schedule_options(const config::Config& c);
train::EarlyStoppingOptions early_stopping_options(const config::Config& c);

// The data-parallel connection (dist.*; backend "auto" resolved for the run's device, which must suit it) and
// gradient reduction (dist.bucket_mb, dist.overlap, model.sync_bn) a config asks for.
dist::CommOptions comm_options(const config::Config& c);
dist::DataParallelOptions data_parallel_options(const config::Config& c);

// Loader and augmentation settings of a config, for the training (shuffled) or test split; for one rank
// of world_size data-parallel ranks, the rank's shard with train.batch_size / world_size per batch (the
// test split unpadded: every sample evaluated once over all ranks).
data::LoaderOptions loader_options(const config::Config& c, bool train, int64_t rank = 0, int64_t world_size = 1);
data::AugmentOptions augment_options(const config::Config& c);

// The bytes memory.budget grants on `dev` (the device's whole memory when it is empty).
int64_t run_budget(const config::Config& cfg, const at::Device& dev);

// Runs the batch planner (planner.h) for a config on `model` and `opt` (built from it, on the run's
// device), with the run's step options and the image shape the loader feeds.
train::PlanResult plan_for_config(const config::Config& cfg, models::Net& model, torch::optim::Optimizer& opt,
                                  const data::ImageShape& shape);

}  // namespace keel::run
