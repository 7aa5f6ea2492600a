// The out-of-memory replay rule, shared by the training step (StepRunner::run) and evaluation (evaluate):
// a batch runs in micro-batches of `micro_batch` samples (0 = the whole batch); when one attempt runs out of
// memory, its tensors are released, the device cache is handed back, and the same samples are replayed with
// half the micro-batch; at micro-batch 1 there is nothing left to halve and the error is the caller's.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <string>

#include "keel/device/device.h"

namespace keel::train {

// The micro-batch in force for a batch of n samples.
inline int64_t micro_batch_in_force(int64_t micro_batch, int64_t n) {
  return micro_batch > 0 ? std::min(micro_batch, n) : n;
}

// The first line of an out-of-memory error's message (LibTorch's carry a multi-line allocator report).
inline std::string oom_summary(const std::exception& e) {
  const std::string what = e.what();
  return what.substr(0, what.find('\n'));
}

// After an out-of-memory error at micro-batch `current` on `device`: hands the device's cache back and returns
// the micro-batch to replay with (current / 2), or throws give_up() (a std::runtime_error naming the run's
// context) when current is already 1.
template <class GiveUp>
int64_t replay_micro_batch(const at::Device& device, int64_t current, GiveUp&& give_up) {
  device::empty_cache(device);
  if (current <= 1) throw give_up();
  return current / 2;
}

}  // namespace keel::train
