// Fit (fit.h): the phases of one Trainer::fit call.
#include "keel/run/fit.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>
#include <torch/torch.h>

#include "keel/dist/comm.h"
#include "keel/dist/sync_bn.h"
#include "keel/memory/budget.h"
#include "keel/memory/cpu_allocator.h"
#include "keel/monitor/device_peak.h"
#include "keel/models/registry.h"
#include "keel/models/state_dict.h"
#include "keel/run/model_spec.h"
#include "keel/train/determinism.h"
#include "keel/util/fs.h"
#include "keel/util/interrupt.h"

namespace keel::run {
namespace {

double since(Fit::Clock::time_point t0) { return std::chrono::duration<double>(Fit::Clock::now() - t0).count(); }

// The device's GEMM peak (GFLOP/s) in the step's compute dtype: the denominator of the utilisation figure.
double measure_peak(const at::Device& dev, at::ScalarType dtype) {
  return monitor::measure_gemm_gflops(dev.is_cuda() ? 4096 : 512, dtype, 5, dev);
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

}  // namespace

void Fit::prepare() {
  threads_ = configure_threads(cfg_.run.threads);
  train::set_deterministic(cfg_.train.deterministic);
  if (cfg_.train.deterministic && ckpt_) {
    const std::string note = train::keep_checkpoint_threads(ckpt_->state.value("threads", int64_t{0}));
    if (!note.empty()) fmt::print("checkpoint: {}\n", note);
    threads_ = at::get_num_threads();
  }
  // CPU memory accounting (and the budget, when set) for every allocation of the run.
  memory::install_cpu_allocator();
  memory::set_cpu_budget(std::nullopt);
  const at::Device& dev = t_.device_;
  budget_ = cfg_.memory.budget.empty() ? std::nullopt : std::optional<int64_t>(run_budget(cfg_, dev));
  device::set_budget(dev, budget_);
  memory::reset_peak();
  device::reset_peak(dev);
  train_loader_ = std::make_unique<data::Loader>(t_.train_set_, loader_options(cfg_, true, t_.rank_, t_.world_));
  test_loader_ = std::make_unique<data::Loader>(t_.test_set_, loader_options(cfg_, false, t_.rank_, t_.world_));
  // The augmentation stream. One process: one generator seeded once, its state saved in checkpoints.
  // Data-parallel: reseeded for every batch from (seed, rank, global batch index), so each rank draws its
  // own stream and a resumed run draws on every rank exactly what the uninterrupted run would have,
  // though the checkpoint (written by rank 0) holds no other rank's state.
  aug_ = std::make_unique<data::DeviceAugment>(augment_options(cfg_), static_cast<uint64_t>(cfg_.run.seed) + 1);
  log_ = std::make_unique<RankLog>(t_.rank_ == 0, t_.run_dir_, ckpt_ ? ckpt_->step : -1);

  per_epoch_ = train_loader_->batches_per_epoch();
  total_steps_ = per_epoch_ * cfg_.train.epochs;
  if (cfg_.train.max_steps > 0) total_steps_ = std::min(total_steps_, cfg_.train.max_steps);
  epochs_ = (total_steps_ + per_epoch_ - 1) / per_epoch_;
  const auto shape = t_.train_set_->shape();
  // Utilisation: model FLOPs (forward x 3 for forward + backward) against the measured GEMM peak.
  flops_per_image_ = 3.0 * 2.0 * t_.model_->macs_per_image(shape.height, shape.width);
  // The peak in the precision the step computes in (CPU bf16 only where the CPU has bf16 units).
  const std::string& precision = cfg_.train.precision;
  peak_dtype_ = precision == "fp16"                                                      ? at::kHalf
                : precision == "bf16" && (dev.is_cuda() || monitor::cpu_supports_bf16()) ? at::kBFloat16
                                                                                         : at::kFloat;
  peak_gflops_ = measure_peak(dev, peak_dtype_);
}

void Fit::announce() {
  const auto& tc = cfg_.train;
  const auto shape = t_.train_set_->shape();
  const double lr = t_.lr_;
  fmt::print("keel: {} on {} ({} train / {} test images, {}x{}x{}) on {}, {} threads, {} loader workers\n",
             cfg_.model.name, cfg_.data.dataset, t_.train_set_->size(), t_.test_set_->size(), shape.channels,
             shape.height, shape.width, t_.device_.str(), threads_, train_loader_->options().workers());
  fmt::print("keel: {} epochs x {} steps of batch {}{} ({} steps), {} lr {} ({}), precision {}{}\n", epochs_,
             per_epoch_, tc.batch_size,
             tc.micro_batch > 0 ? fmt::format(" = {} x micro-batch {}", tc.batch_size / tc.micro_batch, tc.micro_batch)
                                : std::string(),
             total_steps_, cfg_.optim.name, lr, cfg_.schedule.name, tc.precision,
             tc.channels_last ? ", channels_last" : "");
  if (cfg_.optim.lr_scaling != "none" || cfg_.optim.no_decay_lr_factor != 1.0) {
    fmt::print("keel: lr {} = optim.lr {} scaled {} by batch {} / optim.base_batch_size {}; no-decay group lr {}\n",
               lr, cfg_.optim.lr, cfg_.optim.lr_scaling, tc.batch_size, cfg_.optim.base_batch_size,
               lr * cfg_.optim.no_decay_lr_factor);
  }
  if (budget_) {
    fmt::print("keel: memory budget {} ({}) on {}\n", cfg_.memory.budget, memory::format_bytes(*budget_),
               t_.device_.str());
  }
  if (train_loader_->dropped_samples() > 0) {
    fmt::print("keel: drop_last drops {} samples per epoch\n", train_loader_->dropped_samples());
  }
  fmt::print("keel: run directory {}\n", t_.run_dir_);
  std::fflush(stdout);
  log_->event({{"event", "lr_resolved"}, {"lr", lr}, {"optim_lr", cfg_.optim.lr},
               {"lr_scaling", cfg_.optim.lr_scaling}, {"batch_size", tc.batch_size},
               {"base_batch_size", cfg_.optim.base_batch_size},
               {"group_lr", {lr * t_.group_lr_factors_.at(0), lr * t_.group_lr_factors_.at(1)}}});
}

void Fit::plan() {
  so_ = step_options(cfg_);
  if (cfg_.train.micro_batch != config::kAuto || ckpt_) return;
  models::Net& model = *t_.model_;
  // The planner steps the model: afterwards weights, buffers and optimizer state are put back as
  // they were (the same initial weights, rebuilt), and the global generator is restored.
  auto gen = at::detail::getDefaultCPUGenerator();
  const at::Tensor gen_state = gen.get_state();
  const train::PlanResult plan = plan_for_config(cfg_, model, *t_.optimizer_, t_.train_set_->shape());
  {
    models::NetPtr fresh = make_model(cfg_);
    torch::NoGradGuard ng;
    auto dst = model.parameters(), src = fresh->parameters();
    for (size_t i = 0; i < dst.size(); ++i) dst[i].copy_(src[i]);
    auto dbuf = model.buffers(), sbuf = fresh->buffers();
    for (size_t i = 0; i < dbuf.size(); ++i) dbuf[i].copy_(sbuf[i]);
  }
  model.zero_grad(/*set_to_none=*/true);
  t_.optimizer_->state().clear();
  gen.set_state(gen_state);
  device::reset_peak(t_.device_);
  so_.micro_batch = plan.micro_batch;
  eval_micro_ = plan.eval_micro_batch;
  if (t_.comm_) {
    // Ranks plan on their own machines: all take the smallest micro-batch any of them found.
    const int64_t world = t_.world_;
    at::Tensor mb = at::zeros({2 * world}, at::TensorOptions().dtype(at::kDouble).device(t_.device_));
    mb[t_.rank_] = static_cast<double>(so_.micro_batch);
    mb[world + t_.rank_] = static_cast<double>(eval_micro_);
    t_.comm_->allreduce(mb, "all-reduce of the planned micro-batches");
    mb = mb.to(at::kCPU);
    so_.micro_batch = static_cast<int64_t>(mb.narrow(0, 0, world).min().item<double>());
    eval_micro_ = static_cast<int64_t>(mb.narrow(0, world, world).min().item<double>());
  }
  fmt::print("keel: planned (train.micro_batch = \"auto\"): {}", plan.summary());
  log_->event({{"event", "batch_plan"}, {"plan", plan.to_json()}});
}

void Fit::build_engine() {
  if (cfg_.ema.enabled) {
    models::NetPtr shadow = models::create(model_spec(cfg_));
    shadow->to(t_.device_);
    if (cfg_.train.channels_last) model_to_channels_last(*shadow);
    ema_ = std::make_unique<train::Ema>(shadow, *t_.model_, cfg_.ema.decay);
  }
  peak_lr_ = t_.lr_;
  schedule_ = std::make_unique<train::Schedule>(t_.schedule_, total_steps_, per_epoch_, peak_lr_);
  timer_.set_enabled(cfg_.monitor.enabled);
  runner_ = std::make_unique<train::StepRunner>(
      *t_.model_, *t_.optimizer_, so_, [this](int64_t s) { return peak_lr_ * schedule_->factor(s); }, ema_.get(),
      &timer_);
  if (cfg_.early_stop.enabled) stopper_.emplace(early_stopping_options(cfg_));
  register_state();
}

void Fit::connect_ranks() {
  // Data-parallel: rank 0's parameters and buffers (after any resume) to every rank, the gradient hooks,
  // and the step's agreement; synchronised BatchNorm from here on (the planner above stays rank-local).
  if (!t_.comm_) return;
  dp_ = std::make_unique<dist::DataParallel>(*t_.comm_, *t_.model_, data_parallel_options(cfg_));
  runner_->set_sync(dp_.get(), [] { return util::stop_requested(); });
  if (cfg_.model.sync_bn) {
    t_.sync_bn_ = std::make_unique<dist::SyncBatchNorm>(*t_.comm_);
    models::set_batch_norm_sync(t_.sync_bn_.get());
  }
  if (t_.rank_ == 0) {
    fmt::print("keel: gradients all-reduced in {} buckets of <= {} MiB ({:.1f} MiB per step){}\n",
               dp_->stats().buckets, cfg_.dist.bucket_mb, dp_->stats().bytes_per_step / 1048576.0,
               cfg_.dist.overlap ? ", overlapping backward" : ", after backward (dist.overlap = false)");
  }
  sync_ = dp_.get();
}

// Advice from the measured breakdown (see docs/monitoring.md).
std::vector<monitor::Advice> Fit::advise(const monitor::StepStats& st) {
  const at::Device& dev = t_.device_;
  monitor::Measurements m = monitor::Measurements::from(st);
  m.data_workers = static_cast<int>(train_loader_->options().workers());
  if (peak_gflops_ > 0 && flops_per_image_ > 0) {
    m.utilisation = st.images_per_second() * flops_per_image_ / (peak_gflops_ * 1e9);
    if (*m.utilisation > 1.0) {
      // Above 100%: the start-up GEMM measurement ran in a loaded moment. Measure again and keep the higher.
      const double before = peak_gflops_;
      peak_gflops_ = std::max(peak_gflops_, measure_peak(dev, peak_dtype_));
      m.utilisation = st.images_per_second() * flops_per_image_ / (peak_gflops_ * 1e9);
      log_->event({{"event", "peak_remeasured"}, {"gflops_before", before}, {"gflops", peak_gflops_}});
    }
  }
  const auto mem = device::memory_stats(dev);
  m.on_cuda = dev.is_cuda();
  m.peak_memory_bytes = mem.peak;
  if (mem.budget > 0) m.memory_budget_bytes = mem.budget;
  m.precision = cfg_.train.precision;
  m.cpu_supports_bf16 = monitor::cpu_supports_bf16();
  m.channels_last = cfg_.train.channels_last;
  m.conv_model = true;
  return monitor::diagnose(m);
}

// Evaluation with its own micro-batch, which an out-of-memory error halves (never the training batch's).
EvalResult Fit::run_eval(models::Net& m) {
  EvalResult e = train::evaluate(m, *test_loader_, *aug_, cfg_.train.channels_last, so_.precision,
                                 &eval_micro_, cfg_.memory.oom_recovery, sync_);
  for (const auto& note : e.notes) {
    fmt::print("memory: {}\n", note);
    log_->event({{"event", "oom_recovery"}, {"phase", "eval"}, {"step", runner_->steps()}, {"message", note}});
  }
  return e;
}

void Fit::start_loop() {
  checkpointing_ =
      cfg_.checkpoint.every_steps > 0 || cfg_.checkpoint.every_minutes > 0 || !cfg_.checkpoint.keep_best.empty();
  last_save_ = Clock::now();
  // debug.log_sample_ids: every training batch's dataset indices, for the sample audit.
  if (cfg_.debug.log_sample_ids) {
    // Data-parallel: one file per rank (each rank sees only its shard).
    const std::string name = t_.rank_ == 0 ? "sample_ids.jsonl" : fmt::format("sample_ids.rank{}.jsonl", t_.rank_);
    ids_log_ = std::make_unique<std::ofstream>(t_.run_dir_ + "/" + name, std::ios::app);
  }
  res_.run_dir = t_.run_dir_;
  progress_ = std::make_unique<monitor::Progress>(
      total_steps_, cfg_.model.name, monitor::ProgressOptions().set_line_every(cfg_.train.log_every).set_out(stdout));
  upload_ = std::make_unique<device::Uploader>(t_.device_);
  const monitor::ProfileRange& pr = t_.profile_;
  if (pr.enabled() && pr.first > total_steps_) {
    throw config::ConfigError(
        fmt::format("--profile-steps {}:{}: the run has {} steps", pr.first, pr.last, total_steps_));
  }
  if (pr.enabled()) profiler_.emplace(pr, t_.run_dir_);
}

void Fit::profile_written() {
  progress_->message(profiler_->summary());
  log_->event({{"event", "profile"}, {"step", runner_->steps()}, {"trace", profiler_->written().at(0)},
               {"ops", profiler_->written().at(1)}});
}

train::EpochHooks Fit::hooks() {
  train::EpochHooks h;
  h.before_step = [this](int64_t next) {
    if (profiler_) profiler_->before_step(next);
  };
  h.after_attempt = [this](int64_t epoch, const data::Batch& b, const train::StepResult& r) {
    if (ids_log_) {
      const at::Tensor ids = b.ids.contiguous();
      *ids_log_ << nlohmann::json{{"epoch", epoch + 1}, {"batch", b.index}, {"step", runner_->steps()},
                                  {"applied", r.applied},
                                  {"ids", std::vector<int64_t>(ids.data_ptr<int64_t>(),
                                                               ids.data_ptr<int64_t>() + ids.numel())}}
                       .dump()
                << "\n";
      ids_log_->flush();
    }
    for (const auto& note : r.notes) {
      progress_->message("memory: " + note);
      log_->event({{"event", "oom_recovery"}, {"epoch", epoch + 1}, {"step", runner_->steps()}, {"message", note}});
    }
    if (r.applied) return;
    if (r.overflow) {
      log_->event({{"event", "loss_scale_backoff"}, {"epoch", epoch + 1}, {"step", runner_->steps()},
                   {"scale", runner_->scaler().scale_value()}});
    }
    for (const auto& g : r.guard) {
      progress_->message("guard: " + g.message);
      log_->event({{"event", g.kind}, {"epoch", epoch + 1}, {"step", runner_->steps()}, {"message", g.message}});
    }
  };
  h.after_applied = [this](const train::AppliedStep& s, const train::EpochSums& sums) {
    return after_applied(s, sums);
  };
  return h;
}

// A logging step: the window's scalars to the logs and the progress line.
void Fit::log_window(const train::AppliedStep& s, monitor::ProgressStats& ps) {
  const train::LogWindow& w = *s.window;
  const auto mem = device::memory_stats(t_.device_);
  monitor::RunLogger::Scalars vals = {{"loss", w.loss}, {"lr", s.lr}, {"grad_norm", w.grad_norm},
                                      {"images_per_second", w.stats.images_per_second()},
                                      {"step_seconds", w.stats.mean_step_seconds()}};
  for (int ph = 0; ph < monitor::kNumPhases; ++ph) {
    vals.emplace_back(std::string(monitor::phase_name(static_cast<monitor::Phase>(ph))) + "_share",
                      w.stats.share(static_cast<monitor::Phase>(ph)));
  }
  vals.emplace_back("utilisation", peak_gflops_ > 0
                                       ? w.stats.images_per_second() * flops_per_image_ / (peak_gflops_ * 1e9)
                                       : 0.0);
  vals.emplace_back("memory_current_bytes", static_cast<double>(mem.current));
  vals.emplace_back("memory_peak_bytes", static_cast<double>(mem.peak));
  vals.emplace_back("rss_bytes", static_cast<double>(memory::process_rss_bytes()));
  if (t_.device_.is_cuda()) vals.emplace_back("alloc_retries", static_cast<double>(mem.alloc_retries));
  vals.emplace_back("loss_scale", runner_->scaler().enabled() ? runner_->scaler().scale_value() : 1.0);
  vals.emplace_back("micro_batch", static_cast<double>(runner_->micro_batch() > 0
                                                           ? runner_->micro_batch()
                                                           : cfg_.train.batch_size / t_.world_));
  log_->step(s.step, s.epoch + 1, vals);
  ps.loss = w.loss;
  ps.lr = s.lr;
  ps.images_per_second = w.stats.images_per_second();
}

// After each applied step: logs, progress, profiler, checkpoints, and whether to leave (Ctrl-C, debug stop).
bool Fit::after_applied(const train::AppliedStep& s, const train::EpochSums& sums) {
  const int64_t step = s.step;
  monitor::ProgressStats ps;
  if (s.window) log_window(s, ps);
  progress_->update(step, ps);
  if (profiler_ && profiler_->after_step(step)) profile_written();
  const bool step_due = cfg_.checkpoint.every_steps > 0 && step % cfg_.checkpoint.every_steps == 0;
  const bool time_due =
      cfg_.checkpoint.every_minutes > 0 && since(last_save_) >= 60.0 * cfg_.checkpoint.every_minutes;
  const bool saved = (step_due || time_due) && step < total_steps_;
  if (saved) save_checkpoint(s.epoch, s.batch_in_epoch, sums.host());
  // Data-parallel: a Ctrl-C seen by any rank, agreed in the step (every rank stops after the same step).
  if ((dp_ ? s.stop : util::stop_requested()) && step < total_steps_) {
    // Ctrl-C: this step is done; keep it in a checkpoint unless one was just written for it.
    if (!saved) save_checkpoint(s.epoch, s.batch_in_epoch, sums.host());
    res_.checkpoint = ckpt_dir_ + "/" + checkpoint::dir_name_for_step(step);
    user_stop_ = killed_ = true;
    return true;
  }
  debug_pause(cfg_, "step", step);
  if (cfg_.debug.stop_after_steps > 0 && step >= cfg_.debug.stop_after_steps) {
    killed_ = true;  // simulated kill: leave without evaluation or final checkpoint
    return true;
  }
  return false;
}

bool Fit::run_epoch(int64_t epoch) {
  if (epoch >= epochs_ || runner_->steps() >= total_steps_ || stop_ || killed_) return false;
  train::EpochOptions eo;
  eo.total_steps = total_steps_;
  eo.per_epoch = per_epoch_;
  eo.channels_last = cfg_.train.channels_last;
  eo.log_every = cfg_.monitor.enabled ? cfg_.train.log_every : 0;
  eo.seed = static_cast<uint64_t>(cfg_.run.seed);
  eo.rank = t_.rank_;
  eo.world_size = t_.world_;
  const int64_t skip = epoch == start_epoch_ ? skip_batches_ : 0;
  const train::EpochOutcome out = train::run_epoch(*t_.model_, *runner_, *train_loader_, *aug_, *upload_, timer_,
                                                   eo, epoch, skip, resumed_sums_, hooks());
  if (out.interrupted) return false;
  end_epoch(epoch, out);
  return true;
}

// An epoch's end: its summary, evaluation, advice, early stopping, the plateau schedule, logs and checkpoint.
void Fit::end_epoch(int64_t epoch, const train::EpochOutcome& out) {
  train_seconds_ += out.seconds;
  const monitor::StepStats est = timer_.take_epoch();
  const train::HostSums sums = out.sums.host();
  res_.train_loss = sums.seen ? sums.loss_sum / sums.seen : 0.0;
  res_.train_top1 = sums.seen ? static_cast<double>(sums.correct) / sums.seen : 0.0;

  res_.test = run_eval(*t_.model_);
  data::Loader& tl = *train_loader_;
  const int64_t skipped = tl.skipped_samples() + test_loader_->skipped_samples();
  if (skipped > 0) {
    progress_->message(fmt::format("epoch {}: {} unreadable samples replaced ({} train, {} test; data.on_error = skip)",
                                   epoch + 1, skipped, tl.skipped_samples(), test_loader_->skipped_samples()));
  }
  const auto mem = device::memory_stats(t_.device_);
  progress_->message(fmt::format(
      "epoch {}/{} done in {:.1f}s: train loss {:.4f} top1 {:.2f}% | test loss {:.4f} top1 {:.2f}% top5 {:.2f}% | "
      "{:.0f} img/s (loader alone {:.0f} img/s), data wait {:.1f}%, peak memory {}",
      epoch + 1, epochs_, out.seconds, res_.train_loss, 100 * res_.train_top1, res_.test.loss, 100 * res_.test.top1,
      100 * res_.test.top5, est.images_per_second(), tl.loader_images_per_second(),
      100 * est.share(monitor::Phase::kDataWait), memory::format_bytes(mem.peak)));
  nlohmann::json extra = {{"test", res_.test.to_json()}, {"skipped_steps", runner_->skipped()},
                          {"rollbacks", runner_->rollbacks()}, {"oom_recoveries", runner_->oom_recoveries()},
                          {"data_skipped_train", tl.skipped_samples()},
                          {"data_skipped_test", test_loader_->skipped_samples()}};
  std::vector<std::string> advice;
  for (const auto& a : advise(est)) {
    advice.push_back(a.text);
    // On the console each piece of advice (rule) once per run: the first epoch that gives it; every
    // epoch's advice stays in the metrics.
    if (advised_.insert(a.rule).second) progress_->message("advice: " + a.text);
  }
  extra["advice"] = advice;
  monitor::RunLogger::Scalars evals = {{"train_loss", res_.train_loss},     {"train_top1", res_.train_top1},
                                       {"test_loss", res_.test.loss},       {"test_top1", res_.test.top1},
                                       {"test_top5", res_.test.top5},       {"seconds", out.seconds},
                                       {"images_per_second", est.images_per_second()},
                                       {"loader_images_per_second", tl.loader_images_per_second()},
                                       {"memory_peak_bytes", static_cast<double>(mem.peak)}};
  for (int ph = 0; ph < monitor::kNumPhases; ++ph) {
    evals.emplace_back(std::string(monitor::phase_name(static_cast<monitor::Phase>(ph))) + "_share",
                       est.share(static_cast<monitor::Phase>(ph)));
  }
  if (ema_) {
    EvalResult e = run_eval(ema_->model());
    progress_->message(fmt::format("epoch {}/{} EMA: test loss {:.4f} top1 {:.2f}%", epoch + 1, epochs_, e.loss,
                                   100 * e.top1));
    extra["ema_test"] = e.to_json();
    res_.ema_test = e;
  }
  res_.epochs = epoch + 1;
  if (stopper_) {
    const std::string& m = cfg_.early_stop.monitor;
    stop_ = stopper_->update(monitored_value(m, res_));
    if (stopper_->improved()) {
      best_weights_ = clone_state(*t_.model_);
      res_.best_epoch = epoch + 1;
    }
    if (stop_) {
      progress_->message(fmt::format("early stop: {} has not improved for {} epochs (best {:.4f} at epoch {})", m,
                                     cfg_.early_stop.patience, stopper_->best(), res_.best_epoch));
      log_->event({{"event", "early_stop"}, {"epoch", epoch + 1}, {"monitor", m}, {"best", stopper_->best()},
                   {"best_epoch", res_.best_epoch}});
      res_.early_stopped = true;
    }
  }
  if (schedule_->uses_metric()) {
    const std::string& m = cfg_.schedule.plateau_monitor;
    const double before = peak_lr_ * schedule_->factor(runner_->steps());
    if (schedule_->epoch_end(monitored_value(m, res_), runner_->steps())) {
      const double after = peak_lr_ * schedule_->factor(runner_->steps());
      progress_->message(fmt::format("schedule: {} has not improved for {} epochs; lr {:.6g} -> {:.6g}", m,
                                     cfg_.schedule.plateau_patience + 1, before, after));
      log_->event({{"event", "lr_reduced"}, {"epoch", epoch + 1}, {"step", runner_->steps()}, {"monitor", m},
                   {"best", schedule_->plateau().best()}, {"lr_before", before}, {"lr_after", after}});
    }
    extra["schedule"] = schedule_->state();
  }
  log_->epoch(runner_->steps(), epoch + 1, evals, extra);
  const bool new_best = update_best(best_ckpt_, cfg_.checkpoint, res_, runner_->steps(), epoch + 1);
  if (checkpointing_) save_checkpoint(epoch + 1, 0, train::HostSums{}, new_best);
  debug_pause(cfg_, "epoch_end", runner_->steps());
}

FitResult Fit::finish() {
  if (profiler_ && profiler_->active()) {
    profiler_->finish();
    profile_written();
  }
  progress_->finish();
  FitResult& res = res_;
  if (killed_) {
    res.interrupted = true;
    res.steps = runner_->steps();
    res.wall_seconds = since(t_fit_);
    fmt::print("keel: stopped after {} steps ({})\n", res.steps, user_stop_ ? "Ctrl-C" : "debug.stop_after_steps");
    log_->event({{"event", "interrupted"}, {"step", res.steps},
                 {"reason", user_stop_ ? "sigint" : "debug.stop_after_steps"}, {"checkpoint", res.checkpoint}});
    return res;
  }
  if (stopper_ && cfg_.early_stop.restore_best && !best_weights_.empty() && res.best_epoch != res.epochs) {
    models::load_state_dict(*t_.model_, best_weights_);
    res.test = run_eval(*t_.model_);
    fmt::print("restored the weights of epoch {}: test loss {:.4f} top1 {:.2f}%\n", res.best_epoch, res.test.loss,
               100 * res.test.top1);
  }
  const monitor::StepStats run_stats = timer_.run();
  for (const auto& a : advise(run_stats)) {
    res.advice.push_back(a.text);
    if (advised_.insert(a.rule).second) fmt::print("advice: {}\n", a.text);
  }
  const train::StepRunner& runner = *runner_;
  res.skipped_steps = runner.skipped();
  res.scaler_overflows = runner.overflows();
  res.rollbacks = runner.rollbacks();
  res.oom_recoveries = runner.oom_recoveries();
  res.micro_batch = runner.micro_batch() > 0 ? runner.micro_batch() : cfg_.train.batch_size / t_.world_;  // per rank
  res.guard_events = runner.events();
  res.steps = runner.steps();
  res.train_seconds = train_seconds_;
  res.images_per_second = run_stats.images_per_second();
  res.data_wait_share = run_stats.share(monitor::Phase::kDataWait);
  res.breakdown_seconds = nlohmann::json::object();
  for (int ph = 0; ph < monitor::kNumPhases; ++ph)
    res.breakdown_seconds[monitor::phase_name(static_cast<monitor::Phase>(ph))] =
        run_stats.phase_seconds(static_cast<monitor::Phase>(ph));
  res.peak_memory_bytes = device::memory_stats(t_.device_).peak;
  if (dp_) {
    const auto& cs = dp_->stats();
    res.dist = cs.to_json();
    res.dist["world_size"] = t_.world_;
    res.dist["rank"] = t_.rank_;
    fmt::print("keel: rank {} of {}: gradient all-reduce {:.2f}s over {} reductions, {:.0f}% of it overlapped "
               "backward; waited {:.2f}s after backward\n", t_.rank_, t_.world_, cs.allreduce_seconds, cs.steps,
               cs.allreduce_seconds > 0 ? 100 * cs.overlapped_seconds / cs.allreduce_seconds : 0.0,
               cs.exposed_seconds);
    log_->event({{"event", "dist"}, {"stats", res.dist}});
  }
  if (cfg_.checkpoint.save_final && t_.rank_ == 0) {
    util::make_dirs(ckpt_dir_);
    res.checkpoint = ckpt_dir_ + "/final.pt";
    models::write_state_dict(models::state_dict_of(*t_.model_), res.checkpoint, cfg_.checkpoint.file_mode_bits());
    util::atomic_write_file(ckpt_dir_ + "/final.toml", config::to_toml(cfg_));
  }
  res.wall_seconds = since(t_fit_);
  log_->event({{"event", "final"}, {"summary", res.to_json()}});
  return res;
}

}  // namespace keel::run
