// Optimizer factory: decay only on >= 2-D parameters, chosen by rule rather than by position.
// SGD and AdamW are LibTorch's (same options, state and checkpoint format) with step() written with the
// multi-tensor `_foreach_` operators, as PyTorch Python's default: LibTorch's own step launches 4-7 kernels per
// parameter, one after another (ResNet-50: ~800 per step for SGD), which left a GPU idle for milliseconds after
// the step's host sync. On CUDA a foreach call is one fused launch per chunk of tensors; on the CPU it runs the
// same per-tensor operations as before, so CPU results are unchanged bit for bit.
#include "keel/train/optimizer.h"

#include <ATen/ATen.h>
#include <cmath>
#include <map>
#include <stdexcept>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include "keel/compat/torch_compat.h"

namespace keel::train {

namespace {

// The parameters of `group` that have a gradient (LibTorch's step skips the others too).
std::vector<at::Tensor> with_grad(torch::optim::OptimizerParamGroup& group) {
  std::vector<at::Tensor> out;
  for (auto& p : group.params()) {
    if (p.grad().defined()) out.push_back(p);
  }
  return out;
}

std::vector<at::Tensor> grads_of(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> g;
  g.reserve(params.size());
  for (const auto& p : params) g.push_back(p.grad());
  return g;
}

// torch::optim::SGD::step, per group: d = g (+ wd * p); buf = momentum * buf + (1 - dampening) * d (buf = d on
// the first step); d = d + momentum * buf (nesterov) or buf; p -= lr * d.
class ForeachSGD : public torch::optim::SGD {
 public:
  using torch::optim::SGD::SGD;

  at::Tensor step(LossClosure closure = nullptr) override {
    torch::NoGradGuard no_grad;
    at::Tensor loss;
    if (closure != nullptr) {
      at::AutoGradMode enable_grad(true);
      loss = closure();
    }
    for (auto& group : param_groups_) {
      auto& o = static_cast<torch::optim::SGDOptions&>(group.options());
      const std::vector<at::Tensor> params = with_grad(group);
      if (params.empty()) continue;
      std::vector<at::Tensor> d = grads_of(params);
      if (o.weight_decay() != 0) d = at::_foreach_add(d, params, o.weight_decay());
      if (o.momentum() != 0) {
        std::vector<at::Tensor> bufs, old_bufs, old_d;
        bufs.reserve(params.size());
        for (size_t i = 0; i < params.size(); ++i) {
          const auto key = compat::optimizer_state_key(params[i]);
          auto it = state_.find(key);
          if (it == state_.end()) {  // first step: the buffer starts as d itself
            auto st = std::make_unique<torch::optim::SGDParamState>();
            st->momentum_buffer(d[i].clone().detach());
            bufs.push_back(st->momentum_buffer());
            state_[key] = std::move(st);
          } else {
            bufs.push_back(static_cast<torch::optim::SGDParamState&>(*it->second).momentum_buffer());
            old_bufs.push_back(bufs.back());
            old_d.push_back(d[i]);
          }
        }
        if (!old_bufs.empty()) {
          at::_foreach_mul_(old_bufs, o.momentum());
          at::_foreach_add_(old_bufs, old_d, 1 - o.dampening());
        }
        if (o.nesterov()) {
          d = at::_foreach_add(d, bufs, o.momentum());
        } else {
          d = bufs;
        }
      }
      at::_foreach_add_(params, d, -1 * o.lr());
    }
    return loss;
  }
};

// torch::optim::AdamW::step, per group and per step count (parameters that missed steps have their own):
// p *= 1 - lr * wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps).
// amsgrad (keel never sets it) keeps LibTorch's step.
class ForeachAdamW : public torch::optim::AdamW {
 public:
  using torch::optim::AdamW::AdamW;

  at::Tensor step(LossClosure closure = nullptr) override {
    for (auto& group : param_groups_) {
      if (static_cast<torch::optim::AdamWOptions&>(group.options()).amsgrad()) {
        return torch::optim::AdamW::step(closure);
      }
    }
    torch::NoGradGuard no_grad;
    at::Tensor loss;
    if (closure != nullptr) {
      at::AutoGradMode enable_grad(true);
      loss = closure();
    }
    for (auto& group : param_groups_) {
      auto& o = static_cast<torch::optim::AdamWOptions&>(group.options());
      const std::vector<at::Tensor> params = with_grad(group);
      if (params.empty()) continue;
      if (o.weight_decay() != 0) at::_foreach_mul_(params, 1 - o.lr() * o.weight_decay());
      struct Batch {
        std::vector<at::Tensor> p, g, m, v;
      };
      std::map<int64_t, Batch> by_step;
      for (const auto& p : params) {
        const auto key = compat::optimizer_state_key(p);
        auto it = state_.find(key);
        if (it == state_.end()) {
          auto st = std::make_unique<torch::optim::AdamWParamState>();
          st->step(0);
          st->exp_avg(at::zeros_like(p, at::MemoryFormat::Preserve));
          st->exp_avg_sq(at::zeros_like(p, at::MemoryFormat::Preserve));
          it = state_.emplace(key, std::move(st)).first;
        }
        auto& st = static_cast<torch::optim::AdamWParamState&>(*it->second);
        st.step(st.step() + 1);
        Batch& b = by_step[st.step()];
        b.p.push_back(p);
        b.g.push_back(p.grad());
        b.m.push_back(st.exp_avg());
        b.v.push_back(st.exp_avg_sq());
      }
      const double beta1 = std::get<0>(o.betas()), beta2 = std::get<1>(o.betas());
      for (auto& [step, b] : by_step) {
        const double bc1 = 1 - std::pow(beta1, static_cast<double>(step));
        const double bc2 = 1 - std::pow(beta2, static_cast<double>(step));
        at::_foreach_mul_(b.m, beta1);
        at::_foreach_add_(b.m, b.g, 1 - beta1);
        at::_foreach_mul_(b.v, beta2);
        at::_foreach_addcmul_(b.v, b.g, b.g, 1 - beta2);
        std::vector<at::Tensor> denom = at::_foreach_sqrt(b.v);
        at::_foreach_div_(denom, std::sqrt(bc2));
        at::_foreach_add_(denom, o.eps());
        at::_foreach_addcdiv_(b.p, b.m, denom, -(o.lr() / bc1));
      }
    }
    return loss;
  }
};

}  // namespace

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
    return std::make_unique<ForeachSGD>(groups, torch::optim::SGDOptions(o.lr));
  }
  if (o.name == "adamw") {
    auto opts = [&](double wd) {
      return std::make_unique<torch::optim::AdamWOptions>(
          torch::optim::AdamWOptions(o.lr).betas({o.beta1, o.beta2}).eps(o.eps).weight_decay(wd));
    };
    groups.emplace_back(decay, opts(o.weight_decay));
    groups.emplace_back(no_decay, opts(0.0));
    groups.back().options().set_lr(o.lr * o.no_decay_lr_factor);
    return std::make_unique<ForeachAdamW>(groups, torch::optim::AdamWOptions(o.lr));
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
