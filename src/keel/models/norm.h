// BatchNorm forwards go through batch_norm() so that data-parallel training can synchronise the batch
// statistics across ranks (model.sync_bn; dist/sync_bn.h) without a module type of its own: the modules
// stay torch::nn::BatchNorm2d, with torchvision's state-dict names.
#pragma once
#include <torch/nn/modules/batchnorm.h>

#include <atomic>

namespace keel::models {

// Computes a training-mode BatchNorm forward with statistics over every rank.
class BatchNormSync {
 public:
  virtual ~BatchNormSync() = default;
  virtual at::Tensor forward(torch::nn::BatchNorm2dImpl& bn, const at::Tensor& x) = 0;
};

namespace detail {
inline std::atomic<BatchNormSync*> batch_norm_sync{nullptr};
}

// Installs (or with nullptr removes) the process-wide synchronised BatchNorm; training-mode forwards of
// every model use it while installed. Evaluation-mode forwards never do (they use running statistics).
inline void set_batch_norm_sync(BatchNormSync* s) { detail::batch_norm_sync.store(s); }

// bn(x), or its synchronised form in training mode while one is installed.
inline at::Tensor batch_norm(torch::nn::BatchNorm2dImpl& bn, const at::Tensor& x) {
  BatchNormSync* s = detail::batch_norm_sync.load(std::memory_order_relaxed);
  return s && bn.is_training() ? s->forward(bn, x) : bn.forward(x);
}

}  // namespace keel::models
