// Training loop: data -> device augmentation -> forward/backward -> optimizer -> schedule, with
// the loss read back from the device only every train.log_every steps.
#include "keel/train/trainer.h"
#include "keel/train/model_spec.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <thread>

#include <fmt/format.h>
#include <torch/torch.h>

#include "keel/checkpoint/checkpoint.h"
#include "keel/data/cifar.h"
#include "keel/data/idx.h"
#include "keel/data/image_folder.h"
#include "keel/data/image_io.h"
#include "keel/data/synthetic.h"
#include "keel/data/subset.h"
#include "keel/device/device.h"
#include "keel/dist/comm.h"
#include "keel/dist/data_parallel.h"
#include "keel/dist/env.h"
#include "keel/dist/sync_bn.h"
#include "keel/models/registry.h"
#include "keel/models/state_dict.h"
#include "keel/memory/budget.h"
#include "keel/memory/cpu_allocator.h"
#include "keel/memory/oom.h"
#include "keel/monitor/bottleneck.h"
#include "keel/monitor/device_peak.h"
#include "keel/monitor/profiler.h"
#include "keel/monitor/progress.h"
#include "keel/monitor/run_logger.h"
#include "keel/train/determinism.h"
#include "keel/train/early_stopping.h"
#include "keel/train/ema.h"
#include "keel/train/optimizer.h"
#include "keel/train/step.h"
#include "keel/util/fs.h"
#include "keel/util/interrupt.h"

