// Locating the first non-finite module output / gradient, and injecting faults to test it.
#include "keel/train/locator.h"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>
#include <limits>

namespace keel::train {
namespace {

// abs-min / abs-max over the finite entries (what a user needs to see the blow-up coming).
std::pair<double, double> finite_abs_range(const at::Tensor& t) {
  at::Tensor a = t.detach().abs().to(at::kFloat);
  at::Tensor fin = a.isfinite();
  if (!fin.any().item<bool>()) return {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::quiet_NaN()};
  at::Tensor v = a.masked_select(fin);
  return {v.min().item<double>(), v.max().item<double>()};
}

}  // namespace

std::string Location::str() const {
  if (phase == "growth") {
    return fmt::format("forward output of '{}' grew {:.3g}x over the last good weights (|x| max {:.3g}, was {:.3g})",
                       module, growth, abs_max, good_abs_max);
  }
  const std::string range = std::isnan(abs_min) ? "no finite values"
                                                : fmt::format("finite |x| in [{:.3g}, {:.3g}]", abs_min, abs_max);
  return fmt::format("{} of '{}' ({})", phase == "loss" ? "loss" : phase + " output", module, range);
}

at::Tensor NonFiniteLocator::on_output(const std::string& module, const at::Tensor& out) {
  records_.push_back({module, out.detach().isfinite().all(), out.detach().clone()});
  return out;
}

std::optional<Location> NonFiniteLocator::first_nonfinite() const {
  for (const auto& r : records_) {
    if (!r.finite.item<bool>()) {
      auto [lo, hi] = finite_abs_range(r.out);
      return Location{"forward", r.module, lo, hi};
    }
  }
  return std::nullopt;
}

at::Tensor MagnitudeRecorder::on_output(const std::string& module, const at::Tensor& out) {
  records_.push_back({module, out.detach().abs().amax().to(at::kFloat)});
  return out;
}

std::optional<Location> first_growth(const MagnitudeRecorder& good, const MagnitudeRecorder& bad, double factor) {
  const auto& g = good.records();
  const auto& b = bad.records();
  std::optional<Location> most;
  for (size_t i = 0; i < std::min(g.size(), b.size()); ++i) {
    if (g[i].module != b[i].module) break;  // a different path through the model: stop comparing
    const double was = g[i].abs_max.item<double>(), now = b[i].abs_max.item<double>();
    // A module whose good output was exactly 0 has no ratio; growth from 0 counts as infinite.
    const double growth = was > 0 ? now / was : (now > 0 ? std::numeric_limits<double>::infinity() : 1.0);
    Location here{"growth", b[i].module, 0, now, growth, was};
    if (growth > factor) return here;
    if (!most || growth > most->growth) most = here;
  }
  return most;
}

std::optional<Location> locate_nonfinite_grad(const torch::nn::Module& model) {
  std::optional<Location> last;
  for (const auto& item : model.named_parameters()) {
    const at::Tensor& g = item.value().grad();
    if (!g.defined() || g.isfinite().all().item<bool>()) continue;
    const std::string& name = item.key();
    const auto dot = name.rfind('.');
    auto [lo, hi] = finite_abs_range(g);
    last = Location{"backward", dot == std::string::npos ? name : name.substr(0, dot), lo, hi};
  }
  return last;
}

bool InjectOptions::active_at(int64_t step) const {
  return std::find(steps.begin(), steps.end(), step) != steps.end();
}

at::Tensor FaultInjector::on_output(const std::string& module, const at::Tensor& out) {
  at::Tensor o = out;
  if (module == module_) {
    o = out + std::numeric_limits<float>::quiet_NaN();  // keeps the graph: gradients go NaN too
    fired_ = true;
  }
  return next_ ? next_->on_output(module, o) : o;
}

}  // namespace keel::train
