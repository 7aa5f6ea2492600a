// StepRunner: the ordered optimizer step and the non-finite guard.
#include "keel/train/step.h"

#include <algorithm>
#include <fmt/format.h>
#include <limits>
#include <sstream>
#include <torch/torch.h>

#include "keel/compat/torch_compat.h"
#include "keel/device/device.h"
#include "keel/memory/oom.h"
#include "keel/train/ema.h"
#include "keel/train/oom_replay.h"
#include "keel/train/optimizer.h"

namespace keel::train {

at::Tensor forward_logits(models::Net& model, const at::Tensor& x, Precision precision) {
  // x: (N, C, H, W) float -> logits (N, K) float. Autocast on the device x lives on: bf16 on CPU
  // and CUDA, fp16 on CUDA only (CPU autocast has no fp16 policy).
  if (precision == Precision::kFp32) return model.forward(x);
  TORCH_CHECK(precision == Precision::kBf16 || x.is_cuda(),
              "train.precision = \"fp16\" needs a CUDA device (CPU autocast supports bf16 only)");
  compat::AutocastGuard autocast(x.device().type(), true,
                                 precision == Precision::kBf16 ? at::kBFloat16 : at::kHalf);
  return model.forward(x).to(at::kFloat);
}

namespace {
// The step timer reads host clocks. On CUDA the host only queues kernels, so a phase's GPU work would be timed in
// whichever later phase waits for it (the guard's host sync, inside the optimizer phase: every CUDA run looked
// "optimizer-bound"). With the monitor on, each phase therefore ends with a device sync on CUDA; the one after the
// backward costs nothing (the guard syncs right after it), the others the overlap of one phase's launches with the
// previous phase's GPU work (measured in docs/monitoring.md). Nothing changes on the CPU or with the monitor off.
void mark_phase(monitor::StepTimer* timer, const at::Device& device, monitor::Phase p) {
  if (timer == nullptr || !timer->enabled()) return;
  if (device.is_cuda()) device::synchronize(device);
  timer->mark(p);
}
}  // namespace

StepRunner::StepRunner(models::Net& model, torch::optim::Optimizer& opt, StepOptions o,
                       std::function<double(int64_t)> lr_at, Ema* ema, monitor::StepTimer* timer)
    : model_(model), opt_(opt), o_(std::move(o)), lr_at_(std::move(lr_at)), ema_(ema), timer_(timer),
      scaler_(o_.scaler) {
  for (auto& p : model_.parameters()) if (p.requires_grad()) params_.push_back(p);
  if (!params_.empty()) device_ = params_.front().device();
  scaler_.to(device_);
}

void StepRunner::forward_backward(const at::Tensor& x, const at::Tensor& y, bool inject_loss,
                                  models::Watcher* watcher, at::Tensor& loss_sum, at::Tensor& correct,
                                  StepSync* sync) {
  const int64_t n = x.size(0);
  const int64_t mb = micro_batch_in_force(o_.micro_batch, n);
  models::WatchScope scope(watcher);
  for (int64_t start = 0; start < n; start += mb) {
    const int64_t len = std::min(mb, n - start);
    at::Tensor xm = x.narrow(0, start, len), ym = y.narrow(0, start, len);  // (m, C, H, W), (m)
    at::Tensor logits = forward_logits(model_, xm, o_.precision);          // (m, K)
    // Injected out-of-memory: thrown in the last micro-batch after its forward, when the earlier
    // micro-batches' gradients and this one's activations are all allocated, as a real OOM would be.
    const bool inject_rank = o_.inject.oom_rank < 0 || o_.inject.oom_rank == (sync_ ? sync_->rank() : 0);
    if (start + len == n && inject_rank &&
        std::count(o_.inject.oom_steps.begin(), o_.inject.oom_steps.end(), attempts_) &&
        !std::count(oom_injected_.begin(), oom_injected_.end(), attempts_)) {
      oom_injected_.push_back(attempts_);
      TORCH_CHECK_WITH(OutOfMemoryError, false, "injected out-of-memory (debug.inject_oom_steps) at attempt ",
                       attempts_);
    }
    at::Tensor loss = at::cross_entropy_loss(logits, ym, {}, at::Reduction::Mean, -100, o_.label_smoothing);
    if (inject_loss) loss = loss + std::numeric_limits<float>::quiet_NaN();
    mark_phase(timer_, device_, monitor::Phase::kForward);
    // Each micro-batch's mean loss is weighted by its share, so the summed gradient equals the
    // full batch's mean-loss gradient.
    const double share = static_cast<double>(len) / static_cast<double>(n);
    const bool last = start + len == n;
    if (sync) sync->before_backward(last);  // only the last micro-batch's backward sends gradients
    scaler_.scale(loss * share).backward();
    // Waiting for the buckets still in flight counts as backward (the step timer has no phase of its own
    // for it; DataParallel's statistics say how much of the communication backward hid).
    if (sync && last) sync->finish_gradients();
    mark_phase(timer_, device_, monitor::Phase::kBackward);
    loss_sum += loss.detach().to(at::kDouble) * len;
    // Soft (mixup/cutmix) targets (m, K): cross_entropy_loss takes them as class probabilities
    // above; a prediction counts as correct when it names the dominant class.
    correct += logits.detach().argmax(1).eq(ym.dim() == 2 ? ym.argmax(1) : ym).sum();
  }
}

std::string StepRunner::replay_out_of_memory(const std::exception& e) {
  if (!memory::is_out_of_memory(e)) throw;
  std::string what = e.what();
  what = what.substr(0, what.find('\n'));
  opt_.zero_grad();
  device::empty_cache(device_);
  return fmt::format("not located (out of memory during the diagnostic replay: {})", what);
}

void StepRunner::maybe_inject_replay_oom() const {
  if (std::count(o_.inject.oom_replay_steps.begin(), o_.inject.oom_replay_steps.end(), attempts_)) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, "injected out-of-memory in the guard's replay at attempt ", attempts_);
  }
}

