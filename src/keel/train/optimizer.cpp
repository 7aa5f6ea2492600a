// Optimizer factory: decay only on >= 2-D parameters, chosen by rule rather than by position.
#include "keel/train/optimizer.h"

#include <cmath>
#include <stdexcept>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

namespace keel::train {

std::unique_ptr<torch::optim::Optimizer> make_optimizer(torch::nn::Module& model, const OptimizerOptions& o) {
  std::vector<at::Tensor> decay, no_decay;
  for (auto& p : model.parameters()) {
    if (!p.requires_grad()) continue;
    (p.dim() >= 2 ? decay : no_decay).push_back(p);
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  if (o.name == "sgd") {
    auto opts = [&](double wd) {
      return std::make_unique<torch::optim::SGDOptions>(
          torch::optim::SGDOptions(o.lr).momentum(o.momentum).nesterov(o.nesterov).weight_decay(wd));
    };
    groups.emplace_back(decay, opts(o.weight_decay));
    groups.emplace_back(no_decay, opts(0.0));
    groups.back().options().set_lr(o.lr * o.no_decay_lr_factor);
    return std::make_unique<torch::optim::SGD>(groups, torch::optim::SGDOptions(o.lr));
  }
  if (o.name == "adamw") {
    auto opts = [&](double wd) {
      return std::make_unique<torch::optim::AdamWOptions>(
          torch::optim::AdamWOptions(o.lr).betas({o.beta1, o.beta2}).eps(o.eps).weight_decay(wd));
    };
    groups.emplace_back(decay, opts(o.weight_decay));
    groups.emplace_back(no_decay, opts(0.0));
    groups.back().options().set_lr(o.lr * o.no_decay_lr_factor);
    return std::make_unique<torch::optim::AdamW>(groups, torch::optim::AdamWOptions(o.lr));
  }
  throw std::invalid_argument("unknown optimizer '" + o.name + "' (expected sgd | adamw)");
}

std::vector<double> group_lr_factors(const OptimizerOptions& o) { return {1.0, o.no_decay_lr_factor}; }

void set_lr(torch::optim::Optimizer& opt, double lr, const std::vector<double>& factors) {
  auto& groups = opt.param_groups();
  TORCH_CHECK(factors.empty() || factors.size() == groups.size(), "set_lr: ", factors.size(),
              " group lr factors for ", groups.size(), " parameter groups");
  for (size_t i = 0; i < groups.size(); ++i) groups[i].options().set_lr(factors.empty() ? lr : lr * factors[i]);
}

double scaled_lr(double lr, const std::string& rule, int64_t batch, int64_t base_batch) {
  if (rule == "none") return lr;
  if (base_batch < 1 || batch < 1) {
    throw std::invalid_argument("optim.base_batch_size and train.batch_size must be >= 1 for optim.lr_scaling");
  }
  const double ratio = static_cast<double>(batch) / static_cast<double>(base_batch);
  if (rule == "linear") return lr * ratio;
  if (rule == "sqrt") return lr * std::sqrt(ratio);
  throw std::invalid_argument("optim.lr_scaling = '" + rule + "' (expected none | linear | sqrt)");
}

}  // namespace keel::train
