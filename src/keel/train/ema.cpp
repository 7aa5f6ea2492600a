// EMA of weights, as timm's ModelEmaV2 (parameters averaged, buffers copied).
#include "keel/train/ema.h"

#include <stdexcept>
#include <torch/torch.h>

namespace keel::train {

Ema::Ema(models::NetPtr shadow, const models::Net& model, double decay) : shadow_(std::move(shadow)), decay_(decay) {
  if (!(decay > 0 && decay < 1)) throw std::invalid_argument("ema.decay must be in (0, 1)");
  torch::NoGradGuard ng;
  auto sp = shadow_->parameters(), mp = model.parameters();
  auto sb = shadow_->buffers(), mb = model.buffers();
  if (sp.size() != mp.size() || sb.size() != mb.size()) throw std::invalid_argument("EMA model differs from the model");
  for (size_t i = 0; i < sp.size(); ++i) {
    sp[i].set_data(mp[i].detach().clone());
    sp[i].set_requires_grad(false);
  }
  for (size_t i = 0; i < sb.size(); ++i) sb[i].copy_(mb[i]);
}

void Ema::update(const models::Net& model) {
  torch::NoGradGuard ng;
  auto sp = shadow_->parameters(), mp = model.parameters();
  for (size_t i = 0; i < sp.size(); ++i) sp[i].lerp_(mp[i].detach(), 1.0 - decay_);
  auto sb = shadow_->buffers(), mb = model.buffers();
  for (size_t i = 0; i < sb.size(); ++i) sb[i].copy_(mb[i]);
}

}  // namespace keel::train
