// StepSync: what a training step needs from data-parallel training (dist/data_parallel.h implements
// it); the step and the trainer hold a null pointer when they run as one process. It lives in dist/ so that
// dist depends on nothing above it (train/ uses dist, never the other way).
#pragma once
#include <ATen/ATen.h>
#include <cstdint>

namespace keel::dist {

class StepSync {
 public:
  virtual ~StepSync() = default;
  virtual int64_t rank() const = 0;
  virtual int64_t world_size() const = 0;
  // Before a micro-batch's backward: reduce = this backward completes the step's gradients (the last
  // micro-batch), so its gradient hooks send buckets as they fill; otherwise they stay silent.
  virtual void before_backward(bool reduce) = 0;
  // After the last backward: sends what is left, waits for every bucket, averages the gradients.
  virtual void finish_gradients() = 0;
  // After a failed (out-of-memory) attempt: completes the step's bucket collectives with whatever is
  // there, so every rank has issued the same ones; the gradients are to be discarded.
  virtual void abandon_gradients() = 0;
  // Whether a failed attempt can be replayed in lockstep. False with synchronised BatchNorm: a rank that
  // fails mid-forward has issued only part of the forward's collectives, which no replay can match.
  virtual bool can_replay() const = 0;
  // Blocking in-place sum over ranks (agreement flags, metric sums); t on the training device.
  virtual void sum(at::Tensor& t, const char* what) = 0;
};

}  // namespace keel::dist
