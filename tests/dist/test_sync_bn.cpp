// Synchronised BatchNorm on a one-rank process group equals torch::nn::BatchNorm2d: outputs, input and
// parameter gradients, running statistics (the multi-rank equivalence is in test_dist.cpp).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "../test_util.h"
#include "keel/dist/comm.h"
#include "keel/dist/sync_bn.h"

TEST(SyncBatchNorm, MatchesBatchNormOnOneRank) {
  keel::dist::DistEnv env;  // rank 0 of 1
  keel::dist::CommOptions o;
  o.store = "file";
  o.store_path = keel::test::fresh_dir("sync-bn-one") + "/store";
  o.timeout_seconds = 10;
  auto comm = keel::dist::Comm::connect(env, o);
  keel::dist::SyncBatchNorm sync(*comm);
  torch::manual_seed(0);
  torch::nn::BatchNorm2d ref(6), bn(6);
  {
    torch::NoGradGuard ng;
    ref->weight.uniform_(0.5, 1.5);
    ref->bias.uniform_(-0.5, 0.5);
    bn->weight.copy_(ref->weight);
    bn->bias.copy_(ref->bias);
  }
  for (bool channels_last : {false, true}) {
    at::Tensor x0 = torch::randn({5, 6, 7, 3}) * 3 + 1;
    if (channels_last) x0 = x0.contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor target = torch::randn({5, 6, 7, 3});
    at::Tensor xa = x0.clone().requires_grad_(), xb = x0.clone().requires_grad_();
    at::Tensor ya = ref->forward(xa), yb = sync.forward(*bn, xb);
    EXPECT_LT((ya - yb).abs().max().item<double>(), 1e-5);
    // A loss that weighs samples unevenly, with an in-place op after the norm as in the ResNets.
    ((ya.relu() * target).sum({1, 2, 3}).square().mean()).backward();
    ((yb.relu_() * target).sum({1, 2, 3}).square().mean()).backward();
    std::cout << "dx " << (xa.grad() - xb.grad()).abs().max().item<double>() << " of " << xa.grad().abs().max().item<double>()
              << " dw " << (ref->weight.grad() - bn->weight.grad()).abs().max().item<double>() << " y "
              << (ya - yb).abs().max().item<double>() << "\n";
    EXPECT_LT((xa.grad() - xb.grad()).abs().max().item<double>(), 1e-4) << channels_last;
    EXPECT_LT((ref->weight.grad() - bn->weight.grad()).abs().max().item<double>(), 1e-3);
    EXPECT_LT((ref->bias.grad() - bn->bias.grad()).abs().max().item<double>(), 1e-3);
    EXPECT_LT((ref->running_mean - bn->running_mean).abs().max().item<double>(), 1e-6);
    EXPECT_LT((ref->running_var - bn->running_var).abs().max().item<double>(), 1e-5);
    EXPECT_EQ(ref->num_batches_tracked.item<int64_t>(), bn->num_batches_tracked.item<int64_t>());
  }
}
