// DataParallel: keel's DistributedDataParallel for LibTorch C++ (which has none). Parameters and buffers
// are broadcast from rank 0 at the start; gradients are all-reduced in size-bounded buckets launched from
// the parameters' gradient-accumulator hooks as soon as a bucket is complete, so communication overlaps
// the rest of backward; only the last micro-batch of an accumulated step communicates; the result is
// averaged over ranks. A parameter without a gradient on some ranks gets the average with their zeros; one
// without a gradient on every rank keeps an undefined gradient, so the optimizer skips it as one process
// would (docs/distributed.md, "Unused parameters"). Also the step's agreement point (StepSync::sum) and the communication statistics.
#pragma once
#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <memory>
#include <mutex>
#include <vector>

#include <nlohmann/json.hpp>

#include "keel/dist/bucket.h"
#include "keel/dist/comm.h"
#include "keel/dist/sync.h"

namespace keel::dist {

struct DataParallelOptions {
  double bucket_mb = 25.0;  // bucket cap in MiB (PyTorch DDP's default)
  bool overlap = true;      // false: every bucket is sent after backward (the baseline the bench compares to)
  bool sync_bn = false;     // the model synchronises BatchNorm (out-of-memory replays cannot be agreed)
};

// Communication time of the run so far (rank-local wall clock).
struct CommStats {
  int64_t steps = 0;             // gradient reductions (one per step attempt, replays included)
  int64_t buckets = 0;           // buckets per step
  int64_t bytes_per_step = 0;    // bytes all-reduced per step: gradients + one used-flag per parameter
  double allreduce_seconds = 0;  // union of the buckets' [launch, completion] intervals, summed over steps
  double overlapped_seconds = 0; // the part of it before backward ended (hidden behind computation)
  double exposed_seconds = 0;    // time the step waited for communication after backward
  nlohmann::json to_json() const;
};

class DataParallel : public StepSync {
 public:
  // Broadcasts `model`'s parameters and buffers from rank 0 and registers the gradient hooks on every
  // parameter that requires a gradient (in model.parameters() order).
  DataParallel(Comm& comm, torch::nn::Module& model, DataParallelOptions o);
  ~DataParallel() override;

  int64_t rank() const override { return comm_.rank(); }
  int64_t world_size() const override { return comm_.world_size(); }
  void before_backward(bool reduce) override;
  void finish_gradients() override;
  void abandon_gradients() override;
  void sum(at::Tensor& t, const char* what) override;
  bool can_replay() const override { return !o_.sync_bn; }

  const CommStats& stats() const { return stats_; }
  const std::vector<std::vector<size_t>>& buckets() const { return tracker_.buckets(); }

 private:
  struct HookState;
  void on_ready(size_t p);
  void launch(size_t b, bool zeros);
  void wait_all();

  Comm& comm_;
  DataParallelOptions o_;
  std::vector<at::Tensor> params_;
  ReadyTracker tracker_;
  std::vector<at::Tensor> flat_;                   // per bucket: contiguous buffer
  std::vector<std::vector<int64_t>> offsets_;      // per bucket: element offset of each of its parameters
  std::vector<int64_t> flag_offset_;               // per bucket: where its parameters' used-flags start
  std::vector<char> local_used_;                   // per parameter: had a gradient on this rank when sent
  std::vector<std::shared_ptr<Pending>> pending_;  // per bucket, this step
  std::shared_ptr<HookState> hook_state_;          // hooks hold it weakly-safe: cleared at destruction
  std::vector<std::shared_ptr<void>> accumulators_;  // keeps the gradient accumulators (and their hooks) alive
  std::mutex mu_;
  bool armed_ = false, open_ = false;
  double backward_end_ = 0;
  CommStats stats_;
};

}  // namespace keel::dist
