// `keel report RUN_DIR`: one self-contained report.html (inline data, CSS and a small SVG chart drawer; no
// network) from what a run wrote: metrics.jsonl, config.resolved.toml, profiler tables.
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace keel::monitor {

// The records of one run directory, by kind.
struct RunRecords {
  std::string run_dir;
  std::vector<nlohmann::json> steps;   // {"event": "step", ...} logging windows
  std::vector<nlohmann::json> epochs;  // {"event": "epoch", ...}
  std::vector<nlohmann::json> events;  // everything else except "final"
  nlohmann::json final;                // the "final" summary, or null (run interrupted or still running)
  std::string config_toml;             // config.resolved.toml, or empty when missing
  nlohmann::json tune;                 // tune/tune.json that `keel tune` wrote for this run name, or null
  nlohmann::json infer;                // bench/infer.json that `keel bench infer` wrote for the run's weights, or null
  std::vector<std::string> notes;      // what was missing or skipped while reading
};

// Reads <run_dir>/metrics.jsonl (required) and config.resolved.toml. Throws std::runtime_error naming the
// file (and line) when the directory or metrics.jsonl is missing or a line is not a JSON object; a torn
// last line (a run killed while writing) is skipped with a note.
RunRecords read_run(const std::string& run_dir);

// The chart specifications drawn by the page (id, title, kind, series); see report.cpp.
nlohmann::json report_charts(const RunRecords& run);

// The whole page. `environment`: keel doctor's JSON (with "lines"); `environment_note` says where/when
// it was measured.
std::string render_report(const RunRecords& run, const nlohmann::json& environment,
                          const std::string& environment_note);

// read_run + render_report, written atomically to <run_dir>/report.html; returns that path.
std::string write_report(const std::string& run_dir, const nlohmann::json& environment,
                         const std::string& environment_note);

}  // namespace keel::monitor
