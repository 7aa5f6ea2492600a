// Data-parallel parameters that get no gradient: two in-process ranks (threads, Gloo over a file store)
// against one process that sees both ranks' losses, with keel's SGD (momentum, Nesterov, weight decay).
// A parameter unused on every rank keeps an undefined gradient, so the optimizer skips it as one process
// would (no weight decay, no momentum); one used on some ranks only gets the average with zeros from the
// others (PyTorch DDP with find_unused_parameters).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "../test_util.h"
#include "keel/dist/comm.h"
#include "keel/dist/data_parallel.h"
#include "keel/train/optimizer.h"

namespace {

// Four 4->3 linears: `used` by every rank in every step, `partial` by rank 0 only, `first_only` by every
// rank in step 0 only (afterwards only momentum and weight decay could move it), `unused` never.
struct NetImpl : torch::nn::Module {
  torch::nn::Linear used{nullptr}, partial{nullptr}, first_only{nullptr}, unused{nullptr};
  NetImpl() {
    used = register_module("used", torch::nn::Linear(4, 3));
    partial = register_module("partial", torch::nn::Linear(4, 3));
    first_only = register_module("first_only", torch::nn::Linear(4, 3));
    unused = register_module("unused", torch::nn::Linear(4, 3));
  }
};
TORCH_MODULE(Net);

// Rank r's loss of one micro-batch x: (5, 4). With accumulation, rank 0 uses `partial` in its first
// micro-batch only, so its gradient is there at the end of backward although its hook did not fire in
// the pass that communicates.
at::Tensor loss_of(Net& net, const at::Tensor& x, int64_t rank, int step, int micro) {
  at::Tensor l = net->used(x).square().mean();
  if (rank == 0 && micro == 0) l = l + net->partial(x).tanh().sum();
  if (step == 0) l = l + (net->first_only(x) * 0.5).square().sum();
  return l;
}

keel::train::OptimizerOptions sgd() {
  keel::train::OptimizerOptions o;
  o.name = "sgd";
  o.lr = 0.1;
  o.momentum = 0.9;
  o.nesterov = true;
  o.weight_decay = 0.1;  // on the 2-D weights (make_optimizer's rule); biases get momentum only
  return o;
}

Net make_net() {
  torch::manual_seed(7);
  return Net();
}

std::map<std::string, at::Tensor> snapshot(Net& net) {
  std::map<std::string, at::Tensor> out;
  for (auto& kv : net->named_parameters()) out[kv.key()] = kv.value().detach().clone();
  return out;
}

struct Setting {
  double bucket_mb;
  bool overlap;
  int micro;
};

void run_setting(const Setting& st, const std::string& tag) {
  SCOPED_TRACE(tag);
  constexpr int kSteps = 4;
  constexpr int64_t kWorld = 2;
  // data[step][rank][micro]: (5, 4)
  torch::manual_seed(11);
  std::vector<std::vector<std::vector<at::Tensor>>> data(kSteps);
  for (auto& s : data) {
    s.resize(kWorld);
    for (auto& r : s) for (int m = 0; m < st.micro; ++m) r.push_back(torch::randn({5, 4}));
  }
  Net ref = make_net();
  const auto initial = snapshot(ref);

  // One process: the mean over ranks of each rank's loss (summed over its micro-batches), one backward.
  {
    auto opt = keel::train::make_optimizer(*ref, sgd());
    for (int s = 0; s < kSteps; ++s) {
      ref->zero_grad(/*set_to_none=*/true);
      at::Tensor total;
      for (int64_t r = 0; r < kWorld; ++r) {
        for (int m = 0; m < st.micro; ++m) {
          at::Tensor l = loss_of(ref, data[s][r][m], r, s, m) * 0.5;
          total = total.defined() ? total + l : l;
        }
      }
      total.backward();
      opt->step();
    }
    ASSERT_FALSE(ref->unused->weight.grad().defined());
  }

  // Two ranks, each its own copy of the model, its own DataParallel and optimizer.
  const std::string store = keel::test::fresh_dir("dist-unused-" + tag) + "/store";
  std::vector<Net> nets = {make_net(), make_net()};
  std::vector<std::string> errors(kWorld);
  std::vector<std::vector<bool>> unused_grad_defined(kWorld);
  std::vector<std::thread> ranks;
  for (int64_t r = 0; r < kWorld; ++r) {
    ranks.emplace_back([&, r] {
      try {
        keel::dist::DistEnv env;
        env.rank = r;
        env.world_size = kWorld;
        keel::dist::CommOptions co;
        co.store = "file";
        co.store_path = store;
        co.timeout_seconds = 20;
        auto comm = keel::dist::Comm::connect(env, co);
        Net& net = nets[r];
        keel::dist::DataParallelOptions o;
        o.bucket_mb = st.bucket_mb;
        o.overlap = st.overlap;
        keel::dist::DataParallel dp(*comm, *net, o);
        auto opt = keel::train::make_optimizer(*net, sgd());
        for (int s = 0; s < kSteps; ++s) {
          net->zero_grad(/*set_to_none=*/true);
          for (int m = 0; m < st.micro; ++m) {
            const bool last = m + 1 == st.micro;
            dp.before_backward(last);  // as train/step.cpp: only the last micro-batch communicates
            loss_of(net, data[s][r][m], r, s, m).backward();
          }
          dp.finish_gradients();
          unused_grad_defined[r].push_back(net->unused->weight.grad().defined() ||
                                           net->unused->bias.grad().defined());
          opt->step();
        }
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  }
  for (auto& t : ranks) t.join();
  for (int64_t r = 0; r < kWorld; ++r) ASSERT_EQ(errors[r], "") << "rank " << r;

  // Accumulated micro-batches are summed in another order than the single backward's: fp32 rounding.
  const double tol = st.micro == 1 ? 0.0 : 1e-6;
  for (int64_t r = 0; r < kWorld; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    for (int s = 0; s < kSteps; ++s) EXPECT_FALSE(unused_grad_defined[r][s]) << "unused gradient defined, step " << s;
    const auto now = snapshot(nets[r]);
    const auto want = snapshot(ref);
    for (const auto& [name, t] : now) {
      const double diff = (t.to(at::kDouble) - want.at(name).to(at::kDouble)).abs().max().item<double>();
      if (name.rfind("unused.", 0) == 0) {
        // The single process never touches it: bit for bit its initial value.
        EXPECT_TRUE(t.equal(initial.at(name))) << name << " moved by " << (t - initial.at(name)).abs().max().item<double>()
                                               << " (one process: unchanged)";
      }
      EXPECT_LE(diff, tol) << name << ": data-parallel vs one process differ by " << diff;
    }
    // Both ranks hold the same weights, bit for bit.
    for (const auto& [name, t] : now) EXPECT_TRUE(t.equal(snapshot(nets[0]).at(name))) << name;
  }
}

}  // namespace

// Every bucket layout and launch mode: each parameter its own bucket (an unused parameter alone in an
// all-zero bucket), all in one bucket, buckets sent from the hooks or all after backward, and gradient
// accumulation over two micro-batches.
TEST(DataParallelUnused, UnusedEverywhereSkippedUnusedSomewhereAveragedWithZeros) {
  run_setting({1e-6, true, 1}, "own-buckets");
  run_setting({25.0, true, 1}, "one-bucket");
  run_setting({1e-6, false, 1}, "no-overlap");
  run_setting({1e-6, true, 2}, "accumulated");
}
