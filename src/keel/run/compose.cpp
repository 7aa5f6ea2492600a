// config -> components: the composition root's one mapping (compose.h).
#include "keel/run/compose.h"

#include <algorithm>
#include <optional>
#include <thread>

#include <fmt/format.h>
#include <torch/torch.h>

#include "keel/data/cifar.h"
#include "keel/data/idx.h"
#include "keel/data/image_folder.h"
#include "keel/data/subset.h"
#include "keel/data/synthetic.h"
#include "keel/device/device.h"
#include "keel/memory/budget.h"
#include "keel/models/registry.h"
#include "keel/models/state_dict.h"
#include "keel/run/model_spec.h"

namespace keel::run {
namespace {

int64_t resolve_workers(int64_t requested) {
  if (requested >= 0) return requested;
  const int64_t cores = std::max(1u, std::thread::hardware_concurrency());
  return std::max<int64_t>(1, cores - 1);
}

}  // namespace

// Converts 4-D parameters (conv weights) to channels-last so oneDNN runs NHWC end to end.
void model_to_channels_last(torch::nn::Module& m) {
  torch::NoGradGuard ng;
  for (auto& p : m.parameters()) {
    if (p.dim() == 4) p.set_data(p.contiguous(at::MemoryFormat::ChannelsLast));
  }
}

data::AugmentOptions augment_options(const config::Config& c) {
  data::AugmentOptions a;
  a.mean = c.data.mean;
  a.std = c.data.std;
  a.random_flip = c.data.random_flip;
  a.random_crop_padding = c.data.random_crop_padding;
  a.random_resized_crop = c.augment.random_resized_crop;
  a.rrc_scale = c.data.rrc_scale;
  a.rrc_ratio = c.data.rrc_ratio;
  a.mixup_alpha = c.augment.mixup_alpha;
  a.cutmix_alpha = c.augment.cutmix_alpha;
  a.mix_prob = c.augment.mix_prob;
  a.num_classes = c.model.num_classes;
  return a;
}

data::LoaderOptions loader_options(const config::Config& c, bool train, int64_t rank, int64_t world_size) {
  data::SamplerOptions s;
  s.seed = static_cast<uint64_t>(c.run.seed);
  s.shuffle = train;
  s.pad = train;  // evaluation: each test sample once over all ranks
  const int64_t batch = train ? c.train.batch_size / world_size
                              : std::max<int64_t>(1, (c.train.eval_batch_size + world_size - 1) / world_size);
  return data::LoaderOptions()
      .batch_size(batch)
      .rank(rank)
      .world_size(world_size)
      .workers(resolve_workers(c.data.workers))
      .prefetch(c.data.prefetch)
      .drop_last(false)
      .sampler(s)
      .on_error(c.data.on_error == "fail" ? data::OnError::kFail : data::OnError::kSkip)
      .pin_memory(device::resolve(c.run.device).is_cuda());
}


train::OptimizerOptions optimizer_options(const config::Config& c) {
  train::OptimizerOptions oo;
  oo.name = c.optim.name;
  oo.lr = train::scaled_lr(c.optim.lr, c.optim.lr_scaling, c.train.batch_size, c.optim.base_batch_size);
  oo.no_decay_lr_factor = c.optim.no_decay_lr_factor;
  oo.momentum = c.optim.momentum;
  oo.nesterov = c.optim.nesterov;
  oo.weight_decay = c.optim.weight_decay;
  oo.beta1 = c.optim.beta1;
  oo.beta2 = c.optim.beta2;
  oo.eps = c.optim.eps;
  return oo;
}

train::StepOptions step_options(const config::Config& c) {
  const auto& tc = c.train;
  train::StepOptions so;
  so.precision = train::parse_precision(tc.precision);
  so.channels_last = tc.channels_last;
  so.micro_batch = tc.micro_batch == config::kAuto ? 0 : tc.micro_batch;
  so.oom_recovery = c.memory.oom_recovery;
  so.group_lr_factors = train::group_lr_factors(optimizer_options(c));
  so.label_smoothing = tc.label_smoothing;
  so.clip_norm = tc.grad_clip_norm;
  so.clip_value = tc.grad_clip_value;
  so.scaler.enabled = c.amp.scaler == "on" || (c.amp.scaler == "auto" && tc.precision == "fp16");
  so.scaler.init_scale = c.amp.init_scale;
  so.scaler.growth_factor = c.amp.growth_factor;
  so.scaler.backoff_factor = c.amp.backoff_factor;
  so.scaler.growth_interval = c.amp.growth_interval;
  so.guard.enabled = c.guard.enabled;
  so.guard.max_consecutive_skips = c.guard.max_consecutive_skips;
  so.guard.max_rollbacks = c.guard.max_rollbacks;
  so.guard.lr_factor = c.guard.lr_factor;
  so.guard.snapshot_every = c.guard.snapshot_every;
  so.guard.locate = c.guard.locate;
  so.guard.spike_factor = c.guard.spike_factor;
  so.inject.steps = c.debug.inject_steps;
  so.inject.where = c.debug.inject_where;
  so.inject.oom_steps = c.debug.inject_oom_steps;
  so.inject.oom_rank = c.debug.inject_oom_rank;
  return so;
}


int configure_threads(int64_t requested) {
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int n = requested > 0 ? static_cast<int>(requested) : cores;
  at::set_num_threads(n);
  return at::get_num_threads();
}

std::shared_ptr<const data::Dataset> make_dataset(const config::Config& cfg, bool train) {
  const auto& d = cfg.data;
  std::shared_ptr<const data::Dataset> ds;
  if (d.dataset == "cifar10" || d.dataset == "cifar100") {
    ds = data::make_cifar_split(d.root, d.dataset == "cifar10" ? 10 : 100, train);
  } else if (d.dataset == "image_folder") {
    data::ImageFolderOptions o;
    o.size = d.image_size;
    o.channels = cfg.model.in_channels;
    o.scale_lo = d.rrc_scale.at(0);
    o.scale_hi = d.rrc_scale.at(1);
    o.ratio_lo = d.rrc_ratio.at(0);
    o.ratio_hi = d.rrc_ratio.at(1);
    o.eval_resize = d.eval_resize > 0 ? d.eval_resize : (d.image_size * 256 + 112) / 224;
    o.seed = static_cast<uint64_t>(cfg.run.seed);
    ds = data::make_image_folder_split(d.root, o, train);
  } else if (d.dataset == "synthetic") {
    const int64_t n = train ? d.synthetic_samples : std::max<int64_t>(1, d.synthetic_samples / 10);
    ds = std::make_shared<data::SyntheticDataset>(
        static_cast<size_t>(n), data::ImageShape{cfg.model.in_channels, d.image_size, d.image_size},
        cfg.model.num_classes, static_cast<uint64_t>(cfg.run.seed) * 2 + (train ? 0 : 1));
  } else {
    // fashion-mnist, mnist and idx all read the standard IDX file names under data.root.
    ds = data::make_idx_split(d.root, train);
  }
  const int64_t limit = train ? cfg.data.train_limit : cfg.data.test_limit;
  if (limit > 0 && static_cast<size_t>(limit) < ds->size()) {
    ds = std::make_shared<data::Subset>(ds, static_cast<size_t>(limit));
  }
  return ds;
}

models::NetPtr make_model(const config::Config& cfg) {
  torch::manual_seed(static_cast<uint64_t>(cfg.run.seed));
  auto model = models::create(model_spec(cfg));
  if (!cfg.model.weights.empty()) {
    models::load_state_dict(*model, models::read_state_dict(cfg.model.weights));
  }
  try {
    model->to(device::resolve(cfg.run.device));
  } catch (const std::invalid_argument& e) {
    throw config::ConfigError(e.what());  // names run.device and why it cannot be used
  }
  return model;
}

train::PlanResult plan_for_config(const config::Config& cfg, models::Net& model, torch::optim::Optimizer& opt,
                                  const data::ImageShape& shape) {
  const at::Device dev = device::of(model);
  train::StepOptions so = step_options(cfg);
  so.oom_recovery = false;  // a trial that does not fit must fail, not shrink itself
  so.inject = train::InjectOptions();
  const double lr = optimizer_options(cfg).lr;
  train::StepRunner runner(model, opt, so, [lr](int64_t) { return lr; });
  train::PlanOptions po;
  po.batch_size = cfg.train.batch_size;
  po.eval_batch_size = cfg.train.eval_batch_size;
  po.channels = shape.channels;
  po.height = shape.height;
  po.width = shape.width;
  po.num_classes = cfg.model.num_classes;
  po.precision = train::parse_precision(cfg.train.precision);
  po.channels_last = cfg.train.channels_last;
  po.budget = run_budget(cfg, dev);
  po.margin = cfg.memory.plan_margin;
  // Held beside the step during training: on CPU the loader's queued uint8 batches; the EMA's copy.
  const data::LoaderOptions lo = loader_options(cfg, true);
  if (!dev.is_cuda()) po.reserve += (lo.prefetch() + lo.workers()) * cfg.train.batch_size * shape.numel();
  if (cfg.ema.enabled) {
    for (const auto& p : model.parameters()) po.reserve += p.numel() * static_cast<int64_t>(p.element_size());
  }
  train::PlanResult plan = train::plan_batch(model, runner, po);
  // plan_batch leaves po.budget in force; without memory.budget the run has no cap, so lift it again.
  if (cfg.memory.budget.empty()) device::set_budget(dev, std::nullopt);
  return plan;
}

int64_t run_budget(const config::Config& cfg, const at::Device& dev) {
  const int64_t total = device::total_memory(dev);
  return cfg.memory.budget.empty() ? total : memory::parse_budget(cfg.memory.budget, total).bytes;
}

void check_data_parallel(const config::Config& c, int64_t w) {
  if (c.train.batch_size % w != 0) {
    throw config::ConfigError(fmt::format(
        "train.batch_size = {} is the global batch, split over {} ranks: it must be divisible by {} (got a "
        "remainder of {})", c.train.batch_size, w, w, c.train.batch_size % w));
  }
  const int64_t per_rank = c.train.batch_size / w;
  if (c.train.micro_batch > 0 && per_rank % c.train.micro_batch != 0) {
    throw config::ConfigError(fmt::format(
        "train.micro_batch = {} must divide the per-rank batch train.batch_size / ranks = {} / {} = {}",
        c.train.micro_batch, c.train.batch_size, w, per_rank));
  }
  if (c.dist.store == "file" && c.dist.store_path.empty()) {
    throw config::ConfigError("dist.store = \"file\" needs dist.store_path (a fresh path on a filesystem every "
                              "rank sees)");
  }
}

train::ScheduleOptions schedule_options(const config::Config& c) {
  const auto& sc = c.schedule;
  train::ScheduleOptions s;
  s.name = sc.name;
  s.warmup_fraction = sc.warmup_fraction;
  s.start_factor = sc.start_factor;
  s.final_factor = sc.final_factor;
  s.warmup_steps = sc.warmup_steps;
  s.interval = sc.interval;
  s.step_size = sc.step_size;
  s.milestones = sc.milestones;
  s.gamma = sc.gamma;
  s.plateau.mode = sc.plateau_mode != "auto" ? sc.plateau_mode : (sc.plateau_monitor == "test_top1" ? "max" : "min");
  s.plateau.factor = sc.plateau_factor;
  s.plateau.patience = sc.plateau_patience;
  s.plateau.threshold = sc.plateau_threshold;
  s.plateau.threshold_mode = sc.plateau_threshold_mode;
  s.plateau.cooldown = sc.plateau_cooldown;
  s.plateau.min_lr = sc.plateau_min_lr;
  return s;
}

train::EarlyStoppingOptions early_stopping_options(const config::Config& c) {
  train::EarlyStoppingOptions eo;
  eo.mode = c.early_stop.mode != "auto" ? c.early_stop.mode : (c.early_stop.monitor == "test_top1" ? "max" : "min");
  eo.patience = c.early_stop.patience;
  eo.min_delta = c.early_stop.min_delta;
  return eo;
}

dist::CommOptions comm_options(const config::Config& c) {
  const bool cuda = device::resolve(c.run.device).is_cuda();
  dist::CommOptions co;
  co.backend = c.dist.backend == "auto" ? (cuda ? "nccl" : "gloo") : c.dist.backend;
  if (co.backend == "gloo" && cuda) {
    throw config::ConfigError("dist.backend = \"gloo\" reduces CPU tensors, but run.device is CUDA: use "
                              "dist.backend = \"nccl\" (or \"auto\"), or run.device = \"cpu\"");
  }
  co.store = c.dist.store;
  co.store_path = c.dist.store_path;
  co.interface = c.dist.interface;
  co.timeout_seconds = c.dist.timeout_seconds;
  co.config_text = config::to_toml(c);
  return co;
}

dist::DataParallelOptions data_parallel_options(const config::Config& c) {
  dist::DataParallelOptions dpo;
  dpo.bucket_mb = c.dist.bucket_mb;
  dpo.overlap = c.dist.overlap;
  dpo.sync_bn = c.model.sync_bn;
  return dpo;
}

}  // namespace keel::run