std::string StepRunner::locate(const at::Tensor& x, const at::Tensor& y) {
  // Diagnostic replay of the failed batch with every module output recorded. BN running stats
  // are saved and restored so the replay leaves no trace (also when it runs out of memory).
  std::vector<at::Tensor> saved;
  for (auto& b : model_.buffers()) saved.push_back(b.detach().clone());
  auto restore_buffers = [&] {
    torch::NoGradGuard ng;
    auto bufs = model_.buffers();
    for (size_t i = 0; i < bufs.size(); ++i) bufs[i].copy_(saved[i]);
  };
  opt_.zero_grad();
  NonFiniteLocator loc;
  FaultInjector inj(o_.inject.where, &loc);
  const bool inject = o_.inject.active_at(attempts_);
  const bool inject_module = inject && o_.inject.where != "loss" && o_.inject.where != "grad";
  at::Tensor ls = at::zeros({}, x.options().dtype(at::kDouble)), c = at::zeros({}, x.options().dtype(at::kLong));
  try {
    maybe_inject_replay_oom();
    // Diagnostic only: gradients stay local (every rank replays the same way, so their synchronised
    // BatchNorm collectives, if any, still match).
    forward_backward(x, y, inject && o_.inject.where == "loss",
                     inject_module ? static_cast<models::Watcher*>(&inj) : &loc, ls, c, nullptr);
  } catch (const std::exception& e) {
    restore_buffers();
    return replay_out_of_memory(e);
  }
  if (inject && o_.inject.where == "grad" && !params_.empty() && params_[0].grad().defined()) {
    params_[0].grad().fill_(std::numeric_limits<float>::quiet_NaN());
  }
  restore_buffers();
  std::string where;
  if (auto f = loc.first_nonfinite()) {
    where = f->str();
  } else if (!std::isfinite(ls.item<double>())) {
    where = "the loss (every module output was finite)";
  } else if (auto g = locate_nonfinite_grad(model_)) {
    where = g->str();
  } else {
    where = "not reproduced on replay";
  }
  opt_.zero_grad();
  return where;
}

