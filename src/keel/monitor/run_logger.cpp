// RunLogger: the trainer's single logging entry point.
#include "keel/monitor/run_logger.h"

namespace keel::monitor {

RunLogger::RunLogger(const std::string& run_dir)
    : jsonl_(run_dir + "/metrics.jsonl"),
      steps_csv_(run_dir + "/steps.csv"),
      epochs_csv_(run_dir + "/epochs.csv"),
      tb_(run_dir + "/tensorboard") {}

void RunLogger::step(int64_t step, int64_t epoch, const Scalars& values) {
  nlohmann::json rec = {{"event", "step"}, {"epoch", epoch}, {"step", step}};
  CsvLog::Row row = {{"step", static_cast<double>(step)}, {"epoch", static_cast<double>(epoch)}};
  for (const auto& [k, v] : values) {
    rec[k] = v;
    row.emplace_back(k, v);
    tb_.add_scalar("train/" + k, v, step);
  }
  jsonl_.write(rec);
  steps_csv_.write(row);
  tb_.flush();
}

void RunLogger::epoch(int64_t step, int64_t epoch, const Scalars& values, const nlohmann::json& extra) {
  nlohmann::json rec = {{"event", "epoch"}, {"epoch", epoch}, {"step", step}};
  CsvLog::Row row = {{"step", static_cast<double>(step)}, {"epoch", static_cast<double>(epoch)}};
  for (const auto& [k, v] : values) {
    rec[k] = v;
    row.emplace_back(k, v);
    tb_.add_scalar("epoch/" + k, v, step);
  }
  for (const auto& [k, v] : extra.items()) rec[k] = v;
  jsonl_.write(rec);
  epochs_csv_.write(row);
  tb_.flush();
}

void RunLogger::event(const nlohmann::json& record) { jsonl_.write(record); }

}  // namespace keel::monitor
