// keel tune: short real training trials over the settings that decide speed, guided by the
// bottleneck diagnosis of the best trial so far (input-bound -> data settings first, memory-bound ->
// micro-batch and activation checkpointing, compute-bound -> precision, layout, threads).
//
// The search (Search) only sees a trial function, so its decisions are tested on recorded
// measurements; run_trial() is the real one (a Trainer run of warm-up + measured steps).
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "keel/config/config.h"

namespace keel::tune {

// The settings a trial varies. The global batch is not among them: it is never changed.
struct Settings {
  int64_t workers = 1;          // data.workers (resolved: never -1 here)
  int64_t prefetch = 2;         // data.prefetch
  int64_t micro_batch = 0;      // train.micro_batch: 0 = whole batch, config::kAuto = the planner's choice
  int64_t threads = 1;          // run.threads (resolved)
  std::string precision = "fp32";
  bool channels_last = false;
  bool checkpoint_stages = false;
  bool operator==(const Settings& o) const;
  // The `--set` overrides that apply these settings to a config.
  std::vector<std::string> overrides() const;
  std::string str() const;  // "workers 2, prefetch 4, micro-batch 64, threads 2, bf16, channels_last"
  nlohmann::json to_json() const;
  static Settings from(const config::Config& c, int cores);  // workers/threads resolved
};

// One trial's measurements (after warm-up).
struct Trial {
  Settings settings;
  std::string group;              // which search group proposed it ("start", "data", "memory", "compute", "final")
  double images_per_second = 0;   // training throughput over the measured steps; 0 when it failed
  double data_wait_share = 0;     // fraction of step time waiting for data
  std::vector<double> shares;     // per monitor::Phase share of step time (kNumPhases), may be empty
  int64_t peak_memory_bytes = 0;
  int64_t resolved_micro_batch = 0;  // what the run used (the planner's for "auto"; after OOM recoveries)
  double seconds = 0;             // wall time of the whole trial
  std::string error;              // why it failed (out of memory at micro-batch 1, ...)
  std::vector<std::string> rules; // bottleneck rule ids diagnosed (monitor::diagnose)
  nlohmann::json to_json() const;
};

// What the search may do and what it knows about the machine.
struct SearchOptions {  // (config: tune.*, see docs/tune.md)
  double budget_seconds = 600;
  double min_gain = 0.03;
  bool allow_precision = false;
  int cores = 2;
  bool cuda = false;
  bool bf16_fast = false;          // bf16 is worth trying (CUDA, or a CPU with bf16 units)
  bool conv_model = true;          // channels_last and activation checkpointing apply
  bool has_memory_budget = false;  // memory.budget set: memory-bound advice means something
  int64_t batch_size = 128;
  int remeasure_repeats = 2;       // start and best, alternated, at the end
  int max_trials = 0;              // 0 = only the time budget limits trials
};

struct SearchResult {
  std::vector<Trial> trials;       // every trial in order (the re-measurements last, group "final")
  std::vector<size_t> adopted;     // indices of the trials that became the best, in order
  Settings start, best;
  double start_images_per_second = 0, best_images_per_second = 0;  // medians of the re-measurement
  std::string note;                // e.g. why the search's best was not kept
  double speedup() const { return start_images_per_second > 0 ? best_images_per_second / start_images_per_second : 0; }
  nlohmann::json to_json() const;
  std::string table() const;       // the trials as a text table
};

using TrialFn = std::function<Trial(const Settings&, const std::string& group)>;
using ClockFn = std::function<double()>;  // seconds since the search began

// The candidate settings of one search group, from the current best (each differs in one knob, or
// two that go together: micro-batch "auto" with activation checkpointing).
std::vector<Settings> candidates(const std::string& group, const Settings& best, const Trial& best_trial,
                                 const SearchOptions& o);

// The order of the groups for a trial: the diagnosed bottleneck's group first; a micro-batch below the
// global batch (accumulation without memory pressure) puts the memory group first as well.
std::vector<std::string> group_order(const Trial& t, int64_t batch_size);

class Search {
 public:
  Search(SearchOptions o, TrialFn trial, ClockFn clock);
  SearchResult run(const Settings& start);

 private:
  bool time_for_another(double best_seconds) const;
  SearchOptions o_;
  TrialFn trial_;
  ClockFn clock_;
  std::vector<Trial> trials_;
};

// Runs one real trial: the config with `s` applied, tune.warmup_steps + tune.measure_steps steps,
// no checkpoints, a tiny evaluation; its run directory is <dir>/<name>; its console output goes to
// <dir>/<name>.log. Measures throughput over the windows after the warm-up (metrics.jsonl).
Trial run_trial(const std::string& config_path, const std::vector<std::string>& sets, const Settings& s,
                const std::string& dir, const std::string& name, const std::string& group);

// The input config text with each changed key set to its new value and a comment with the reason;
// keys missing from the text are added to their section (created when missing). `changes` holds
// (dotted key, TOML value text, comment).
struct Change {
  std::string key, value, comment;
};
std::string patch_toml(const std::string& text, const std::vector<Change>& changes);

// The config changes from r.start to r.best, each commented with the adopted trial that made it.
std::vector<Change> tuned_changes(const SearchResult& r);

}  // namespace keel::tune