std::string StepRunner::locate_spike(const at::Tensor& x) {
  // The loss is finite, so nothing is non-finite to find: compare this batch's module outputs
  // under the last good weights (the snapshot) and the current ones. Forward only, on the first
  // micro-batch; parameters and BatchNorm statistics are put back afterwards (also on out-of-memory).
  if (!snapshot_) return "not located (no good state in memory)";
  torch::NoGradGuard ng;
  const at::Tensor xm = o_.micro_batch > 0 ? x.narrow(0, 0, std::min(o_.micro_batch, x.size(0))) : x;
  auto params = model_.parameters();
  auto bufs = model_.buffers();
  std::vector<at::Tensor> current, saved;
  for (auto& p : params) current.push_back(p.detach().clone());
  for (auto& b : bufs) saved.push_back(b.detach().clone());
  auto replay = [&](MagnitudeRecorder& rec) {
    {
      models::WatchScope scope(&rec);
      forward_logits(model_, xm, o_.precision);
    }
    for (size_t i = 0; i < bufs.size(); ++i) bufs[i].copy_(saved[i]);
  };
  MagnitudeRecorder bad, good;
  try {
    maybe_inject_replay_oom();
    replay(bad);
    for (size_t i = 0; i < params.size(); ++i) params[i].copy_(snapshot_->params[i]);
    replay(good);
  } catch (const std::exception& e) {
    for (size_t i = 0; i < params.size(); ++i) params[i].copy_(current[i]);
    for (size_t i = 0; i < bufs.size(); ++i) bufs[i].copy_(saved[i]);
    return replay_out_of_memory(e);
  }
  for (size_t i = 0; i < params.size(); ++i) params[i].copy_(current[i]);
  auto g = first_growth(good, bad, o_.guard.spike_factor);
  return g ? g->str() + fmt::format(" (compared with the weights of step {})", snapshot_->step)
           : "not located (the model has no watched modules)";
}

void StepRunner::take_snapshot(const std::vector<at::Tensor>* buffers_before) {
  Snapshot s;
  torch::NoGradGuard ng;
  for (auto& p : model_.parameters()) s.params.push_back(p.detach().clone());
  for (auto& b : buffers_before ? *buffers_before : model_.buffers()) s.buffers.push_back(b.detach().clone());
  std::ostringstream os;
  torch::serialize::OutputArchive ar;
  opt_.save(ar);
  ar.save_to(os);
  s.optimizer = os.str();
  if (ema_) {
    for (auto& p : ema_->model().parameters()) s.ema_params.push_back(p.detach().clone());
    for (auto& b : ema_->model().buffers()) s.ema_buffers.push_back(b.detach().clone());
  }
  s.step = steps_;
  s.healthy_steps = healthy_steps_;
  s.loss_ema = loss_ema_;
  snapshot_ = std::move(s);
}

void StepRunner::restore_snapshot() {
  if (!snapshot_) return;
  torch::NoGradGuard ng;
  auto ps = model_.parameters();
  for (size_t i = 0; i < ps.size(); ++i) ps[i].copy_(snapshot_->params[i]);
  auto bs = model_.buffers();
  for (size_t i = 0; i < bs.size(); ++i) bs[i].copy_(snapshot_->buffers[i]);
  std::istringstream is(snapshot_->optimizer);
  torch::serialize::InputArchive ar;
  ar.load_from(is, device_);
  opt_.load(ar);
  if (ema_) {
    auto eps = ema_->model().parameters();
    for (size_t i = 0; i < eps.size(); ++i) eps[i].copy_(snapshot_->ema_params[i]);
    auto ebs = ema_->model().buffers();
    for (size_t i = 0; i < ebs.size(); ++i) ebs[i].copy_(snapshot_->ema_buffers[i]);
  }
  // The applied-step counter is what the schedule reads: the undone steps are undone for it too.
  steps_ = snapshot_->step;
  healthy_steps_ = snapshot_->healthy_steps;
  loss_ema_ = snapshot_->loss_ema;
}

void StepRunner::backup_buffers() {
  // Buffers (BatchNorm statistics) are copied before the forward: a non-finite forward would otherwise poison
  // them even though the step is skipped. Copied into storage allocated once (no allocation on the hot path).
  const auto buffers = model_.buffers();
  if (buffer_backup_.size() != buffers.size()) {
    buffer_backup_.clear();
    for (auto& b : buffers) buffer_backup_.push_back(at::empty_like(b));
  }
  {
    torch::NoGradGuard ng;
    for (size_t i = 0; i < buffers.size(); ++i) buffer_backup_[i].copy_(buffers[i]);
  }
}

