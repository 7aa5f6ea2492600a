// Batch planner: binary search over the divisors of the batch, each candidate measured by a real
// step under the budget allocator.
#include "keel/train/planner.h"

#include <chrono>
#include <fmt/format.h>
#include <torch/torch.h>

#include "keel/device/device.h"
#include "keel/memory/budget.h"
#include "keel/memory/oom.h"
#include "keel/train/layout.h"

namespace keel::train {
namespace {

using Clock = std::chrono::steady_clock;

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

// Restores the device's budget however planning ends.
struct BudgetRestore {
  at::Device device;
  int64_t budget;
  ~BudgetRestore() { device::set_budget(device, budget); }
};

}  // namespace

std::vector<int64_t> divisors(int64_t n) {
  std::vector<int64_t> d;
  for (int64_t i = 1; i <= n; ++i) if (n % i == 0) d.push_back(i);
  return d;
}

PlanResult plan_batch(models::Net& model, StepRunner& runner, const PlanOptions& o) {
  TORCH_CHECK(o.batch_size >= 1 && o.budget > 0, "plan_batch: batch_size and budget must be positive");
  const at::Device dev = device::of(model);
  PlanResult r;
  r.budget = o.budget;
  r.limit = static_cast<int64_t>(static_cast<double>(o.budget) * (1.0 - o.margin)) - o.reserve;
  const std::string limit_text = fmt::format("{} (budget {} - {:.0f}% margin - {} reserved for the loader queue "
                                             "and EMA)", memory::format_bytes(r.limit), memory::format_bytes(o.budget),
                                             100 * o.margin, memory::format_bytes(o.reserve));
  device::synchronize(dev);
  r.baseline = device::memory_stats(dev).current;
  if (r.limit <= r.baseline) {
    throw PlanError(fmt::format("the trial limit {} is already used by the model ({} allocated); raise "
                                "memory.budget or lower memory.plan_margin", limit_text,
                                memory::format_bytes(r.baseline)));
  }
  BudgetRestore restore{dev, o.budget};
  device::set_budget(dev, r.limit);
  const auto on_dev = at::TensorOptions().device(dev);
  model.train();

  // Worst-case inputs: a whole batch at the largest image size, alive during the step as the
  // trainer's batch is; steps run on its first samples.
  at::Tensor x, y;
  auto allocate = [&](int64_t n) {
    x = at::randn({n, o.channels, o.height, o.width}, on_dev);
    x = to_layout(x, o.channels_last);
    y = at::randint(0, o.num_classes, {n}, on_dev.dtype(at::kLong));
  };
  try {
    allocate(o.batch_size);
    // Optimizer state, gradients and the guard's snapshot exist from the first step on: one step
    // on two samples creates them before any candidate is measured.
    runner.set_micro_batch(0);
    const int64_t n = std::min<int64_t>(2, o.batch_size);
    runner.run(x.narrow(0, 0, n), y.narrow(0, 0, n));
  } catch (const std::exception& e) {
    if (!memory::is_out_of_memory(e)) throw;
    throw PlanError(fmt::format("the model, its optimizer state and one batch of {} images of {}x{}x{} do not fit in "
                                "the trial limit {}: {}. Raise memory.budget or use a smaller model or image size.",
                                o.batch_size, o.channels, o.height, o.width, limit_text, first_line(e.what())));
  }

  auto trial = [&](bool train, int64_t m) {
    PlanTrial t;
    t.train = train;
    t.micro_batch = m;
    device::synchronize(dev);
    device::reset_peak(dev);
    const auto t0 = Clock::now();
    try {
      const int64_t total = train ? o.batch_size : o.eval_batch_size;
      const int64_t n = std::min(total, 2 * m);  // two micro-batches: gradients accumulate into existing ones
      if (train) {
        runner.set_micro_batch(m);
        runner.run(x.narrow(0, 0, n), y.narrow(0, 0, n));
      } else {
        torch::NoGradGuard ng;
        model.eval();
        for (int64_t s = 0; s < n; s += m) forward_logits(model, x.narrow(0, s, m), o.precision);
      }
      device::synchronize(dev);
      t.fits = true;
    } catch (const std::exception& e) {
      if (!memory::is_out_of_memory(e)) throw;
      t.error = first_line(e.what());
    }
    model.train();
    if (!t.fits) {
      model.zero_grad(/*set_to_none=*/true);
      device::empty_cache(dev);
    }
    t.peak = device::memory_stats(dev).peak;
    t.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    r.trials.push_back(t);
    return t.fits;
  };
  // The largest divisor of `total` that fits; memory grows with the micro-batch, so binary search.
  auto search = [&](bool train, int64_t total) -> int64_t {
    const std::vector<int64_t> ds = divisors(total);
    if (trial(train, ds.back())) return ds.back();
    int64_t lo = -1, hi = static_cast<int64_t>(ds.size()) - 1;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      (trial(train, ds[mid]) ? lo : hi) = mid;
    }
    return lo < 0 ? 0 : ds[lo];
  };
  auto peak_of = [&](bool train, int64_t m) {
    for (const auto& t : r.trials) if (t.train == train && t.micro_batch == m && t.fits) return t.peak;
    return int64_t{0};
  };

