// RunLogger: one call per record fans out to metrics.jsonl, steps.csv / epochs.csv and TensorBoard.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "keel/monitor/csv_log.h"
#include "keel/monitor/metrics_log.h"
#include "keel/monitor/tensorboard.h"

namespace keel::monitor {

class RunLogger {
 public:
  using Scalars = std::vector<std::pair<std::string, double>>;  // fixed column order per kind
  // Creates <run_dir>/metrics.jsonl, steps.csv, epochs.csv and <run_dir>/tensorboard/events.*.
  // resume_step >= 0 (a resumed run): keeps the records of steps <= resume_step from the previous
  // files and drops the rest (logged after that checkpoint), so no step is duplicated or missing.
  explicit RunLogger(const std::string& run_dir, int64_t resume_step = -1);
  // A logging-window record: JSONL {"event": "step", ...}, a steps.csv row, TensorBoard "train/<name>".
  void step(int64_t step, int64_t epoch, const Scalars& values);
  // An epoch record: JSONL (with `extra` merged), an epochs.csv row, TensorBoard "epoch/<name>".
  void epoch(int64_t step, int64_t epoch, const Scalars& values, const nlohmann::json& extra = {});
  // Anything else (guard events, early stop, final summary): JSONL only.
  void event(const nlohmann::json& record);

 private:
  struct Preserved {
    std::vector<nlohmann::json> jsonl;
    std::vector<CsvLog::Row> steps, epochs;
  };
  static Preserved preserve(const std::string& run_dir, int64_t resume_step);
  Preserved kept_;  // read before the files below are truncated (declaration order matters)
  MetricsLog jsonl_;
  CsvLog steps_csv_, epochs_csv_;
  TensorBoardWriter tb_;
};

}  // namespace keel::monitor
