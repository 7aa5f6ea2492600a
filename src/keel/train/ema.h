// Exponential moving average of a model's weights, kept in a second model for evaluation.
#pragma once
#include "keel/models/net.h"

namespace keel::train {

class Ema {
 public:
  // `shadow` must have the same architecture as the trained model; it is initialised from `model`.
  Ema(models::NetPtr shadow, const models::Net& model, double decay);
  // shadow = decay * shadow + (1 - decay) * model for parameters; buffers (BN statistics) copied.
  void update(const models::Net& model);
  models::Net& model() { return *shadow_; }
  double decay() const { return decay_; }

 private:
  models::NetPtr shadow_;
  double decay_;
};

}  // namespace keel::train