  r.micro_batch = search(true, o.batch_size);
  if (r.micro_batch == 0) {
    throw PlanError(fmt::format("not even micro-batch 1 fits a training step in the trial limit {} ({}); lower the "
                                "image size, use train.precision = \"bf16\" or model.checkpoint_stages = true, or "
                                "raise memory.budget", limit_text, r.trials.back().error));
  }
  r.accumulation_steps = o.batch_size / r.micro_batch;
  r.train_peak = peak_of(true, r.micro_batch);
  if (o.eval_batch_size > 0) {
    // The training batch is gone during evaluation; the evaluation batch takes its place.
    x = at::Tensor();
    y = at::Tensor();
    try {
      allocate(o.eval_batch_size);
    } catch (const std::exception& e) {
      if (!memory::is_out_of_memory(e)) throw;
      throw PlanError(fmt::format("one evaluation batch of {} images does not fit in the trial limit {}; lower "
                                  "train.eval_batch_size", o.eval_batch_size, limit_text));
    }
    r.eval_micro_batch = search(false, o.eval_batch_size);
    if (r.eval_micro_batch == 0) {
      throw PlanError(fmt::format("not even one image fits an evaluation forward in the trial limit {}; raise "
                                  "memory.budget", limit_text));
    }
    r.eval_peak = peak_of(false, r.eval_micro_batch);
  }
  return r;
}

std::string PlanResult::summary() const {
  std::string s = fmt::format(
      "micro-batch {} x {} accumulation steps: a full training step peaked at {}, within the trial limit {} "
      "(budget {}; {} allocated before the trials)",
      micro_batch, accumulation_steps, memory::format_bytes(train_peak), memory::format_bytes(limit),
      memory::format_bytes(budget), memory::format_bytes(baseline));
  int64_t next = 0;  // the smallest training micro-batch above the choice that was tried and did not fit
  for (const auto& t : trials) {
    if (t.train && !t.fits && t.micro_batch > micro_batch && (next == 0 || t.micro_batch < next)) next = t.micro_batch;
  }
  if (next > 0) s += fmt::format("; micro-batch {} did not fit", next);
  s += "\n";
  if (eval_micro_batch > 0) {
    s += fmt::format("evaluation micro-batch {}: peak {}\n", eval_micro_batch, memory::format_bytes(eval_peak));
  }
  s += "trials (in order):\n";
  for (const auto& t : trials) {
    s += fmt::format("  {:5} micro-batch {:5}: {} peak {:>10}  {:.1f}s{}\n", t.train ? "train" : "eval",
                     t.micro_batch, t.fits ? "fits     " : "too large", memory::format_bytes(t.peak), t.seconds,
                     t.fits ? "" : "  (" + t.error + ")");
  }
  return s;
}

nlohmann::json PlanResult::to_json() const {
  nlohmann::json tr = nlohmann::json::array();
  for (const auto& t : trials) {
    tr.push_back({{"train", t.train}, {"micro_batch", t.micro_batch}, {"fits", t.fits}, {"peak_bytes", t.peak},
                  {"seconds", t.seconds}, {"error", t.error}});
  }
  return {{"budget_bytes", budget},     {"limit_bytes", limit},
          {"micro_batch", micro_batch}, {"accumulation_steps", accumulation_steps},
          {"train_peak_bytes", train_peak}, {"eval_micro_batch", eval_micro_batch},
          {"eval_peak_bytes", eval_peak}, {"baseline_bytes", baseline}, {"trials", tr}};
}

}  // namespace keel::train