void StepRunner::forward_backward_replayed(const at::Tensor& x, const at::Tensor& y, bool inject, StepResult& r) {
  const auto buffers = model_.buffers();
  opt_.zero_grad();
  r.loss = at::zeros({}, x.options().dtype(at::kDouble));
  r.correct = at::zeros({}, x.options().dtype(at::kLong));
  FaultInjector inj(o_.inject.where, nullptr);
  const bool inject_module = inject && o_.inject.where != "loss" && o_.inject.where != "grad";
  // Out-of-memory recovery: the failed attempt's tensors are released when its frames unwind;
  // the exception is inspected and dropped inside the catch, so nothing keeps them alive. Then
  // the partial gradients are freed, the micro-batch halves and the same samples are replayed.
  // Data-parallel: after each attempt the ranks agree, in one all-reduce, on whether any of them ran out
  // of memory (each sets its own slot) and sum their loss and hits; a failed rank first completes the
  // attempt's gradient collectives (abandon_gradients), so no rank waits on one that never comes.
  const int64_t world = sync_ ? sync_->world_size() : 1;
  at::Tensor agreed;    // [oom flag per rank, loss sum, hits, samples, stop requests], summed over ranks
  at::Tensor agreed_host;
  for (;;) {
    std::string oom_message;
    bool local_oom = false;
    try {
      forward_backward(x, y, inject && o_.inject.where == "loss", inject_module ? &inj : nullptr, r.loss, r.correct,
                       sync_);
    } catch (const std::exception& e) {
      if (!o_.oom_recovery || !memory::is_out_of_memory(e)) throw;
      oom_message = oom_summary(e);
      if (sync_ && !sync_->can_replay()) {
        // The other ranks are inside synchronised BatchNorm collectives this rank will never issue: stop
        // (they report this rank as gone) rather than feed them mismatched collectives.
        throw std::runtime_error(fmt::format(
            "out of memory on rank {} at step {} ({}) with model.sync_bn = true: the ranks cannot replay the step "
            "together (this rank stopped mid-forward, inside the synchronised BatchNorm collectives). Set "
            "train.micro_batch lower (or \"auto\"), or raise memory.budget", sync_->rank(), steps_ + 1,
            oom_message));
      }
      local_oom = true;
      if (sync_) sync_->abandon_gradients();
    }
    std::vector<int64_t> oom_ranks;
    if (sync_) {
      const auto dd = r.loss.options().dtype(at::kDouble);
      at::Tensor flags = at::zeros({world}, dd);
      if (local_oom) flags[sync_->rank()] = 1.0;
      agreed = at::cat({flags, r.loss.view({1}), r.correct.to(at::kDouble).view({1}),
                        at::full({1}, static_cast<double>(r.samples), dd),
                        at::full({1}, stop_probe_ && stop_probe_() ? 1.0 : 0.0, dd)});
      sync_->sum(agreed, "the step's agreement all-reduce (out-of-memory flags, loss, hits)");
      agreed_host = agreed.to(at::kCPU);
      for (int64_t k = 0; k < world; ++k) if (agreed_host.data_ptr<double>()[k] > 0) oom_ranks.push_back(k);
    } else if (local_oom) {
      oom_ranks.push_back(0);
    }
    if (oom_ranks.empty()) break;
    if (sync_) {
      std::string list;
      for (auto k : oom_ranks) list += (list.empty() ? "" : ", ") + std::to_string(k);
      oom_message = fmt::format("rank {} ran out of memory{}", list, local_oom ? ": " + oom_message : "");
    }
    // Undo the partial step: gradients freed, BatchNorm statistics back to before the batch (the
    // replay updates them once), the CUDA cache handed back so the smaller micro-batch can use it.
    for (auto& p : params_) p.mutable_grad() = at::Tensor();
    {
      torch::NoGradGuard ng;
      for (size_t i = 0; i < buffers.size(); ++i) buffers[i].copy_(buffer_backup_[i]);
    }
    r.loss.zero_();
    r.correct.zero_();
    const int64_t n = x.size(0);
    const int64_t current = micro_batch_in_force(o_.micro_batch, n);
    o_.micro_batch = replay_micro_batch(device_, current, [&] {
      const auto st = device::memory_stats(device_);
      return std::runtime_error(fmt::format(
          "out of memory at micro-batch 1 (step {}): {}. Tried micro-batches down from {}; peak memory {} "
          "bytes{}. Lower the image size or model, raise memory.budget, or use train.precision = \"bf16\".",
          steps_ + 1, oom_message, n, st.peak, st.budget >= 0 ? fmt::format(", budget {} bytes", st.budget) : ""));
    });
    ++oom_recoveries_;
    const std::string note = fmt::format(
        "out of memory at step {} with micro-batch {} ({}); replaying the same {} samples with micro-batch {} "
        "({} accumulation steps)", steps_ + 1, current, oom_message, n, o_.micro_batch,
        (n + o_.micro_batch - 1) / o_.micro_batch);
    events_.push_back(note);
    r.notes.push_back(note);
  }
  if (sync_) {
    // Over the global batch: every rank sees the same loss (the same skip and spike decisions).
    r.samples = static_cast<int64_t>(agreed_host.data_ptr<double>()[world + 2]);
    r.stop = agreed_host.data_ptr<double>()[world + 3] > 0;
    r.correct = agreed[world + 1].to(at::kLong);
    r.loss = agreed[world] / static_cast<double>(r.samples);
  } else {
    r.loss = r.loss / static_cast<double>(r.samples);
  }
  if (inject && o_.inject.where == "grad" && !params_.empty() && params_[0].grad().defined()) {
    params_[0].grad().fill_(std::numeric_limits<float>::quiet_NaN());
  }
}

