// run_epoch(): the training engine's epoch (loop.h).
#include "keel/train/loop.h"

#include <chrono>
#include <vector>

#include "keel/data/image_io.h"
#include "keel/train/layout.h"

namespace keel::train {
HostSums EpochSums::host() const { return {loss_sum.item<double>(), correct.item<int64_t>(), seen}; }

EpochOutcome run_epoch(models::Net& model, StepRunner& runner, data::Loader& loader, data::DeviceAugment& aug,
                       device::Uploader& upload, monitor::StepTimer& timer, const EpochOptions& o, int64_t epoch,
                       int64_t resume_batches, const HostSums& resumed, const EpochHooks& hooks) {
  using Clock = std::chrono::steady_clock;
  model.train();
  loader.start_epoch(epoch);
  const auto t_epoch = Clock::now();
  const auto on_device = at::TensorOptions().device(upload.device());
  EpochOutcome out;
  EpochSums& sums = out.sums;
  sums.loss_sum = at::zeros({}, on_device.dtype(at::kDouble));
  sums.correct = at::zeros({}, on_device.dtype(at::kLong));
  int64_t window_steps = 0, batch_in_epoch = 0;
  if (resume_batches > 0) {
    for (; batch_in_epoch < resume_batches; ++batch_in_epoch) {
      if (!loader.next()) break;
    }
    sums.loss_sum.fill_(resumed.loss_sum);
    sums.correct.fill_(resumed.correct);
    sums.seen = resumed.seen;
  }
  at::Tensor window_loss = at::zeros({}, on_device.dtype(at::kDouble));
  at::Tensor last_norm = at::zeros({}, on_device.dtype(at::kFloat));
  while (runner.steps() < o.total_steps) {
    if (hooks.before_step) hooks.before_step(runner.steps() + 1);
    timer.begin_step();
    auto b = loader.next();
    timer.mark(monitor::Phase::kDataWait);
    if (!b) {
      timer.end_step(0);
      break;
    }
    ++batch_in_epoch;
    // CUDA: pinned side-stream copy (queued, not waited for); CPU: nothing to copy.
    at::Tensor images = upload.upload(b->images), labels = upload.upload(b->labels);
    timer.mark(monitor::Phase::kH2D);
    if (o.world_size > 1) {
      aug.reseed(data::mix_seed(o.seed, static_cast<uint64_t>(o.rank),
                                static_cast<uint64_t>(epoch * o.per_epoch + batch_in_epoch)));
    }
    at::Tensor x = aug.train(images);               // (N, C, H, W) float
    const at::Tensor targets = aug.mix(x, labels);  // (N) labels, or (N, K) soft targets when mixed
    x = to_layout(x, o.channels_last);
    timer.mark(monitor::Phase::kOther);
    const StepResult r = runner.run(x, targets);
    if (!r.applied) timer.end_step(r.samples);
    if (hooks.after_attempt) hooks.after_attempt(epoch, *b, r);
    if (!r.applied) continue;
    sums.loss_sum += r.loss * static_cast<double>(r.samples);
    sums.correct += r.correct;
    sums.seen += r.samples;
    window_loss += r.loss;
    last_norm = r.grad_norm;
    ++window_steps;
    AppliedStep s;
    s.epoch = epoch;
    s.step = runner.steps();
    s.batch_in_epoch = batch_in_epoch;
    s.lr = r.lr;
    s.stop = r.stop;
    timer.end_step(r.samples);
    if (o.log_every > 0 && (s.step % o.log_every == 0 || s.step == o.total_steps)) {
      // The one host read-back of the logging interval.
      LogWindow w;
      w.stats = timer.take_window();
      w.loss = window_loss.item<double>() / static_cast<double>(window_steps);
      w.grad_norm = last_norm.item<double>();
      s.window = w;
      window_loss.zero_();
      window_steps = 0;
    }
    if (hooks.after_applied && hooks.after_applied(s, sums)) {
      out.interrupted = true;
      break;
    }
  }
  loader.stop();
  out.seconds = std::chrono::duration<double>(Clock::now() - t_epoch).count();
  return out;
}

}  // namespace keel::train
