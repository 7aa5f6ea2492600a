// Synchronised BatchNorm (model.sync_bn): batch statistics over the global batch of every rank, the
// same as one process with the whole batch would compute them (as PyTorch's SyncBatchNorm).
#pragma once
#include "keel/dist/comm.h"
#include "keel/models/norm.h"

namespace keel::dist {

class SyncBatchNorm : public models::BatchNormSync {
 public:
  explicit SyncBatchNorm(Comm& comm) : comm_(comm) {}
  // Forward: two small all-reduces (per-channel sums and counts, then centred squares: the two-pass
  // variance, as accurate as the single-process kernel); the running statistics are updated with the
  // global mean and unbiased variance. Backward: one all-reduce of the per-channel sums of dy and
  // dy * x_hat, so the input gradient accounts for every rank's samples.
  at::Tensor forward(torch::nn::BatchNorm2dImpl& bn, const at::Tensor& x) override;

 private:
  Comm& comm_;
};

}  // namespace keel::dist