void StepRunner::guard_skip(const at::Tensor& x, const at::Tensor& y, int64_t attempt, bool spike, bool loss_finite,
                            double loss_value, StepResult& r) {
  ++consecutive_skips_;
  ++skipped_total_;
  if (!o_.guard.enabled) {
    throw TrainingDiverged(fmt::format("non-finite loss or gradient at step {} and guard.enabled = false", steps_ + 1));
  }
  std::string message;
  if (spike) {
    message = fmt::format("step {} (attempt {}) skipped: loss spike {:.4g} > {} x running mean {:.4g}; started at: {}",
                          steps_ + 1, attempt, loss_value, o_.guard.spike_factor, loss_ema_,
                          o_.guard.locate ? locate_spike(x) : "not located (guard.locate = false)");
  } else {
    const std::string where = o_.guard.locate ? locate(x, y) : "not located (guard.locate = false)";
    message = fmt::format("step {} (attempt {}) skipped: non-finite {}; first non-finite: {}{}", steps_ + 1,
                          attempt, loss_finite ? "gradient" : "loss", where,
                          scaler_.enabled() ? fmt::format("; loss scale now {}", scaler_.scale_value()) : "");
  }
  events_.push_back(message);
  r.guard.push_back({"skip", std::move(message)});
  if (consecutive_skips_ >= o_.guard.max_consecutive_skips) {
    ++rollbacks_;
    if (rollbacks_ > o_.guard.max_rollbacks) {
      std::string report = fmt::format(
          "training diverged: {} rollbacks did not help (guard.max_rollbacks = {}); learning rate already "
          "scaled by {:.3g}. Guard log:\n",
          rollbacks_ - 1, o_.guard.max_rollbacks, lr_scale_);
      for (const auto& e : events_) report += "  " + e + "\n";
      report += "Try a lower optim.lr, gradient clipping (train.grad_clip_norm), or a longer warm-up.";
      throw TrainingDiverged(report);
    }
    const int64_t undone_from = steps_;
    restore_snapshot();
    lr_scale_ *= o_.guard.lr_factor;
    consecutive_skips_ = 0;
    std::string rollback = fmt::format(
        "rollback {} at step {}: {} consecutive skips; restored the state of step {} (steps {}..{} undone), "
        "learning rate x{:.3g} (now x{:.3g}){}",
        rollbacks_, undone_from + 1, o_.guard.max_consecutive_skips, steps_, steps_ + 1, undone_from,
        o_.guard.lr_factor, lr_scale_,
        scaler_.enabled() ? fmt::format("; loss scale kept at {}", scaler_.scale_value()) : "");
    events_.push_back(rollback);
    r.guard.push_back({"rollback", std::move(rollback)});
  }
}

