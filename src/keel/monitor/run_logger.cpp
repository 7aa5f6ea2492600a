// RunLogger: the trainer's single logging entry point.
#include "keel/monitor/run_logger.h"

#include <fstream>
#include <sstream>

namespace keel::monitor {

namespace {

// Numeric CSV rows (what RunLogger writes) with step <= max_step.
std::vector<CsvLog::Row> read_rows(const std::string& path, int64_t max_step) {
  std::vector<CsvLog::Row> rows;
  std::ifstream in(path);
  std::string header, line;
  if (!std::getline(in, header)) return rows;
  std::vector<std::string> cols;
  std::stringstream hs(header);
  for (std::string c; std::getline(hs, c, ',');) cols.push_back(c);
  while (std::getline(in, line)) {
    CsvLog::Row row;
    std::stringstream ls(line);
    size_t i = 0;
    for (std::string v; std::getline(ls, v, ',') && i < cols.size(); ++i) row.emplace_back(cols[i], std::stod(v));
    if (row.size() == cols.size() && !row.empty() && row[0].first == "step" && row[0].second <= max_step) {
      rows.push_back(std::move(row));
    }
  }
  return rows;
}

}  // namespace

RunLogger::Preserved RunLogger::preserve(const std::string& run_dir, int64_t resume_step) {
  Preserved p;
  if (resume_step < 0) return p;
  std::ifstream in(run_dir + "/metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) continue;  // a line torn by the kill
    if (j.value("event", "") == "final") continue;
    if (j.contains("step") && j["step"].is_number() && j["step"].get<int64_t>() > resume_step) continue;
    p.jsonl.push_back(std::move(j));
  }
  p.steps = read_rows(run_dir + "/steps.csv", resume_step);
  p.epochs = read_rows(run_dir + "/epochs.csv", resume_step);
  return p;
}

RunLogger::RunLogger(const std::string& run_dir, int64_t resume_step)
    : kept_(preserve(run_dir, resume_step)),
      jsonl_(run_dir + "/metrics.jsonl"),
      steps_csv_(run_dir + "/steps.csv"),
      epochs_csv_(run_dir + "/epochs.csv"),
      tb_(run_dir + "/tensorboard") {
  for (const auto& j : kept_.jsonl) jsonl_.write(j);
  for (const auto& r : kept_.steps) steps_csv_.write(r);
  for (const auto& r : kept_.epochs) epochs_csv_.write(r);
  if (resume_step >= 0) jsonl_.write({{"event", "resume"}, {"step", resume_step}});
  kept_ = {};
}

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
