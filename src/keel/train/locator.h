// Non-finite locator and fault injection, both as forward Watchers (see models/watch.h).
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <string>
#include <vector>
#include <torch/nn/module.h>

#include "keel/models/watch.h"

namespace keel::train {

// Where a non-finite value first appeared.
struct Location {
  std::string phase;   // "forward" | "backward" | "loss" | "growth" (a finite spike)
  std::string module;  // state-dict prefix, e.g. "layer2.1.bn2"
  double abs_min = 0, abs_max = 0;  // over the finite entries of that output (or gradient)
  double growth = 0, good_abs_max = 0;  // "growth": abs_max / good_abs_max, and the good weights' abs-max
  std::string str() const;
};

// Records every watched forward output's finiteness (as tensors; read only by first_nonfinite()).
class NonFiniteLocator : public models::Watcher {
 public:
  at::Tensor on_output(const std::string& module, const at::Tensor& out) override;
  // The first recorded module, in forward order, whose output holds inf/NaN (host sync).
  std::optional<Location> first_nonfinite() const;
  void clear() { records_.clear(); }

 private:
  struct Record {
    std::string module;
    at::Tensor finite;  // bool 0-dim
    at::Tensor out;     // detached copy-free view, for abs-min/max when reported
  };
  std::vector<Record> records_;
};

// Records every watched forward output's abs-max (0-dim tensors, read only by first_growth()).
class MagnitudeRecorder : public models::Watcher {
 public:
  at::Tensor on_output(const std::string& module, const at::Tensor& out) override;
  struct Record {
    std::string module;
    at::Tensor abs_max;  // float 0-dim
  };
  const std::vector<Record>& records() const { return records_; }

 private:
  std::vector<Record> records_;
};

// Where a finite divergence (a loss spike) starts: the same batch through the last good weights
// (`good`) and the current ones (`bad`). The first module, in forward order, whose output abs-max
// grew by more than `factor`; if none did, the one that grew most. Host sync; used after a skip.
std::optional<Location> first_growth(const MagnitudeRecorder& good, const MagnitudeRecorder& bad, double factor);

// The module whose gradients went non-finite first in the backward pass: gradients flow in
// reverse forward order and a NaN spreads to everything upstream, so it is the LAST module in
// parameter (forward) order with a non-finite parameter gradient. Host sync; used after a skip.
std::optional<Location> locate_nonfinite_grad(const torch::nn::Module& model);

// Fault injection (debug.inject_nonfinite): at the listed step attempts, makes the loss, the
// gradients, or a named module's forward output NaN.
struct InjectOptions {
  std::vector<int64_t> steps;  // 1-based attempt numbers: the Nth batch offered to the step (skips counted)
  std::string where = "loss";  // "loss" | "grad" | a module name ("layer1.0.conv2")
  std::vector<int64_t> oom_steps;  // attempts whose last micro-batch's forward throws out-of-memory (once each)
  int64_t oom_rank = -1;           // data-parallel: only this rank injects them (-1 = every rank)
  std::vector<int64_t> oom_replay_steps;  // attempts whose guard diagnostic replay throws out-of-memory (tests)
  bool active_at(int64_t step) const;
};

// Wraps another watcher (may be null) and replaces the named module's output with NaN.
class FaultInjector : public models::Watcher {
 public:
  FaultInjector(std::string module, models::Watcher* next) : module_(std::move(module)), next_(next) {}
  at::Tensor on_output(const std::string& module, const at::Tensor& out) override;
  bool fired() const { return fired_; }

 private:
  std::string module_;
  models::Watcher* next_;
  bool fired_ = false;
};

}  // namespace keel::train