StepResult StepRunner::run(const at::Tensor& x, const at::Tensor& y) {
  if (!snapshot_ && o_.guard.enabled) take_snapshot();  // the state before the first step
  StepResult r;
  r.samples = x.size(0);
  r.lr = lr_at_(steps_) * lr_scale_;
  set_lr(opt_, r.lr, o_.group_lr_factors);
  const int64_t attempt = ++attempts_;
  const bool inject = o_.inject.active_at(attempt);

  // 1. forward/backward over micro-batches, loss scaled (BatchNorm statistics backed up first).
  backup_buffers();
  forward_backward_replayed(x, y, inject, r);

  // 2. unscale, 3. non-finite check (gradients and loss), 4. clip
  std::vector<at::Tensor> grads;
  grads.reserve(params_.size());
  for (auto& p : params_) if (p.grad().defined()) grads.push_back(p.grad());
  const at::Tensor grad_inf = scaler_.unscale_(grads);
  const at::Tensor found_inf = at::maximum(grad_inf, r.loss.isfinite().logical_not().to(at::kFloat));
  // One multi-tensor launch for every gradient's norm (a fused kernel on CUDA), then the norm of the norms.
  r.grad_norm = grads.empty() ? at::zeros({}, x.options().dtype(at::kFloat))
                              : at::stack(at::_foreach_norm(grads, 2)).to(at::kFloat).norm(2);
  // The step's one host sync: the guard must know whether to apply the update.
  // found_inf and the loss come back together, so the spike check costs no extra sync.
  const at::Tensor host = at::stack({found_inf.to(at::kDouble), r.loss.to(at::kDouble)}).to(at::kCPU);
  const double* hv = host.data_ptr<double>();
  const double loss_value = hv[1];
  const bool loss_finite = std::isfinite(loss_value);
  // With the loss scaler on, inf/NaN gradients under a finite loss are the scaler's business (GradScaler's
  // rule): the scale backs off and the step is skipped, with no guard skip, locator or rollback. A non-finite
  // loss is not an fp16 range problem (no scale changes the forward): the guard's.
  const bool overflow = scaler_.enabled() && loss_finite && hv[0] > 0;
  const bool nonfinite = !overflow && hv[0] > 0;
  // A loss spike (finite but > spike_factor x its running mean) is a divergence caught before it
  // turns into inf/NaN; it is handled like a non-finite step.
  const bool spike = hv[0] == 0 && o_.guard.spike_factor > 0 && loss_ema_ > 0 &&
                     healthy_steps_ >= o_.guard.spike_warmup && loss_value > o_.guard.spike_factor * loss_ema_;
  if (hv[0] == 0 && !spike) {
    // The weights just produced a healthy loss and finite gradients: a verified-good state to
    // snapshot (snapshotting after the update would keep the state a bad update produced).
    // (step 0's state was snapshotted before the first attempt.)
    if (o_.guard.enabled && o_.guard.snapshot_every > 0 && steps_ > 0 && steps_ % o_.guard.snapshot_every == 0) {
      take_snapshot(&buffer_backup_);  // this step's forward already moved the BatchNorm statistics
    }
    clip_gradients(grads, o_.clip_value, o_.clip_norm, r.grad_norm);
    // 5. optimizer step
    opt_.step();
  }
  mark_phase(timer_, device_, monitor::Phase::kOptimizer);
  // 6. scaler update (backs off on a non-finite step, as GradScaler does)
  scaler_.update(found_inf);

  if (overflow || nonfinite || spike) {
    {
      torch::NoGradGuard ng;
      auto bufs = model_.buffers();
      for (size_t i = 0; i < bufs.size(); ++i) bufs[i].copy_(buffer_backup_[i]);
    }
    opt_.zero_grad();
    r.applied = false;
  }
  if (overflow) {
    r.overflow = true;
    ++overflows_;
    ++consecutive_overflows_;
    if (scaler_.scale_value() < scaler_.options().min_scale) scale_collapsed(x, y, attempt);
    return r;
  }
  consecutive_overflows_ = 0;
  if (nonfinite || spike) {
    guard_skip(x, y, attempt, spike, loss_finite, loss_value, r);
    return r;
  }
  // 7. counter (the schedule reads it), 8. EMA
  r.applied = true;
  consecutive_skips_ = 0;
  loss_ema_ = loss_ema_ > 0 ? 0.9 * loss_ema_ + 0.1 * loss_value : loss_value;
  ++healthy_steps_;
  ++steps_;
  if (ema_) ema_->update(model_);
  mark_phase(timer_, device_, monitor::Phase::kOptimizer);
  return r;
}

