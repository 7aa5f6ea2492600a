// LossScaler: tensor-side implementation of GradScaler's dynamic scaling rule.
#include "keel/train/loss_scaler.h"

#include <stdexcept>

namespace keel::train {

LossScaler::LossScaler(LossScalerOptions o) : opts_(o) {
  if (o.growth_factor <= 1.0 || o.backoff_factor <= 0.0 || o.backoff_factor >= 1.0 || o.growth_interval < 1 ||
      o.init_scale <= 0.0) {
    throw std::invalid_argument("loss scaler: need growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1, "
                                "init_scale > 0");
  }
  scale_ = at::full({}, o.enabled ? o.init_scale : 1.0, at::kFloat);
  tracker_ = at::zeros({}, at::kInt);
}

at::Tensor LossScaler::scale(const at::Tensor& loss) const {
  return opts_.enabled ? loss * scale_.to(loss.device()) : loss;
}

at::Tensor LossScaler::unscale_(const std::vector<at::Tensor>& grads) const {
  at::Tensor found = at::zeros({}, scale_.options());
  if (grads.empty()) return found;
  const at::Tensor inv = scale_.reciprocal();  // 1 when the scaler is off (scale_ is then 1)
  if (grads.front().is_cuda()) {
    // GradScaler's own fused kernel: multiplies by inv (skipped when it is 1) and raises found on any inf/NaN,
    // a few launches for all gradients instead of three per gradient. scale_ already lives on the training
    // device (StepRunner moves it), so the .to() calls are no-ops there.
    std::vector<at::Tensor> defined;
    for (const auto& g : grads) {
      if (g.defined()) defined.push_back(g);
    }
    const at::Device dev = grads.front().device();
    found = found.to(dev);
    at::_amp_foreach_non_finite_check_and_unscale_(defined, found, inv.to(dev));
    return found;
  }
  std::vector<at::Tensor> finite;
  finite.reserve(grads.size());
  for (const auto& g : grads) {
    if (!g.defined()) continue;
    if (opts_.enabled) g.mul_(inv.to(g.device()));
    // all() of isfinite per tensor, reduced below on the gradients' device: no host sync here.
    finite.push_back(g.isfinite().all());
  }
  if (finite.empty()) return found;
  return at::stack(finite).logical_not().any().to(at::kFloat);
}

void LossScaler::update(const at::Tensor& found_inf) {
  if (!opts_.enabled) return;
  // Written with where() so it stays on the tensor side (one sync per step is the caller's).
  at::Tensor inf = found_inf.to(scale_.device()).gt(0);
  at::Tensor grown = tracker_ + 1;
  at::Tensor do_grow = grown.ge(opts_.growth_interval).logical_and(inf.logical_not());
  scale_ = at::where(inf, scale_ * opts_.backoff_factor, at::where(do_grow, scale_ * opts_.growth_factor, scale_));
  tracker_ = at::where(inf.logical_or(do_grow), at::zeros_like(tracker_), grown);
}

double LossScaler::scale_value() const { return scale_.item<double>(); }
int64_t LossScaler::growth_tracker() const { return tracker_.item<int64_t>(); }

nlohmann::json LossScaler::state() const {
  return {{"scale", scale_value()}, {"growth_tracker", growth_tracker()}, {"enabled", opts_.enabled}};
}

void LossScaler::load_state(const nlohmann::json& s) {
  scale_ = at::full({}, s.at("scale").get<double>(), scale_.options());
  tracker_ = at::full({}, s.at("growth_tracker").get<int64_t>(), tracker_.options());
}

void LossScaler::to(const at::Device& d) {
  scale_ = scale_.to(d);
  tracker_ = tracker_.to(d);
}

}  // namespace keel::train
