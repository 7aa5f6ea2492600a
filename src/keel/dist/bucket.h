// Gradient buckets: which parameters' gradients travel together in one all-reduce, and when a bucket is
// ready to go. Pure bookkeeping (no tensors, no communication), unit-tested on its own.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace keel::dist {

// Groups parameters (given in registration order: their gradient sizes in bytes and a compatibility key,
// e.g. "cpu/float": only equal keys share a bucket) into buckets of at most cap_bytes each. Buckets are
// filled in reverse registration order, the order backward produces gradients in, so the first bucket is
// ready first. A parameter larger than the cap gets a bucket of its own. Every parameter is in exactly
// one bucket; within a bucket, parameters keep that reverse order. Throws std::invalid_argument for
// cap_bytes < 1 or mismatched input lengths.
std::vector<std::vector<size_t>> assign_buckets(const std::vector<int64_t>& bytes, const std::vector<std::string>& keys,
                                                int64_t cap_bytes);

// Readiness of one backward pass. Buckets launch strictly in index order (DDP's rule): every rank then
// issues the same collectives in the same order, whatever order its gradients happen to arrive in.
class ReadyTracker {
 public:
  ReadyTracker() = default;
  ReadyTracker(std::vector<std::vector<size_t>> buckets, size_t num_params);
  // Starts a new backward pass: nothing ready, nothing launched.
  void reset();
  // Parameter p's gradient is final; returns the buckets that may now launch, in order (possibly none).
  // Throws std::logic_error when p was already marked in this pass (its gradient would have been sent
  // before it was complete) or is not a bucketed parameter.
  std::vector<size_t> mark_ready(size_t p);
  // The buckets not launched yet, in order, marked launched (the end of backward: parameters that got no
  // gradient in this pass go with zeros).
  std::vector<size_t> launch_rest();
  size_t launched() const { return next_; }
  const std::vector<std::vector<size_t>>& buckets() const { return buckets_; }

 private:
  std::vector<std::vector<size_t>> buckets_;
  std::vector<int64_t> bucket_of_;      // parameter -> bucket (-1: not bucketed)
  std::vector<char> ready_;             // per parameter
  std::vector<size_t> pending_;         // per bucket: parameters not ready yet
  size_t next_ = 0;                     // first bucket not launched
};

}  // namespace keel::dist