void StepRunner::scale_collapsed(const at::Tensor& x, const at::Tensor& y, int64_t attempt) {
  std::string report = fmt::format(
      "training diverged: the loss scale collapsed to {:.3g} (below the floor {:.3g} = 2^-14) after {} gradient "
      "overflows in a row at step {} (attempt {}): the gradients are inf/NaN at any scale while the loss is finite, "
      "which is divergence, not fp16 range.",
      scaler_.scale_value(), scaler_.options().min_scale, consecutive_overflows_, steps_ + 1, attempt);
  if (o_.guard.locate) report += " First non-finite: " + locate(x, y) + ".";
  if (!events_.empty()) {
    report += " Guard log:\n";
    for (const auto& e : events_) report += "  " + e + "\n";
  }
  report += " Try a lower optim.lr, gradient clipping (train.grad_clip_norm), or train.precision = \"bf16\".";
  throw TrainingDiverged(report);
}

void clip_gradients(const std::vector<at::Tensor>& grads, double clip_value, double clip_norm,
                    const at::Tensor& norm) {
  if (clip_value > 0) for (const auto& g : grads) g.clamp_(-clip_value, clip_value);
  if (clip_norm > 0 && !grads.empty()) {
    // torch.nn.utils.clip_grad_norm_: coefficient max_norm / (total_norm + 1e-6), capped at 1, applied to every
    // gradient; total_norm of the gradients as they are now (after the value clamp above).
    const at::Tensor total = norm.defined() && clip_value <= 0 ? norm
                                                               : at::stack(at::_foreach_norm(grads, 2)).to(at::kFloat).norm(2);
    const at::Tensor coef = (clip_norm / (total + 1e-6)).clamp_max(1.0);
    for (const auto& g : grads) g.mul_(coef.to(g.device()));
  }
}

nlohmann::json StepRunner::state() const {
  return {{"steps", steps_},         {"attempts", attempts_}, {"consecutive_skips", consecutive_skips_},
          {"skipped", skipped_total_}, {"rollbacks", rollbacks_},
          {"lr_scale", lr_scale_},   {"scaler", scaler_.state()},
          {"micro_batch", o_.micro_batch}, {"oom_recoveries", oom_recoveries_},
          {"loss_ema", loss_ema_},   {"healthy_steps", healthy_steps_},
          {"overflows", overflows_}, {"consecutive_overflows", consecutive_overflows_}};
}

void StepRunner::load_state(const nlohmann::json& s) {
  steps_ = s.at("steps");
  attempts_ = s.at("attempts");
  consecutive_skips_ = s.at("consecutive_skips");
  skipped_total_ = s.at("skipped");
  rollbacks_ = s.at("rollbacks");
  lr_scale_ = s.at("lr_scale");
  o_.micro_batch = s.at("micro_batch");
  oom_recoveries_ = s.at("oom_recoveries");
  loss_ema_ = s.at("loss_ema");
  healthy_steps_ = s.at("healthy_steps");
  // Checkpoints written before the scaler's overflows were counted apart from the guard's skips have neither.
  overflows_ = s.value("overflows", int64_t{0});
  consecutive_overflows_ = s.value("consecutive_overflows", int64_t{0});
  scaler_.load_state(s.at("scaler"));
}

}  // namespace keel::train
