// Batch planner: the largest micro-batch whose real full step fits the memory budget, found by
// running steps (forward, backward, clipping, scaler, optimizer) on worst-case inputs under the
// budget allocator, separately for training and evaluation. `keel plan-batch` and
// train.micro_batch = "auto" use it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "keel/models/net.h"
#include "keel/train/step.h"

namespace keel::train {

struct PlanOptions {
  int64_t batch_size = 0;       // effective training batch; planned micro-batches divide it
  int64_t eval_batch_size = 0;  // 0 = do not plan evaluation
  int64_t channels = 3, height = 224, width = 224;  // input images (the largest the run feeds)
  int64_t num_classes = 10;
  Precision precision = Precision::kFp32;
  bool channels_last = false;
  int64_t budget = 0;           // bytes the run may use on the model's device
  double margin = 0.1;          // a trial must fit in (1 - margin) x budget - reserve
  int64_t reserve = 0;          // bytes held elsewhere during training (loader queues, EMA copy)
};

// One measured step (or evaluation forward) at a micro-batch.
struct PlanTrial {
  bool train = true;
  int64_t micro_batch = 0;
  bool fits = false;
  int64_t peak = 0;         // peak bytes on the device during the trial (successful or not)
  double seconds = 0;
  std::string error;        // the out-of-memory message when it did not fit
};

struct PlanResult {
  int64_t budget = 0, limit = 0;      // the budget and what trials had to fit in
  int64_t micro_batch = 0;            // largest fitting divisor of batch_size
  int64_t accumulation_steps = 0;     // batch_size / micro_batch
  int64_t train_peak = 0;             // measured peak of a step at micro_batch
  int64_t eval_micro_batch = 0;       // 0 when evaluation was not planned
  int64_t eval_peak = 0;
  int64_t baseline = 0;               // bytes allocated before the trials (model, optimizer, ...)
  std::vector<PlanTrial> trials;
  std::string summary() const;        // human-readable, several lines: choice, reason, every trial
  nlohmann::json to_json() const;
};

// Thrown when not even micro-batch 1 fits; what() says what was tried and what to change.
class PlanError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Plans on `model` (on its device) with `runner` (built on the model and its optimizer with the
// run's step options; its micro-batch is changed, its OOM recovery must be off). Leaves the model
// trained by a few steps and the optimizer with state: the caller restores or discards them.
// The device's budget is set to the trial limit while planning and to `o.budget` afterwards.
PlanResult plan_batch(models::Net& model, StepRunner& runner, const PlanOptions& o);

// The divisors of n in ascending order.
std::vector<int64_t> divisors(int64_t n);

}  // namespace keel::train