namespace keel::train {
namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

int64_t resolve_workers(int64_t requested) {
  if (requested >= 0) return requested;
  const int64_t cores = std::max(1u, std::thread::hardware_concurrency());
  return std::max<int64_t>(1, cores - 1);
}

at::Tensor to_layout(at::Tensor x, bool channels_last) {
  return channels_last ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
}

// A detached copy of every parameter and buffer, by name (for restoring the best weights).
models::StateDict clone_state(const models::Net& m) {
  models::StateDict sd = models::state_dict_of(m);
  for (auto& [k, t] : sd) t = t.clone();
  return sd;
}

// The value of an epoch-end metric (early_stop.monitor, schedule.plateau.monitor) from the epoch's results.
double monitored_value(const std::string& m, const FitResult& res) {
  return m == "test_loss" ? res.test.loss : m == "test_top1" ? res.test.top1 : res.train_loss;
}

// checkpoint.keep_best: whether this epoch's end beats `best` (strictly; a non-finite value never does),
// and if so makes `best` {monitor, value, step, epoch, dir} of the checkpoint about to be written.
bool update_best(nlohmann::json& best, const config::Config::Checkpoint& c, const FitResult& res, int64_t step,
                 int64_t epoch) {
  if (c.keep_best.empty()) return false;
  const double v = monitored_value(c.keep_best, res);
  const bool higher = c.keep_best_mode == "max" || (c.keep_best_mode == "auto" && c.keep_best == "test_top1");
  if (!std::isfinite(v)) return false;
  if (!best.is_null()) {
    const double b = best.at("value").get<double>();
    if (higher ? !(v > b) : !(v < b)) return false;
  }
  best = {{"monitor", c.keep_best}, {"value", v}, {"step", step}, {"epoch", epoch},
          {"dir", checkpoint::dir_name_for_step(step)}};
  return true;
}

// debug.pause: at the configured step and place, announce it and wait to be killed (kill tests).
void debug_pause(const config::Config& c, const char* where, int64_t step) {
  if (c.debug.pause_at_step != step || c.debug.pause_where != where) return;
  fmt::print("keel: debug pause at step {} ({}); waiting to be killed\n", step, where);
  std::fflush(stdout);
  std::this_thread::sleep_for(std::chrono::minutes(10));
  throw std::runtime_error(fmt::format("debug.pause: step {} ({}): not killed within 10 minutes", step, where));
}

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


OptimizerOptions optimizer_options(const config::Config& c) {
  OptimizerOptions oo;
  oo.name = c.optim.name;
  oo.lr = scaled_lr(c.optim.lr, c.optim.lr_scaling, c.train.batch_size, c.optim.base_batch_size);
  oo.no_decay_lr_factor = c.optim.no_decay_lr_factor;
  oo.momentum = c.optim.momentum;
  oo.nesterov = c.optim.nesterov;
  oo.weight_decay = c.optim.weight_decay;
  oo.beta1 = c.optim.beta1;
  oo.beta2 = c.optim.beta2;
  oo.eps = c.optim.eps;
  return oo;
}

StepOptions step_options(const config::Config& c) {
  const auto& tc = c.train;
  StepOptions so;
  so.precision = tc.precision;
  so.channels_last = tc.channels_last;
  so.micro_batch = tc.micro_batch == config::kAuto ? 0 : tc.micro_batch;
  so.oom_recovery = c.memory.oom_recovery;
  so.group_lr_factors = group_lr_factors(optimizer_options(c));
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

nlohmann::json EvalResult::to_json() const {
  return {{"loss", loss}, {"top1", top1}, {"top5", top5}, {"samples", samples}, {"seconds", seconds}};
}

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

EvalResult evaluate(models::Net& model, data::Loader& loader, const data::DeviceAugment& aug,
                    bool channels_last, const std::string& precision, int64_t* micro_batch, bool oom_recovery,
                    StepSync* sync) {
  const auto t0 = Clock::now();
  torch::NoGradGuard no_grad;
  model.eval();
  loader.start_epoch(0);
  device::Uploader up(device::of(model));
  const auto on_device = at::TensorOptions().device(up.device());
  at::Tensor loss_sum = at::zeros({}, on_device.dtype(at::kDouble)), top1 = at::zeros({}, on_device.dtype(at::kLong)),
             top5 = at::zeros({}, on_device.dtype(at::kLong));
  EvalResult r;
  int64_t n = 0;
  while (auto b = loader.next()) {
    at::Tensor x = to_layout(aug.eval(up.upload(b->images)), channels_last);  // (N, C, H, W)
    at::Tensor y = up.upload(b->labels);                                      // (N)
    const int64_t len = x.size(0);
    for (;;) {  // one pass over the batch in micro-batches; replayed smaller after an out-of-memory error
      std::string oom;
      const int64_t m = micro_batch && *micro_batch > 0 ? std::min(*micro_batch, len) : len;
      try {
        at::Tensor ls = at::zeros_like(loss_sum), t1 = at::zeros_like(top1), t5 = at::zeros_like(top5);
        for (int64_t s = 0; s < len; s += m) {
          const int64_t k = std::min(m, len - s);
          at::Tensor ym = y.narrow(0, s, k);
          at::Tensor logits = forward_logits(model, x.narrow(0, s, k), precision);  // (k, K)
          ls += at::cross_entropy_loss(logits, ym, {}, at::Reduction::Sum).to(at::kDouble);
          at::Tensor pred = std::get<1>(logits.topk(std::min<int64_t>(5, logits.size(1)), 1));  // (k, 5)
          at::Tensor hit = pred.eq(ym.view({-1, 1}));
          t1 += hit.select(1, 0).sum();
          t5 += hit.any(1).sum();
        }
        loss_sum += ls;
        top1 += t1;
        top5 += t5;
        break;
      } catch (const std::exception& e) {
        if (!micro_batch || !oom_recovery || !memory::is_out_of_memory(e)) throw;
        oom = e.what();
        oom = oom.substr(0, oom.find('\n'));
      }
      device::empty_cache(up.device());
      if (m <= 1) {
        throw std::runtime_error(fmt::format("out of memory in evaluation at micro-batch 1: {}. Raise memory.budget "
                                             "or lower the image size.", oom));
      }
      *micro_batch = m / 2;
      r.notes.push_back(fmt::format("out of memory in evaluation with micro-batch {} ({}); evaluating with "
                                    "micro-batch {} from here on", m, oom, *micro_batch));
    }
    n += b->labels.size(0);
  }
  if (sync) {
    // Every rank evaluated its shard: the sums over ranks (one all-reduce, on every rank).
    at::Tensor sums = at::stack({loss_sum, top1.to(at::kDouble), top5.to(at::kDouble),
                                 at::full({}, static_cast<double>(n), loss_sum.options())});
    sync->sum(sums, "all-reduce of the evaluation sums");
    const at::Tensor h = sums.to(at::kCPU);
    loss_sum.fill_(h[0].item<double>());
    top1.fill_(static_cast<int64_t>(h[1].item<double>()));
    top5.fill_(static_cast<int64_t>(h[2].item<double>()));
    n = static_cast<int64_t>(h[3].item<double>());
  }
  r.samples = n;
  if (n > 0) {
    r.loss = loss_sum.item<double>() / n;
    r.top1 = static_cast<double>(top1.item<int64_t>()) / n;
    r.top5 = static_cast<double>(top5.item<int64_t>()) / n;
  }
  r.seconds = since(t0);
  return r;
}

PlanResult plan_for_config(const config::Config& cfg, models::Net& model, torch::optim::Optimizer& opt,
                           const data::ImageShape& shape) {
  const at::Device dev = device::of(model);
  StepOptions so = step_options(cfg);
  so.oom_recovery = false;  // a trial that does not fit must fail, not shrink itself
  so.inject = InjectOptions();
  const double lr = optimizer_options(cfg).lr;
  StepRunner runner(model, opt, so, [lr](int64_t) { return lr; });
  PlanOptions po;
  po.batch_size = cfg.train.batch_size;
  po.eval_batch_size = cfg.train.eval_batch_size;
  po.channels = shape.channels;
  po.height = shape.height;
  po.width = shape.width;
  po.num_classes = cfg.model.num_classes;
  po.precision = cfg.train.precision;
  po.channels_last = cfg.train.channels_last;
  po.budget = run_budget(cfg, dev);
  po.margin = cfg.memory.plan_margin;
  // Held beside the step during training: on CPU the loader's queued uint8 batches; the EMA's copy.
  const data::LoaderOptions lo = loader_options(cfg, true);
  if (!dev.is_cuda()) po.reserve += (lo.prefetch() + lo.workers()) * cfg.train.batch_size * shape.numel();
  if (cfg.ema.enabled) {
    for (const auto& p : model.parameters()) po.reserve += p.numel() * static_cast<int64_t>(p.element_size());
  }
  PlanResult plan = plan_batch(model, runner, po);
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
    const bool cuda = device::resolve(cfg_.run.device).is_cuda();
    dist::CommOptions co;
    co.backend = cfg_.dist.backend == "auto" ? (cuda ? "nccl" : "gloo") : cfg_.dist.backend;
    if (co.backend == "gloo" && cuda) {
      throw config::ConfigError("dist.backend = \"gloo\" reduces CPU tensors, but run.device is CUDA: use "
                                "dist.backend = \"nccl\" (or \"auto\"), or run.device = \"cpu\"");
    }
    co.store = cfg_.dist.store;
    co.store_path = cfg_.dist.store_path;
    co.interface = cfg_.dist.interface;
    co.timeout_seconds = cfg_.dist.timeout_seconds;
    co.config_text = config::to_toml(cfg_);
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

  const OptimizerOptions oo = optimizer_options(cfg_);
  lr_ = oo.lr;
  group_lr_factors_ = group_lr_factors(oo);
  optimizer_ = make_optimizer(*model_, oo);

  schedule_.name = cfg_.schedule.name;
  schedule_.warmup_fraction = cfg_.schedule.warmup_fraction;
  schedule_.start_factor = cfg_.schedule.start_factor;
  schedule_.final_factor = cfg_.schedule.final_factor;
  const auto& sc = cfg_.schedule;
  schedule_.warmup_steps = sc.warmup_steps;
  schedule_.interval = sc.interval;
  schedule_.step_size = sc.step_size;
  schedule_.milestones = sc.milestones;
  schedule_.gamma = sc.gamma;
  schedule_.plateau.mode = sc.plateau_mode != "auto" ? sc.plateau_mode
                                                     : (sc.plateau_monitor == "test_top1" ? "max" : "min");
  schedule_.plateau.factor = sc.plateau_factor;
  schedule_.plateau.patience = sc.plateau_patience;
  schedule_.plateau.threshold = sc.plateau_threshold;
  schedule_.plateau.threshold_mode = sc.plateau_threshold_mode;
  schedule_.plateau.cooldown = sc.plateau_cooldown;
  schedule_.plateau.min_lr = sc.plateau_min_lr;
}

Trainer::~Trainer() {
  if (sync_bn_) models::set_batch_norm_sync(nullptr);
}

FitResult Trainer::fit(const std::string& resume) {
  const auto t_fit = Clock::now();
  const std::string ckpt_dir = run_dir_ + "/checkpoints";
  // Resume: the newest checkpoint that verifies ("auto"), or the one named.
  std::optional<checkpoint::CheckpointContents> ckpt;
  std::string resume_dir;
  if (resume == "auto") {
    std::vector<std::string> skipped;
    if (auto p = checkpoint::find_latest_valid(ckpt_dir, &skipped)) resume_dir = *p;
    for (const auto& why : skipped) fmt::print("checkpoint: skipped {}\n", why);
    if (resume_dir.empty() && !skipped.empty()) {
      // Starting afresh would overwrite the run's logs and, at the next save, prune what is left.
      throw std::runtime_error(fmt::format(
          "--resume auto: none of the {} checkpoints in {} verifies (listed above); refusing to start from scratch "
          "over them: move the directory away to start afresh, or name a checkpoint with --resume DIR",
          skipped.size(), ckpt_dir));
    }
    if (resume_dir.empty()) fmt::print("checkpoint: no valid checkpoint in {}; starting from scratch\n", ckpt_dir);
  } else if (!resume.empty()) {
    resume_dir = resume;
  }
  if (!resume_dir.empty()) ckpt = checkpoint::load(resume_dir);
  int threads = configure_threads(cfg_.run.threads);
  set_deterministic(cfg_.train.deterministic);
  if (cfg_.train.deterministic && ckpt) {
    const std::string note = keep_checkpoint_threads(ckpt->state.value("threads", int64_t{0}));
    if (!note.empty()) fmt::print("checkpoint: {}\n", note);
    threads = at::get_num_threads();
  }
  // CPU memory accounting (and the budget, when set) for every allocation of the run.
  memory::install_cpu_allocator();
  memory::set_cpu_budget(std::nullopt);
  const std::optional<int64_t> budget =
      cfg_.memory.budget.empty() ? std::nullopt : std::optional<int64_t>(run_budget(cfg_, device_));
  device::set_budget(device_, budget);
  memory::reset_peak();
  device::reset_peak(device_);
  data::Loader train_loader(train_set_, loader_options(cfg_, true, rank_, world_));
  data::Loader test_loader(test_set_, loader_options(cfg_, false, rank_, world_));
  // The augmentation stream. One process: one generator seeded once, its state saved in checkpoints.
  // Data-parallel: reseeded for every batch from (seed, rank, global batch index), so each rank draws its
  // own stream and a resumed run draws on every rank exactly what the uninterrupted run would have,
  // though the checkpoint (written by rank 0) holds no other rank's state.
  data::DeviceAugment aug(augment_options(cfg_), static_cast<uint64_t>(cfg_.run.seed) + 1);
  RankLog log(rank_ == 0, run_dir_, ckpt ? ckpt->step : -1);

  const int64_t per_epoch = train_loader.batches_per_epoch();
  int64_t total_steps = per_epoch * cfg_.train.epochs;
  if (cfg_.train.max_steps > 0) total_steps = std::min(total_steps, cfg_.train.max_steps);
  const int64_t epochs = (total_steps + per_epoch - 1) / per_epoch;
  const auto& tc = cfg_.train;
  const auto shape = train_set_->shape();
  // Utilisation: model FLOPs (forward x 3 for forward + backward) against the measured GEMM peak.
  const double flops_per_image = 3.0 * 2.0 * model_->macs_per_image(shape.height, shape.width);
  // The peak in the precision the step computes in (CPU bf16 only where the CPU has bf16 units).
  const at::ScalarType peak_dtype = tc.precision == "fp16"   ? at::kHalf
                                    : tc.precision == "bf16" && (device_.is_cuda() || monitor::cpu_supports_bf16())
                                        ? at::kBFloat16
                                        : at::kFloat;
  auto measure_peak = [&] { return monitor::measure_gemm_gflops(device_.is_cuda() ? 4096 : 512, peak_dtype, 5, device_); };
  double peak_gflops = measure_peak();
  fmt::print("keel: {} on {} ({} train / {} test images, {}x{}x{}) on {}, {} threads, {} loader workers\n",
             cfg_.model.name, cfg_.data.dataset, train_set_->size(), test_set_->size(), shape.channels, shape.height,
             shape.width, device_.str(), threads, train_loader.options().workers());
  fmt::print("keel: {} epochs x {} steps of batch {}{} ({} steps), {} lr {} ({}), precision {}{}\n", epochs,
             per_epoch, tc.batch_size,
             tc.micro_batch > 0 ? fmt::format(" = {} x micro-batch {}", tc.batch_size / tc.micro_batch, tc.micro_batch)
                                : std::string(),
             total_steps, cfg_.optim.name, lr_, cfg_.schedule.name, tc.precision,
             tc.channels_last ? ", channels_last" : "");
  if (cfg_.optim.lr_scaling != "none" || cfg_.optim.no_decay_lr_factor != 1.0) {
    fmt::print("keel: lr {} = optim.lr {} scaled {} by batch {} / optim.base_batch_size {}; no-decay group lr {}\n",
               lr_, cfg_.optim.lr, cfg_.optim.lr_scaling, tc.batch_size, cfg_.optim.base_batch_size,
               lr_ * cfg_.optim.no_decay_lr_factor);
  }
  if (budget) fmt::print("keel: memory budget {} ({}) on {}\n", cfg_.memory.budget, memory::format_bytes(*budget), device_.str());
  if (train_loader.dropped_samples() > 0) {
    fmt::print("keel: drop_last drops {} samples per epoch\n", train_loader.dropped_samples());
  }
  fmt::print("keel: run directory {}\n", run_dir_);
  std::fflush(stdout);
  log.event({{"event", "lr_resolved"}, {"lr", lr_}, {"optim_lr", cfg_.optim.lr}, {"lr_scaling", cfg_.optim.lr_scaling},
             {"batch_size", tc.batch_size}, {"base_batch_size", cfg_.optim.base_batch_size},
             {"group_lr", {lr_ * group_lr_factors_.at(0), lr_ * group_lr_factors_.at(1)}}});

  StepOptions so = step_options(cfg_);
  int64_t eval_micro = 0;  // evaluation micro-batch (0 = whole eval batch); halves on out-of-memory
  if (tc.micro_batch == config::kAuto && !ckpt) {
    // The planner steps the model: afterwards weights, buffers and optimizer state are put back as
    // they were (the same initial weights, rebuilt), and the global generator is restored.
    auto gen = at::detail::getDefaultCPUGenerator();
    const at::Tensor gen_state = gen.get_state();
    const PlanResult plan = plan_for_config(cfg_, *model_, *optimizer_, shape);
    {
      models::NetPtr fresh = make_model(cfg_);
      torch::NoGradGuard ng;
      auto dst = model_->parameters(), src = fresh->parameters();
      for (size_t i = 0; i < dst.size(); ++i) dst[i].copy_(src[i]);
      auto dbuf = model_->buffers(), sbuf = fresh->buffers();
      for (size_t i = 0; i < dbuf.size(); ++i) dbuf[i].copy_(sbuf[i]);
    }
    model_->zero_grad(/*set_to_none=*/true);
    optimizer_->state().clear();
    gen.set_state(gen_state);
    device::reset_peak(device_);
    so.micro_batch = plan.micro_batch;
    eval_micro = plan.eval_micro_batch;
    if (comm_) {
      // Ranks plan on their own machines: all take the smallest micro-batch any of them found.
      at::Tensor mb = at::zeros({2 * world_}, at::TensorOptions().dtype(at::kDouble).device(device_));
      mb[rank_] = static_cast<double>(so.micro_batch);
      mb[world_ + rank_] = static_cast<double>(eval_micro);
      comm_->allreduce(mb, "all-reduce of the planned micro-batches");
      mb = mb.to(at::kCPU);
      so.micro_batch = static_cast<int64_t>(mb.narrow(0, 0, world_).min().item<double>());
      eval_micro = static_cast<int64_t>(mb.narrow(0, world_, world_).min().item<double>());
    }
    fmt::print("keel: planned (train.micro_batch = \"auto\"): {}", plan.summary());
    log.event({{"event", "batch_plan"}, {"plan", plan.to_json()}});
  }

  std::unique_ptr<Ema> ema;
  if (cfg_.ema.enabled) {
    models::NetPtr shadow = models::create(model_spec(cfg_));
    shadow->to(device_);
    if (tc.channels_last) model_to_channels_last(*shadow);
    ema = std::make_unique<Ema>(shadow, *model_, cfg_.ema.decay);
  }
  const double peak_lr = lr_;
  Schedule schedule(schedule_, total_steps, per_epoch, peak_lr);
  monitor::StepTimer timer;
  timer.set_enabled(cfg_.monitor.enabled);
  StepRunner runner(*model_, *optimizer_, so, [&](int64_t s) { return peak_lr * schedule.factor(s); }, ema.get(),
                    &timer);

  std::optional<EarlyStopping> stopper;
  models::StateDict best_weights;
  if (cfg_.early_stop.enabled) {
    EarlyStoppingOptions eo;
    eo.mode = cfg_.early_stop.mode != "auto" ? cfg_.early_stop.mode
                                             : (cfg_.early_stop.monitor == "test_top1" ? "max" : "min");
    eo.patience = cfg_.early_stop.patience;
    eo.min_delta = cfg_.early_stop.min_delta;
    stopper.emplace(eo);
  }

  int64_t start_epoch = 0, skip_batches = 0;
  nlohmann::json resumed_acc;
  nlohmann::json best_ckpt;  // checkpoint.keep_best: {monitor, value, step, epoch, dir} of the best so far
  double train_seconds = 0;
  FitResult res;
  if (ckpt) {
    const std::string problem = checkpoint::compatibility_problem(*ckpt, cfg_.model.name, models::state_dict_of(*model_),
                                                                  config::to_toml(cfg_));
    if (!problem.empty()) throw std::runtime_error(resume_dir + ": cannot resume this run from it: " + problem);
    models::load_state_dict(*model_, ckpt->model);
    checkpoint::restore_optimizer(*ckpt, *optimizer_);
    const nlohmann::json& st = ckpt->state;
    runner.load_state(st.at("runner"));
    if (st.contains("schedule")) schedule.load_state(st.at("schedule"));
    for (const auto& note : checkpoint::restore_rng_state(st.at("rng"))) fmt::print("checkpoint: {}\n", note);
    if (world_ == 1) {  // data-parallel runs reseed per batch instead
      const std::string aug_state = checkpoint::base64_decode(st.at("augment_rng").get<std::string>());
      aug.set_rng_state(at::from_blob(const_cast<char*>(aug_state.data()), {static_cast<int64_t>(aug_state.size())},
                                      at::kByte).clone());
    }
    if (stopper && st.contains("early_stop")) stopper->load_state(st.at("early_stop"));
    res.best_epoch = st.value("best_epoch", 0);
    eval_micro = st.value("eval_micro_batch", int64_t{0});
    if (ema) models::load_state_dict(ema->model(), ckpt->extra.at("ema"));
    if (ckpt->extra.count("best")) best_weights = ckpt->extra.at("best");
    best_ckpt = st.value("best_checkpoint", nlohmann::json());
    start_epoch = st.at("epoch");
    skip_batches = st.at("batch_in_epoch");
    resumed_acc = st.at("accumulators");
    train_seconds = st.at("train_seconds");
    fmt::print("keel: resumed from {} (step {}, epoch {}, batch {} of the epoch)\n", resume_dir, runner.steps(),
               start_epoch + 1, skip_batches);
    ckpt.reset();  // free its tensors
  }

  // Data-parallel: rank 0's parameters and buffers (after any resume) to every rank, the gradient hooks,
  // and the step's agreement; synchronised BatchNorm from here on (the planner above stays rank-local).
  std::unique_ptr<dist::DataParallel> dp;
  if (comm_) {
    dist::DataParallelOptions dpo;
    dpo.bucket_mb = cfg_.dist.bucket_mb;
    dpo.overlap = cfg_.dist.overlap;
    dpo.sync_bn = cfg_.model.sync_bn;
    dp = std::make_unique<dist::DataParallel>(*comm_, *model_, dpo);
    runner.set_sync(dp.get(), [] { return util::stop_requested(); });
    if (cfg_.model.sync_bn) {
      sync_bn_ = std::make_unique<dist::SyncBatchNorm>(*comm_);
      models::set_batch_norm_sync(sync_bn_.get());
    }
    if (rank_ == 0) {
      fmt::print("keel: gradients all-reduced in {} buckets of <= {} MiB ({:.1f} MiB per step){}\n", dp->stats().buckets,
                 cfg_.dist.bucket_mb, dp->stats().bytes_per_step / 1048576.0,
                 cfg_.dist.overlap ? ", overlapping backward" : ", after backward (dist.overlap = false)");
    }
  }
  StepSync* sync = dp.get();

  // Writes a full checkpoint of the run as it stands (epoch: 0-based current epoch; batch: consumed in it).
  const bool checkpointing =
      cfg_.checkpoint.every_steps > 0 || cfg_.checkpoint.every_minutes > 0 || !cfg_.checkpoint.keep_best.empty();
  auto last_save = Clock::now();
  auto save_checkpoint = [&](int64_t epoch, int64_t batch, double loss_sum, int64_t correct, int64_t seen,
                             bool is_best = false) {
    if (rank_ != 0) return;  // rank 0 alone writes checkpoints (the ranks' states are identical)
    checkpoint::CheckpointContents c;
    c.model = models::state_dict_of(*model_);
    checkpoint::capture_optimizer(c, *optimizer_);
    c.state["runner"] = runner.state();
    c.state["schedule"] = schedule.state();
    c.state["rng"] = checkpoint::rng_state_json();
    at::Tensor ag = aug.rng_state().contiguous();
    c.state["augment_rng"] = checkpoint::base64_encode(
        std::string(reinterpret_cast<const char*>(ag.data_ptr<uint8_t>()), static_cast<size_t>(ag.numel())));
    c.state["epoch"] = epoch;
    c.state["batch_in_epoch"] = batch;
    c.state["accumulators"] = {{"loss_sum", loss_sum}, {"correct", correct}, {"seen", seen}};
    c.state["train_seconds"] = train_seconds;
    c.state["best_epoch"] = res.best_epoch;
    c.state["eval_micro_batch"] = eval_micro;
    c.state["threads"] = at::get_num_threads();
    if (!best_ckpt.is_null()) c.state["best_checkpoint"] = best_ckpt;
    if (stopper) c.state["early_stop"] = stopper->state();
    if (ema) c.extra["ema"] = models::state_dict_of(ema->model());
    if (!best_weights.empty()) c.extra["best"] = best_weights;
    c.config_toml = config::to_toml(cfg_);
    c.step = runner.steps();
    c.epoch = epoch;
    c.model_name = cfg_.model.name;
    const int64_t step = runner.steps();
    const std::string written = checkpoint::save(ckpt_dir, c, [&](const std::string& path) {
      if (path.size() >= 9 && path.compare(path.size() - 9, 9, "/model.pt") == 0) {
        debug_pause(cfg_, "checkpoint_write", step);
      }
      if (path.size() >= 4 && path.compare(path.size() - 4, 4, ".old") == 0) debug_pause(cfg_, "checkpoint_rename", step);
    }, cfg_.checkpoint.file_mode_bits());
    std::set<std::string> keep;
    if (!best_ckpt.is_null()) keep.insert(best_ckpt.at("dir").get<std::string>());
    checkpoint::prune(ckpt_dir, cfg_.checkpoint.keep_last, keep);
    nlohmann::json ev = {{"event", "checkpoint"}, {"step", step}, {"path", written}};
    if (is_best) ev["best"] = true;
    log.event(ev);
    last_save = Clock::now();
  };

  // Advice from the measured breakdown (see docs/monitoring.md).
  auto advise = [&](const monitor::StepStats& st) {
    monitor::Measurements m = monitor::Measurements::from(st);
    m.data_workers = static_cast<int>(train_loader.options().workers());
    if (peak_gflops > 0 && flops_per_image > 0) {
      m.utilisation = st.images_per_second() * flops_per_image / (peak_gflops * 1e9);
      if (*m.utilisation > 1.0) {
        // Above 100%: the start-up GEMM measurement ran in a loaded moment. Measure again and keep the higher.
        const double before = peak_gflops;
        peak_gflops = std::max(peak_gflops, measure_peak());
        m.utilisation = st.images_per_second() * flops_per_image / (peak_gflops * 1e9);
        log.event({{"event", "peak_remeasured"}, {"gflops_before", before}, {"gflops", peak_gflops}});
      }
    }
    const auto mem = device::memory_stats(device_);
    m.on_cuda = device_.is_cuda();
    m.peak_memory_bytes = mem.peak;
    if (mem.budget > 0) m.memory_budget_bytes = mem.budget;
    m.precision = tc.precision;
    m.cpu_supports_bf16 = monitor::cpu_supports_bf16();
    m.channels_last = tc.channels_last;
    m.conv_model = true;
    return monitor::diagnose(m);
  };

  // Evaluation with its own micro-batch, which an out-of-memory error halves (never the training batch's).
  auto run_eval = [&](models::Net& m) {
    EvalResult e =
        evaluate(m, test_loader, aug, tc.channels_last, tc.precision, &eval_micro, cfg_.memory.oom_recovery, sync);
    for (const auto& note : e.notes) {
      fmt::print("memory: {}\n", note);
      log.event({{"event", "oom_recovery"}, {"phase", "eval"}, {"step", runner.steps()}, {"message", note}});
    }
    return e;
  };
  // debug.log_sample_ids: every training batch's dataset indices, for the sample audit.
  std::unique_ptr<std::ofstream> ids_log;
  if (cfg_.debug.log_sample_ids) {
    // Data-parallel: one file per rank (each rank sees only its shard).
    const std::string name = rank_ == 0 ? "sample_ids.jsonl" : fmt::format("sample_ids.rank{}.jsonl", rank_);
    ids_log = std::make_unique<std::ofstream>(run_dir_ + "/" + name, std::ios::app);
  }

  res.run_dir = run_dir_;
  bool stop = false, killed = false;
  monitor::Progress progress(total_steps, cfg_.model.name,
                             monitor::ProgressOptions().set_line_every(tc.log_every).set_out(stdout));
  device::Uploader upload(device_);
  const auto on_device = at::TensorOptions().device(device_);
  if (profile_.enabled() && profile_.first > total_steps) {
    throw config::ConfigError(fmt::format("--profile-steps {}:{}: the run has {} steps", profile_.first,
                                          profile_.last, total_steps));
  }
  std::optional<monitor::StepProfiler> profiler;
  if (profile_.enabled()) profiler.emplace(profile_, run_dir_);
  auto profile_written = [&] {
    progress.message(profiler->summary());
    log.event({{"event", "profile"}, {"step", runner.steps()}, {"trace", profiler->written().at(0)},
               {"ops", profiler->written().at(1)}});
  };
  bool user_stop = false;  // Ctrl-C
  std::set<std::string> advised;  // advice rules already printed
  for (int64_t epoch = start_epoch; epoch < epochs && runner.steps() < total_steps && !stop && !killed; ++epoch) {
    model_->train();
    train_loader.start_epoch(epoch);
    const auto t_epoch = Clock::now();
    at::Tensor loss_sum = at::zeros({}, on_device.dtype(at::kDouble)), correct = at::zeros({}, on_device.dtype(at::kLong));
    int64_t seen = 0, window_steps = 0, batch_in_epoch = 0;
    if (epoch == start_epoch && skip_batches > 0) {
      // The order is a pure function of (seed, epoch): skipping the consumed batches puts the
      // loader exactly where the checkpoint was taken.
      for (; batch_in_epoch < skip_batches; ++batch_in_epoch) {
        if (!train_loader.next()) break;
      }
      loss_sum.fill_(resumed_acc.at("loss_sum").get<double>());
      correct.fill_(resumed_acc.at("correct").get<int64_t>());
      seen = resumed_acc.at("seen");
    }
    at::Tensor window_loss = at::zeros({}, on_device.dtype(at::kDouble)), last_norm = at::zeros({}, on_device.dtype(at::kFloat));
    double lr = 0;
    while (runner.steps() < total_steps) {
      if (profiler) profiler->before_step(runner.steps() + 1);
      timer.begin_step();
      auto b = train_loader.next();
      timer.mark(monitor::Phase::kDataWait);
      if (!b) {
        timer.end_step(0);
        break;
      }
      ++batch_in_epoch;
      // CUDA: pinned side-stream copy (queued, not waited for); CPU: nothing to copy.
      at::Tensor images = upload.upload(b->images), labels = upload.upload(b->labels);
      timer.mark(monitor::Phase::kH2D);
      if (world_ > 1) {
        aug.reseed(data::mix_seed(static_cast<uint64_t>(cfg_.run.seed), static_cast<uint64_t>(rank_),
                                  static_cast<uint64_t>(epoch * per_epoch + batch_in_epoch)));
      }
      at::Tensor x = aug.train(images);                 // (N, C, H, W) float
      const at::Tensor targets = aug.mix(x, labels);    // (N) labels, or (N, K) soft targets when mixed
      x = to_layout(x, tc.channels_last);
      timer.mark(monitor::Phase::kOther);
      StepResult r = runner.run(x, targets);
      lr = r.lr;
      if (ids_log) {
        const at::Tensor ids = b->ids.contiguous();
        *ids_log << nlohmann::json{{"epoch", epoch + 1}, {"batch", b->index}, {"step", runner.steps()},
                                   {"applied", r.applied},
                                   {"ids", std::vector<int64_t>(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel())}}
                        .dump()
                 << "\n";
        ids_log->flush();
      }
      for (const auto& note : r.notes) {
        progress.message("memory: " + note);
        log.event({{"event", "oom_recovery"}, {"epoch", epoch + 1}, {"step", runner.steps()}, {"message", note}});
      }
      if (!r.applied) {
        timer.end_step(r.samples);
        if (r.overflow) {
          log.event({{"event", "loss_scale_backoff"}, {"epoch", epoch + 1}, {"step", runner.steps()},
                     {"scale", runner.scaler().scale_value()}});
        }
        for (const auto& g : r.guard) {
          progress.message("guard: " + g.message);
          log.event({{"event", g.kind}, {"epoch", epoch + 1}, {"step", runner.steps()}, {"message", g.message}});
        }
        continue;
      }
      loss_sum += r.loss * static_cast<double>(r.samples);
      correct += r.correct;
      window_loss += r.loss;
      last_norm = r.grad_norm;
      seen += r.samples;
      ++window_steps;
      const int64_t step = runner.steps();
      const bool log_now = cfg_.monitor.enabled && (step % tc.log_every == 0 || step == total_steps);
      monitor::ProgressStats ps;
      if (log_now) {
        // The one host read-back of the logging interval.
        timer.end_step(r.samples);
        const monitor::StepStats w = timer.take_window();
        const double wl = window_loss.item<double>() / static_cast<double>(window_steps);
        const double gn = last_norm.item<double>();
        const auto mem = device::memory_stats(device_);
        monitor::RunLogger::Scalars vals = {{"loss", wl}, {"lr", lr}, {"grad_norm", gn},
                                            {"images_per_second", w.images_per_second()},
                                            {"step_seconds", w.mean_step_seconds()}};
        for (int ph = 0; ph < monitor::kNumPhases; ++ph) {
          vals.emplace_back(std::string(monitor::phase_name(static_cast<monitor::Phase>(ph))) + "_share",
                            w.share(static_cast<monitor::Phase>(ph)));
        }
        vals.emplace_back("utilisation",
                          peak_gflops > 0 ? w.images_per_second() * flops_per_image / (peak_gflops * 1e9) : 0.0);
        vals.emplace_back("memory_current_bytes", static_cast<double>(mem.current));
        vals.emplace_back("memory_peak_bytes", static_cast<double>(mem.peak));
        vals.emplace_back("rss_bytes", static_cast<double>(memory::process_rss_bytes()));
        if (device_.is_cuda()) vals.emplace_back("alloc_retries", static_cast<double>(mem.alloc_retries));
        vals.emplace_back("loss_scale", runner.scaler().enabled() ? runner.scaler().scale_value() : 1.0);
        vals.emplace_back("micro_batch", static_cast<double>(runner.micro_batch() > 0 ? runner.micro_batch()
                                                                                      : tc.batch_size / world_));
        log.step(step, epoch + 1, vals);
        ps.loss = wl;
        ps.lr = lr;
        ps.images_per_second = w.images_per_second();
        window_loss.zero_();
        window_steps = 0;
      } else {
        timer.end_step(r.samples);
      }
      progress.update(step, ps);
      if (profiler && profiler->after_step(step)) profile_written();
      const bool step_due = cfg_.checkpoint.every_steps > 0 && step % cfg_.checkpoint.every_steps == 0;
      const bool time_due = cfg_.checkpoint.every_minutes > 0 && since(last_save) >= 60.0 * cfg_.checkpoint.every_minutes;
      if ((step_due || time_due) && step < total_steps) {
        save_checkpoint(epoch, batch_in_epoch, loss_sum.item<double>(), correct.item<int64_t>(), seen);
      }
      // Data-parallel: a Ctrl-C seen by any rank, agreed in the step (every rank stops after the same step).
      if ((dp ? r.stop : util::stop_requested()) && step < total_steps) {
        // Ctrl-C: this step is done; keep it in a checkpoint unless one was just written for it.
        if (!((step_due || time_due) && step < total_steps)) {
          save_checkpoint(epoch, batch_in_epoch, loss_sum.item<double>(), correct.item<int64_t>(), seen);
        }
        res.checkpoint = ckpt_dir + "/" + checkpoint::dir_name_for_step(step);
        user_stop = killed = true;
        break;
      }
      debug_pause(cfg_, "step", step);
      if (cfg_.debug.stop_after_steps > 0 && step >= cfg_.debug.stop_after_steps) {
        killed = true;  // simulated kill: leave without evaluation or final checkpoint
        break;
      }
    }
    if (killed) {
      train_loader.stop();
      break;
    }
    train_loader.stop();
    const double epoch_seconds = since(t_epoch);
    train_seconds += epoch_seconds;
    const monitor::StepStats est = timer.take_epoch();
    res.train_loss = seen ? loss_sum.item<double>() / seen : 0.0;
    res.train_top1 = seen ? static_cast<double>(correct.item<int64_t>()) / seen : 0.0;

    res.test = run_eval(*model_);
    const int64_t skipped = train_loader.skipped_samples() + test_loader.skipped_samples();
    if (skipped > 0) {
      progress.message(fmt::format("epoch {}: {} unreadable samples replaced ({} train, {} test; data.on_error = skip)",
                                   epoch + 1, skipped, train_loader.skipped_samples(),
                                   test_loader.skipped_samples()));
    }
    const auto mem = device::memory_stats(device_);
    progress.message(fmt::format(
        "epoch {}/{} done in {:.1f}s: train loss {:.4f} top1 {:.2f}% | test loss {:.4f} top1 {:.2f}% top5 {:.2f}% | "
        "{:.0f} img/s (loader alone {:.0f} img/s), data wait {:.1f}%, peak memory {}",
        epoch + 1, epochs, epoch_seconds, res.train_loss, 100 * res.train_top1, res.test.loss, 100 * res.test.top1,
        100 * res.test.top5, est.images_per_second(), train_loader.loader_images_per_second(),
        100 * est.share(monitor::Phase::kDataWait),
        memory::format_bytes(mem.peak)));
    nlohmann::json extra = {{"test", res.test.to_json()}, {"skipped_steps", runner.skipped()},
                            {"rollbacks", runner.rollbacks()}, {"oom_recoveries", runner.oom_recoveries()},
                            {"data_skipped_train", train_loader.skipped_samples()},
                            {"data_skipped_test", test_loader.skipped_samples()}};
    std::vector<std::string> advice;
    for (const auto& a : advise(est)) {
      advice.push_back(a.text);
      // On the console each piece of advice (rule) once per run: the first epoch that gives it; every
      // epoch's advice stays in the metrics.
      if (advised.insert(a.rule).second) progress.message("advice: " + a.text);
    }
    extra["advice"] = advice;
    monitor::RunLogger::Scalars evals = {{"train_loss", res.train_loss},     {"train_top1", res.train_top1},
                                         {"test_loss", res.test.loss},       {"test_top1", res.test.top1},
                                         {"test_top5", res.test.top5},       {"seconds", epoch_seconds},
                                         {"images_per_second", est.images_per_second()},
                                         {"loader_images_per_second", train_loader.loader_images_per_second()},
                                         {"memory_peak_bytes", static_cast<double>(mem.peak)}};
    for (int ph = 0; ph < monitor::kNumPhases; ++ph) {
      evals.emplace_back(std::string(monitor::phase_name(static_cast<monitor::Phase>(ph))) + "_share",
                         est.share(static_cast<monitor::Phase>(ph)));
    }
    if (ema) {
      EvalResult e = run_eval(ema->model());
      progress.message(fmt::format("epoch {}/{} EMA: test loss {:.4f} top1 {:.2f}%", epoch + 1, epochs, e.loss,
                                   100 * e.top1));
      extra["ema_test"] = e.to_json();
      res.ema_test = e;
    }
    res.epochs = epoch + 1;
    if (stopper) {
      const std::string& m = cfg_.early_stop.monitor;
      const double v = monitored_value(m, res);
      stop = stopper->update(v);
      if (stopper->improved()) {
        best_weights = clone_state(*model_);
        res.best_epoch = epoch + 1;
      }
      if (stop) {
        progress.message(fmt::format("early stop: {} has not improved for {} epochs (best {:.4f} at epoch {})", m,
                                     cfg_.early_stop.patience, stopper->best(), res.best_epoch));
        log.event({{"event", "early_stop"}, {"epoch", epoch + 1}, {"monitor", m}, {"best", stopper->best()},
                   {"best_epoch", res.best_epoch}});
        res.early_stopped = true;
      }
    }
    if (schedule.uses_metric()) {
      const std::string& m = cfg_.schedule.plateau_monitor;
      const double before = peak_lr * schedule.factor(runner.steps());
      if (schedule.epoch_end(monitored_value(m, res), runner.steps())) {
        const double after = peak_lr * schedule.factor(runner.steps());
        progress.message(fmt::format("schedule: {} has not improved for {} epochs; lr {:.6g} -> {:.6g}", m,
                                     cfg_.schedule.plateau_patience + 1, before, after));
        log.event({{"event", "lr_reduced"}, {"epoch", epoch + 1}, {"step", runner.steps()}, {"monitor", m},
                   {"best", schedule.plateau().best()}, {"lr_before", before}, {"lr_after", after}});
      }
      extra["schedule"] = schedule.state();
    }
    log.epoch(runner.steps(), epoch + 1, evals, extra);
    const bool new_best = update_best(best_ckpt, cfg_.checkpoint, res, runner.steps(), epoch + 1);
    if (checkpointing) save_checkpoint(epoch + 1, 0, 0.0, 0, 0, new_best);
    debug_pause(cfg_, "epoch_end", runner.steps());
  }
  if (profiler && profiler->active()) {
    profiler->finish();
    profile_written();
  }
  progress.finish();
  if (killed) {
    res.interrupted = true;
    res.steps = runner.steps();
    res.wall_seconds = since(t_fit);
    fmt::print("keel: stopped after {} steps ({})\n", res.steps, user_stop ? "Ctrl-C" : "debug.stop_after_steps");
    log.event({{"event", "interrupted"}, {"step", res.steps}, {"reason", user_stop ? "sigint" : "debug.stop_after_steps"},
               {"checkpoint", res.checkpoint}});
    return res;
  }
  if (stopper && cfg_.early_stop.restore_best && !best_weights.empty() && res.best_epoch != res.epochs) {
    models::load_state_dict(*model_, best_weights);
    res.test = run_eval(*model_);
    fmt::print("restored the weights of epoch {}: test loss {:.4f} top1 {:.2f}%\n", res.best_epoch, res.test.loss,
               100 * res.test.top1);
  }
  const monitor::StepStats run_stats = timer.run();
  for (const auto& a : advise(run_stats)) {
    res.advice.push_back(a.text);
    if (advised.insert(a.rule).second) fmt::print("advice: {}\n", a.text);
  }
  res.skipped_steps = runner.skipped();
  res.scaler_overflows = runner.overflows();
  res.rollbacks = runner.rollbacks();
  res.oom_recoveries = runner.oom_recoveries();
  res.micro_batch = runner.micro_batch() > 0 ? runner.micro_batch() : tc.batch_size / world_;  // per rank
  res.guard_events = runner.events();
  res.steps = runner.steps();
  res.train_seconds = train_seconds;
  res.images_per_second = run_stats.images_per_second();
  res.data_wait_share = run_stats.share(monitor::Phase::kDataWait);
  res.breakdown_seconds = nlohmann::json::object();
  for (int ph = 0; ph < monitor::kNumPhases; ++ph)
    res.breakdown_seconds[monitor::phase_name(static_cast<monitor::Phase>(ph))] =
        run_stats.phase_seconds(static_cast<monitor::Phase>(ph));
  res.peak_memory_bytes = device::memory_stats(device_).peak;
  if (dp) {
    const auto& cs = dp->stats();
    res.dist = cs.to_json();
    res.dist["world_size"] = world_;
    res.dist["rank"] = rank_;
    fmt::print("keel: rank {} of {}: gradient all-reduce {:.2f}s over {} reductions, {:.0f}% of it overlapped backward; waited "
               "{:.2f}s after backward\n", rank_, world_, cs.allreduce_seconds, cs.steps,
               cs.allreduce_seconds > 0 ? 100 * cs.overlapped_seconds / cs.allreduce_seconds : 0.0,
               cs.exposed_seconds);
    log.event({{"event", "dist"}, {"stats", res.dist}});
  }

  if (cfg_.checkpoint.save_final && rank_ == 0) {
    const std::string dir = ckpt_dir;
    util::make_dirs(dir);
    res.checkpoint = dir + "/final.pt";
    models::write_state_dict(models::state_dict_of(*model_), res.checkpoint, cfg_.checkpoint.file_mode_bits());
    util::atomic_write_file(dir + "/final.toml", config::to_toml(cfg_));
  }
  res.wall_seconds = since(t_fit);
  log.event({{"event", "final"}, {"summary", res.to_json()}});
  return res;
}

}  // namespace keel::train
