// Internal to keel/dist: one c10d process group behind a small keel-owned interface, so that only
// groups.cpp includes a backend header (ProcessGroupGloo.hpp needs the Gloo headers of libgloo-dev, the
// NCCL one CUDA's) and the differing base classes (1.13: ProcessGroup; 2.x: Backend) never show.
#pragma once
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "keel/dist/comm.h"

namespace keel::dist {

struct Group {
  virtual ~Group() = default;
  virtual c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors) = 0;  // sum
  virtual c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors, int64_t root) = 0;
  // Leaves the process group alive at destruction (after a failure its threads may wait on a dead peer).
  virtual void leak() = 0;
};

// Gloo over TCP (CPU tensors). options: interface, timeout.
std::unique_ptr<Group> make_gloo_group(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                       const CommOptions& o);
// NCCL (CUDA tensors on o.device); throws DistError in a build without CUDA code paths.
std::unique_ptr<Group> make_nccl_group(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                       const CommOptions& o);

struct Pending {
  c10::intrusive_ptr<c10d::Work> work;
  std::string what;
  double started = 0;
  std::shared_ptr<std::atomic<double>> done = std::make_shared<std::atomic<double>>(-1.0);
  bool waited = false;
};

}  // namespace keel::dist
