// evaluate(): one pass over a split, no gradients.
#include "keel/train/evaluate.h"

#include <algorithm>
#include <chrono>

#include <fmt/format.h>
#include <torch/torch.h>

#include "keel/device/device.h"
#include "keel/memory/oom.h"
#include "keel/train/layout.h"
#include "keel/train/oom_replay.h"
#include "keel/train/step.h"

namespace keel::train {
namespace {

using Clock = std::chrono::steady_clock;

}  // namespace

nlohmann::json EvalResult::to_json() const {
  return {{"loss", loss}, {"top1", top1}, {"top5", top5}, {"samples", samples}, {"seconds", seconds}};
}

EvalResult evaluate(models::Net& model, data::Loader& loader, const data::DeviceAugment& aug,
                    bool channels_last, Precision precision, int64_t* micro_batch, bool oom_recovery,
                    dist::StepSync* sync) {
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
      const int64_t m = micro_batch_in_force(micro_batch ? *micro_batch : 0, len);
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
        oom = oom_summary(e);
      }
      *micro_batch = replay_micro_batch(up.device(), m, [&] {
        return std::runtime_error(fmt::format("out of memory in evaluation at micro-batch 1: {}. Raise memory.budget "
                                              "or lower the image size.", oom));
      });
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
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return r;
}

}  // namespace keel::train
