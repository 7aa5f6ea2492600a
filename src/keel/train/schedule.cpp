// Schedule shapes; golden values in tests/train come from torch.optim.lr_scheduler.OneCycleLR.
#include "keel/train/schedule.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace keel::train {
namespace {
// Cosine interpolation from a (t = 0) to b (t = 1), as OneCycleLR's _annealing_cos.
double cos_anneal(double a, double b, double t) { return b + (a - b) * 0.5 * (1.0 + std::cos(M_PI * t)); }
}  // namespace

double lr_factor(const ScheduleOptions& o, int64_t step, int64_t total_steps) {
  if (o.name == "constant") return 1.0;
  if (total_steps <= 1) return 1.0;
  step = std::clamp<int64_t>(step, 0, total_steps - 1);
  // OneCycleLR: phase 1 ends at step (pct_start * total - 1), phase 2 at (total - 1).
  const double warm_end = std::max(0.0, o.warmup_fraction * static_cast<double>(total_steps) - 1.0);
  const double last = static_cast<double>(total_steps - 1);
  const double s = static_cast<double>(step);
  if (o.name == "onecycle" || o.name == "warmup_cosine") {
    if (s <= warm_end && warm_end > 0) {
      const double t = s / warm_end;
      return o.name == "onecycle" ? cos_anneal(o.start_factor, 1.0, t)
                                  : o.start_factor + (1.0 - o.start_factor) * t;
    }
    const double t = (s - warm_end) / std::max(1.0, last - warm_end);
    return cos_anneal(1.0, o.final_factor, t);
  }
  throw std::invalid_argument("unknown schedule '" + o.name + "' (expected onecycle | warmup_cosine | constant)");
}

}  // namespace keel::train
