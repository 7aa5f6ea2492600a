// Evaluation of a model on one split: loss, top-1 and top-5, in micro-batches that an out-of-memory error
// halves (train/oom_replay.h), summed over data-parallel ranks when given their sync.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "keel/data/augment.h"
#include "keel/data/loader.h"
#include "keel/dist/sync.h"
#include "keel/models/net.h"
#include "keel/train/precision.h"

namespace keel::train {

// Loss and accuracies over one split.
struct EvalResult {
  double loss = 0, top1 = 0, top5 = 0;  // mean loss; accuracies in [0, 1]
  int64_t samples = 0;
  double seconds = 0;
  std::vector<std::string> notes;  // out-of-memory recoveries during the pass
  nlohmann::json to_json() const;
};

// Evaluates `model` on `loader`'s epoch 0 order; no gradients, eval mode. micro_batch (optional,
// in/out): samples per forward (0 = the whole batch); with oom_recovery, an out-of-memory error halves
// it and the batch is evaluated again (noted in EvalResult::notes), so evaluation never shrinks the
// training batch. sync (data-parallel): the loader holds this rank's shard and the results are summed
// over ranks (every rank returns the same).
EvalResult evaluate(models::Net& model, data::Loader& loader, const data::DeviceAugment& aug,
                    bool channels_last, Precision precision, int64_t* micro_batch = nullptr,
                    bool oom_recovery = false, dist::StepSync* sync = nullptr);

}  // namespace keel::train
