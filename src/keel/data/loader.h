// Loader: worker threads assemble uint8 batches in epoch order into reused buffers.
#pragma once
#include <ATen/ATen.h>
#include <torch/arg.h>

#include <cstdint>
#include <memory>
#include <optional>

#include "keel/data/dataset.h"
#include "keel/data/sampler.h"

namespace keel::data {

// What the Loader does when a sample cannot be read (missing, empty, truncated, undecodable file).
enum class OnError {
  kFail,  // the error reaches next() with the sample's describe() (its path) and the reason
  kSkip,  // logged once per sample, counted, and replaced by the next readable sample of this
          // rank's epoch order (wrapping), so the epoch keeps its size and order is deterministic
};

// What the user asks of a Loader (fluent setters: LoaderOptions().batch_size(256).workers(4)).
struct LoaderOptions {
  TORCH_ARG(int64_t, batch_size) = 128;  // samples per batch (per rank), >= 1
  TORCH_ARG(int64_t, workers) = 2;       // worker threads; 0 = assemble on the calling thread
  TORCH_ARG(int64_t, prefetch) = 2;      // batches that may wait ready ahead of the consumer, >= 1
  TORCH_ARG(bool, drop_last) = false;    // drop the incomplete last batch of each epoch
  TORCH_ARG(SamplerOptions, sampler) = {};  // seed and shuffle of the epoch order
  TORCH_ARG(int64_t, rank) = 0;          // this process's shard, 0 <= rank < world_size
  TORCH_ARG(int64_t, world_size) = 1;    // number of shards (data-parallel processes)
  TORCH_ARG(OnError, on_error) = OnError::kSkip;  // unreadable samples: skip and replace, or fail
  // Batch buffers in page-locked (pinned) host memory, so a CUDA upload copies straight from them
  // (device::Uploader skips its staging copy). Only for a CUDA training device: a CPU-only LibTorch
  // or a machine without a GPU cannot pin, and a CPU device gains nothing.
  TORCH_ARG(bool, pin_memory) = false;
};

// One batch. The tensors view a pooled loader buffer: the buffer goes back to the pool when
// both tensors (and every view of them) are released, so keeping a batch is safe — clone()
// is never needed — but a kept batch keeps its buffer out of the pool.
struct Batch {
  at::Tensor images;  // uint8 (N, C, H, W), contiguous
  at::Tensor labels;  // int64 (N)
  at::Tensor ids;     // int64 (N): the dataset index of each sample (after any on_error replacement)
  int64_t index = 0;  // batch number in the epoch
};

// Streams batches of a Dataset in the sampler's order. Batch k always holds the same samples
// whatever the worker count, and batches arrive in order, so the stream is identical for any
// number of workers. At most prefetch + workers batches are in flight (being assembled or ready)
// at once; buffers are recycled through a pool of that size. Not thread-safe: one consumer
// thread calls every method.
class Loader {
 public:
  // Throws std::invalid_argument naming the option when an option is out of range.
  Loader(std::shared_ptr<const Dataset> dataset, LoaderOptions options);
  // Stops and joins every worker; never waits for the consumer. Batches still held stay valid.
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  // Cancels any previous epoch, then starts the workers on `epoch`'s order.
  void start_epoch(int64_t epoch);
  // The next batch in order; nullopt at the end of the epoch or after stop(). Under
  // OnError::kFail (and under kSkip when no sample of the epoch is readable) a sample that
  // failed to load is rethrown here as std::runtime_error prefixed by the sample's describe(),
  // in its batch's turn; the epoch is then dead and every later next() rethrows it until
  // start_epoch(). Throws std::logic_error before the first start_epoch().
  std::optional<Batch> next();
  // Batches per epoch for this rank, respecting drop_last.
  int64_t batches_per_epoch() const;
  // Samples of this rank the tail drop removes per epoch (0 without drop_last).
  int64_t dropped_samples() const;
  // Cancels the epoch mid-way and joins the workers (each finishes at most its current sample).
  void stop();
  // Samples of the current epoch replaced so far under OnError::kSkip (complete once next()
  // returned nullopt; batches assembled ahead of the consumer are included).
  int64_t skipped_samples() const;
  // Seconds the last next() waited for data (with workers = 0: the time it spent loading).
  double last_wait_seconds() const;
  // The loader's own throughput in the current epoch, as if the consumer never held it back:
  // samples assembled / seconds spent assembling them (summed over workers) x max(1, workers).
  // Time a worker waits for queue space is not counted, time it waits for a core is (so more
  // workers than cores does not inflate it). 0 before any batch was assembled.
  double loader_images_per_second() const;
  // Samples assembled so far this epoch (delivered or waiting in the queue).
  int64_t loaded_samples() const;

  const LoaderOptions& options() const { return options_; }
  const Dataset& dataset() const { return *dataset_; }

 private:
  struct Impl;
  std::shared_ptr<const Dataset> dataset_;
  LoaderOptions options_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace keel::data
