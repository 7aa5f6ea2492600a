// Early stopping on a monitored metric, with the best weights kept for restoring.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>
#include <ATen/ATen.h>

namespace keel::train {

struct EarlyStoppingOptions {
  std::string mode = "min";  // min | max
  int64_t patience = 3;      // epochs without improvement before stopping
  double min_delta = 0.0;    // an improvement must beat the best by more than this
};

// Keras/Lightning semantics: after each evaluation, update(value) returns true when training
// should stop (patience epochs in a row without an improvement greater than min_delta).
class EarlyStopping {
 public:
  explicit EarlyStopping(EarlyStoppingOptions o);
  bool update(double value);           // true = stop now
  bool improved() const { return improved_; }  // the last update set a new best
  double best() const { return best_; }
  int64_t best_index() const { return best_index_; }  // 0-based update count of the best
  int64_t bad_epochs() const { return bad_; }

  nlohmann::json state() const;
  void load_state(const nlohmann::json& s);

 private:
  EarlyStoppingOptions o_;
  double best_;
  int64_t best_index_ = -1, count_ = 0, bad_ = 0;
  bool improved_ = false;
};

}  // namespace keel::train
