// Optimizer construction with parameter groups chosen by rule, and per-step learning-rate setting.
#pragma once
#include <memory>
#include <string>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

namespace keel::train {

struct OptimizerOptions {
  std::string name = "sgd";  // sgd | adamw
  double lr = 0.1;
  double momentum = 0.9;
  bool nesterov = true;
  double weight_decay = 5e-4;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
};

// Two groups: group 0 = weights of convs/linears (decayed), group 1 = biases and normalisation
// weights (every parameter with fewer than 2 dimensions; never decayed).
std::unique_ptr<torch::optim::Optimizer> make_optimizer(torch::nn::Module& model, const OptimizerOptions& o);

// Sets every group's learning rate to `lr`.
void set_lr(torch::optim::Optimizer& opt, double lr);

}  // namespace keel::train
