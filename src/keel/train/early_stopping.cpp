// EarlyStopping: patience counter over a monitored metric.
#include "keel/train/early_stopping.h"

#include <cmath>
#include <limits>
#include <stdexcept>

namespace keel::train {

EarlyStopping::EarlyStopping(EarlyStoppingOptions o) : o_(std::move(o)) {
  if (o_.mode != "min" && o_.mode != "max") throw std::invalid_argument("early_stop.mode must be min or max");
  if (o_.patience < 1) throw std::invalid_argument("early_stop.patience must be >= 1");
  best_ = o_.mode == "min" ? std::numeric_limits<double>::infinity() : -std::numeric_limits<double>::infinity();
}

bool EarlyStopping::update(double value) {
  // A NaN metric is never an improvement.
  improved_ = std::isfinite(value) &&
              (o_.mode == "min" ? value < best_ - o_.min_delta : value > best_ + o_.min_delta);
  if (improved_) {
    best_ = value;
    best_index_ = count_;
    bad_ = 0;
  } else {
    ++bad_;
  }
  ++count_;
  return bad_ >= o_.patience;
}

nlohmann::json EarlyStopping::state() const {
  // JSON has no infinity: "no best yet" is stored as null.
  return {{"best", std::isfinite(best_) ? nlohmann::json(best_) : nlohmann::json(nullptr)}, {"best_index", best_index_}, {"count", count_}, {"bad", bad_}};
}

void EarlyStopping::load_state(const nlohmann::json& s) {
  if (!s.at("best").is_null()) best_ = s.at("best").get<double>();
  best_index_ = s.at("best_index");
  count_ = s.at("count");
  bad_ = s.at("bad");
}

}  // namespace keel::train
