// Bottleneck rules; each is documented in docs/monitoring.md under its rule id.
#include "keel/monitor/bottleneck.h"

#include <cmath>
#include <fmt/format.h>

namespace keel::monitor {

namespace {

double share_of(const Measurements& m, Phase p) { return m.share[static_cast<int>(p)]; }

int pct(double fraction) { return static_cast<int>(std::lround(fraction * 100.0)); }

double gib(int64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0); }

// input-bound: the step waits for the loader; what to change depends on whether the workers are the limit.
void input_bound(const Measurements& m, const Thresholds& t, std::vector<Advice>& out) {
  const double w = share_of(m, Phase::kDataWait);
  if (w < t.input_bound_share) return;
  std::string text = fmt::format("input-bound: {}% of step time waiting for data; ", pct(w));
  if (m.data_workers == 0) {
    text += "workers=0 loads on the training thread; set data.workers >= 1 so loading overlaps compute";
  } else if (m.workers_all_busy.value_or(true)) {
    // Busy workers (or unknown): per-sample work is the limit, so add workers or do less per sample.
    text += fmt::format("workers={} {}; raise data.workers (cores permitting) or move resize/augmentation to the device",
                        m.data_workers, m.workers_all_busy ? "are all busy" : "may all be busy");
  } else {
    // Idle workers yet the step waits: the queue is too shallow to absorb uneven batches.
    text += fmt::format("workers={} are not all busy; raise data.prefetch so ready batches absorb slow ones",
                        m.data_workers);
  }
  out.push_back({"input-bound", std::move(text)});
}

// h2d-bound: copying batches to the device is a visible share of the step.
void h2d_bound(const Measurements& m, const Thresholds& t, std::vector<Advice>& out) {
  const double h = share_of(m, Phase::kH2D);
  if (h < t.h2d_share) return;
  out.push_back({"h2d-bound", fmt::format("h2d-bound: {}% of step time copying batches to the device; copy uint8 "
                                          "images and convert/normalise on the device, from pinned memory with "
                                          "non_blocking copies",
                                          pct(h))});
}

// compute-bound: forward + backward dominate; suggest only changes that apply on this device/config.
void compute_bound(const Measurements& m, const Thresholds& t, std::vector<Advice>& out) {
  const double c = share_of(m, Phase::kForward) + share_of(m, Phase::kBackward);
  if (c < t.compute_share) return;
  const std::string where =
      m.utilisation ? fmt::format("compute-bound at {}% of peak", pct(*m.utilisation))
                    : fmt::format("compute-bound ({}% of step time in forward/backward)", pct(c));
  if (m.precision == "fp32") {
    if (m.on_cuda) {
      out.push_back({"compute-bound", where + "; bf16 would help: set train.precision=bf16 (tensor cores)"});
    } else if (m.cpu_supports_bf16) {
      out.push_back({"compute-bound", where + "; bf16 would help: this CPU supports it (train.precision=bf16)"});
    }
  }
  if (m.conv_model && !m.channels_last) {
    out.push_back({"channels-last", where + "; convolutions run faster in channels-last: set "
                                            "train.channels_last=true"});
  }
  if (m.utilisation && *m.utilisation < t.low_utilisation) {
    out.push_back({"low-utilisation",
                   fmt::format("low utilisation: {}% of peak while compute-bound; kernels are too small to fill "
                               "the device: raise train.batch_size (scale optim.lr with it)",
                               pct(*m.utilisation))});
  }
}

// optimizer-bound: the per-step parameter update is a large share (many small tensors, small batch).
void optimizer_bound(const Measurements& m, const Thresholds& t, std::vector<Advice>& out) {
  const double o = share_of(m, Phase::kOptimizer);
  if (o < t.optimizer_share) return;
  out.push_back({"optimizer-bound", fmt::format("optimizer-bound: {}% of step time in the optimizer step; raise "
                                                "train.batch_size so each update serves more images",
                                                pct(o))});
}

// unaccounted-time: time outside every named phase, usually logging or host syncs.
void unaccounted(const Measurements& m, const Thresholds& t, std::vector<Advice>& out) {
  const double o = share_of(m, Phase::kOther);
  if (o < t.other_share) return;
  out.push_back({"unaccounted-time", fmt::format("unaccounted-time: {}% of step time outside data/forward/backward/"
                                                 "optimizer (logging, host syncs); raise train.log_every",
                                                 pct(o))});
}

// memory-bound: the peak is close to the budget, so batch and model size are capped by memory.
void memory_bound(const Measurements& m, const Thresholds& t, std::vector<Advice>& out) {
  if (!m.peak_memory_bytes || !m.memory_budget_bytes || *m.memory_budget_bytes <= 0) return;
  const double r = static_cast<double>(*m.peak_memory_bytes) / static_cast<double>(*m.memory_budget_bytes);
  if (r < t.memory_near_budget) return;
  out.push_back({"memory-bound",
                 fmt::format("memory-bound: peak {:.2f} GiB is {}% of the {:.2f} GiB budget; lower the micro-batch "
                             "(accumulate gradients to keep the global batch) or enable activation checkpointing{}",
                             gib(*m.peak_memory_bytes), pct(r), gib(*m.memory_budget_bytes),
                             m.precision == "fp32" && (m.on_cuda || m.cpu_supports_bf16)
                                 ? "; bf16 autocast also halves activation memory"
                                 : "")});
}

}  // namespace

Measurements Measurements::from(const StepStats& s) {
  Measurements m;
  for (int i = 0; i < kNumPhases; ++i) m.share[i] = s.share(static_cast<Phase>(i));
  return m;
}

const std::vector<std::string>& bottleneck_rules() {
  static const std::vector<std::string> ids = {"memory-bound",    "input-bound",     "h2d-bound",
                                               "compute-bound",   "channels-last",   "low-utilisation",
                                               "optimizer-bound", "unaccounted-time"};
  return ids;
}

std::vector<Advice> diagnose(const Measurements& m, const Thresholds& t) {
  std::vector<Advice> out;
  memory_bound(m, t, out);
  input_bound(m, t, out);
  h2d_bound(m, t, out);
  compute_bound(m, t, out);
  optimizer_bound(m, t, out);
  unaccounted(m, t, out);
  return out;
}

}  // namespace keel::monitor
