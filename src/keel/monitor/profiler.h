// Step profiler: records training steps A..B with LibTorch's profiler and writes a Chrome trace
// (chrome://tracing, Perfetto) and a per-operator table sorted by total time into the run directory.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace keel::monitor {

// The steps to profile, 1-based and inclusive; first == 0 means off.
struct ProfileRange {
  int64_t first = 0, last = 0;
  bool enabled() const { return first > 0; }
};

// Parses "A:B" (1 <= A <= B) or "A" (= "A:A"); throws std::invalid_argument naming `what` and the text.
ProfileRange parse_profile_steps(const std::string& text, const std::string& what = "--profile-steps");

// One recorded operator call (host side).
struct OpEvent {
  std::string name;
  uint64_t start_ns = 0, duration_ns = 0;
  uint64_t thread = 0;
};

// Per-operator totals: total = inclusive time (children included), self = total minus the time of the
// operators it called on the same thread.
struct OpStat {
  std::string name;
  int64_t calls = 0;
  uint64_t total_ns = 0, self_ns = 0;
};

// Aggregates events by name; sorted by total time, largest first (ties by name).
std::vector<OpStat> op_table(const std::vector<OpEvent>& events);

// The table as fixed-width text: operator, calls, total ms, self ms, self % of the profiled self time, mean us.
std::string format_op_table(const std::vector<OpStat>& table, size_t max_rows = 0);

// Chrome trace-event JSON ("X" complete events, microseconds from the first event).
nlohmann::json chrome_trace(const std::vector<OpEvent>& events, const nlohmann::json& metadata = {});

// Drives the profiler around the training loop: before_step(n) before step n begins (n = steps done + 1),
// after_step(done) after it. Starts at range.first, stops after range.last and writes
// <dir>/profile_steps_A-B.trace.json and <dir>/profile_steps_A-B.ops.txt. finish() writes what was
// recorded if the run ended inside the range.
class StepProfiler {
 public:
  StepProfiler(ProfileRange range, std::string dir);
  ~StepProfiler();
  void before_step(int64_t next_step);
  bool after_step(int64_t steps_done);  // true when it has just written the files
  void finish();
  bool active() const { return active_; }
  // Paths written (trace, table) and the summary line, once written.
  const std::vector<std::string>& written() const { return written_; }
  const std::string& summary() const { return summary_; }

 private:
  void start();
  void stop_and_write();

  ProfileRange range_;
  std::string dir_;
  bool active_ = false, done_ = false;
  int64_t recorded_first_ = 0, recorded_last_ = 0;
  struct StepScope;
  std::unique_ptr<StepScope> step_scope_;  // a "ProfilerStep#n" range around each profiled step
  std::vector<std::string> written_;
  std::string summary_;
};

}  // namespace keel::monitor
