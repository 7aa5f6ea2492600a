// Optimizer construction with parameter groups chosen by rule, and per-step learning-rate setting.
#pragma once
#include <memory>
#include <string>
#include <vector>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

namespace keel::train {

struct OptimizerOptions {
  std::string name = "sgd";  // sgd | adamw
  double lr = 0.2;
  double momentum = 0.9;
  bool nesterov = true;
  double weight_decay = 5e-4;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double no_decay_lr_factor = 1.0;  // group 1's learning rate = lr x this
};

// Two groups: group 0 = weights of convs/linears (decayed), group 1 = biases and normalisation
// weights (every parameter with fewer than 2 dimensions; never decayed).
std::unique_ptr<torch::optim::Optimizer> make_optimizer(torch::nn::Module& model, const OptimizerOptions& o);

// Each group's learning-rate multiplier, in make_optimizer's group order: {1, no_decay_lr_factor}.
std::vector<double> group_lr_factors(const OptimizerOptions& o);

// Sets group i's learning rate to lr x factors[i] (every group to `lr` when factors is empty).
void set_lr(torch::optim::Optimizer& opt, double lr, const std::vector<double>& factors = {});

// optim.lr_scaling: lr for "none", lr x batch / base for "linear", lr x sqrt(batch / base) for "sqrt".
double scaled_lr(double lr, const std::string& rule, int64_t batch, int64_t base_batch);

}  // namespace keel::train
