// Step profiler on LibTorch's (Kineto-API) profiler; the trace and the table are written by keel so that
// both LibTorch 1.13 (built without Kineto) and 2.x give the same files.
#include "keel/monitor/profiler.h"

#include <ATen/record_function.h>
#include <fmt/format.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <map>
#include <stdexcept>
#include <unordered_map>

#include "keel/compat/torch_compat.h"
#include "keel/util/fs.h"

namespace keel::monitor {

namespace prof = torch::autograd::profiler;

ProfileRange parse_profile_steps(const std::string& text, const std::string& what) {
  auto fail = [&](const std::string& why) {
    return std::invalid_argument(fmt::format("{} '{}': {}; expected A:B with 1 <= A <= B (steps, 1-based), e.g. 2:3",
                                             what, text, why));
  };
  auto number = [&](const std::string& s) -> int64_t {
    if (s.empty() || s.find_first_not_of("0123456789") != std::string::npos) throw fail("'" + s + "' is not a step number");
    if (s.size() > 15) throw fail("'" + s + "' is too large");
    return std::stoll(s);
  };
  const auto colon = text.find(':');
  ProfileRange r;
  r.first = number(text.substr(0, colon));
  r.last = colon == std::string::npos ? r.first : number(text.substr(colon + 1));
  if (r.first < 1) throw fail("the first step is 1");
  if (r.last < r.first) throw fail("B is before A");
  return r;
}

std::vector<OpStat> op_table(const std::vector<OpEvent>& events) {
  // Self time: per thread, walk the events in start order with a stack of open ones; an event that starts
  // before the top one ends is its child and its duration is taken off the parent's self time.
  std::map<uint64_t, std::vector<const OpEvent*>> by_thread;
  for (const auto& e : events) by_thread[e.thread].push_back(&e);
  std::unordered_map<const OpEvent*, uint64_t> self;
  for (auto& [tid, evs] : by_thread) {
    std::sort(evs.begin(), evs.end(), [](const OpEvent* a, const OpEvent* b) {
      return a->start_ns != b->start_ns ? a->start_ns < b->start_ns : a->duration_ns > b->duration_ns;
    });
    std::vector<const OpEvent*> open;
    for (const OpEvent* e : evs) {
      while (!open.empty() && open.back()->start_ns + open.back()->duration_ns <= e->start_ns) open.pop_back();
      self[e] = e->duration_ns;
      if (!open.empty()) {
        uint64_t& p = self[open.back()];
        p -= std::min(p, e->duration_ns);
      }
      open.push_back(e);
    }
  }
  std::map<std::string, OpStat> agg;
  for (const auto& e : events) {
    OpStat& s = agg[e.name];
    s.name = e.name;
    s.calls += 1;
    s.total_ns += e.duration_ns;
    s.self_ns += self[&e];
  }
  std::vector<OpStat> out;
  for (auto& [k, s] : agg) out.push_back(s);
  std::sort(out.begin(), out.end(), [](const OpStat& a, const OpStat& b) {
    return a.total_ns != b.total_ns ? a.total_ns > b.total_ns : a.name < b.name;
  });
  return out;
}

std::string format_op_table(const std::vector<OpStat>& table, size_t max_rows) {
  uint64_t self_sum = 0;
  size_t width = 8;
  for (const auto& s : table) {
    self_sum += s.self_ns;
    width = std::max(width, s.name.size());
  }
  width = std::min<size_t>(width, 60);
  std::string out = fmt::format("{:<{}}  {:>7}  {:>10}  {:>10}  {:>6}  {:>10}\n", "operator", width, "calls",
                                "total ms", "self ms", "self %", "mean us");
  size_t n = 0;
  for (const auto& s : table) {
    if (max_rows && n++ >= max_rows) break;
    std::string name = s.name.size() > width ? s.name.substr(0, width - 3) + "..." : s.name;
    out += fmt::format("{:<{}}  {:>7}  {:>10.3f}  {:>10.3f}  {:>6.1f}  {:>10.1f}\n", name, width, s.calls,
                       s.total_ns * 1e-6, s.self_ns * 1e-6, self_sum ? 100.0 * s.self_ns / self_sum : 0.0,
                       s.calls ? s.total_ns * 1e-3 / s.calls : 0.0);
  }
  return out;
}

nlohmann::json chrome_trace(const std::vector<OpEvent>& events, const nlohmann::json& metadata) {
  uint64_t t0 = UINT64_MAX;
  for (const auto& e : events) t0 = std::min(t0, e.start_ns);
  nlohmann::json evs = nlohmann::json::array();
  for (const auto& e : events) {
    const bool step = e.name.rfind("ProfilerStep#", 0) == 0;
    evs.push_back({{"name", e.name}, {"cat", step ? "step" : "cpu_op"}, {"ph", "X"}, {"pid", 0},
                   {"tid", e.thread}, {"ts", (e.start_ns - t0) * 1e-3}, {"dur", e.duration_ns * 1e-3}});
  }
  nlohmann::json j = {{"traceEvents", evs}, {"displayTimeUnit", "ms"}};
  if (!metadata.is_null()) j["otherData"] = metadata;
  return j;
}

// A user-scope record function spanning one profiled step (shows as "ProfilerStep#n" in the trace).
struct StepProfiler::StepScope {
  at::RecordFunction rf{at::RecordScope::USER_SCOPE};
  explicit StepScope(int64_t step) {
    if (rf.isActive()) rf.before("ProfilerStep#" + std::to_string(step));
  }
};

StepProfiler::StepProfiler(ProfileRange range, std::string dir) : range_(range), dir_(std::move(dir)) {}

StepProfiler::~StepProfiler() {
  if (active_) {
    step_scope_.reset();
    try {
      prof::disableProfiler();
    } catch (...) {  // leaving because of an exception already: nothing more to report
    }
  }
}

void StepProfiler::start() {
  torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
  prof::prepareProfiler(config, {torch::profiler::impl::ActivityType::CPU});
  prof::enableProfiler(config, {torch::profiler::impl::ActivityType::CPU});
  active_ = true;
}

void StepProfiler::before_step(int64_t next_step) {
  if (!range_.enabled() || done_ || next_step > range_.last) return;
  if (!active_ && next_step >= range_.first) {
    start();
    recorded_first_ = next_step;
  }
  if (active_) {
    step_scope_.reset();
    step_scope_ = std::make_unique<StepScope>(next_step);
  }
}

bool StepProfiler::after_step(int64_t steps_done) {
  if (!active_) return false;
  step_scope_.reset();
  recorded_last_ = steps_done;
  if (steps_done < range_.last) return false;
  stop_and_write();
  return true;
}

void StepProfiler::finish() {
  if (active_) stop_and_write();
}

void StepProfiler::stop_and_write() {
  step_scope_.reset();
  std::unique_ptr<prof::ProfilerResult> result = prof::disableProfiler();
  active_ = false;
  done_ = true;
  std::vector<OpEvent> events;
  for (const auto& e : result->events()) {
    if (e.deviceType() != c10::DeviceType::CPU) continue;  // host operators; device kernels need Kineto
    events.push_back({e.name(), compat::profiler_event_start_ns(e), compat::profiler_event_duration_ns(e),
                      e.startThreadId()});
  }
  const std::string base =
      fmt::format("{}/profile_steps_{}-{}", dir_, recorded_first_, std::max(recorded_first_, recorded_last_));
  const nlohmann::json meta = {{"keel_profile_steps", {recorded_first_, recorded_last_}},
                               {"torch_version", compat::torch_version()}};
  util::atomic_write_file(base + ".trace.json", chrome_trace(events, meta).dump());
  const auto table = op_table(events);
  std::vector<OpStat> ops;  // the table without the step ranges (they would top it as the outermost events)
  for (const auto& s : table)
    if (s.name.rfind("ProfilerStep#", 0) != 0) ops.push_back(s);
  util::atomic_write_file(base + ".ops.txt",
                          fmt::format("# keel profile of steps {}..{}: {} operator calls, sorted by total time\n",
                                      recorded_first_, recorded_last_, events.size()) +
                              format_op_table(ops));
  written_ = {base + ".trace.json", base + ".ops.txt"};
  summary_ = fmt::format("profile: steps {}..{} ({} operator calls) -> {} and {}", recorded_first_, recorded_last_,
                         events.size(), written_[0], written_[1]);
  if (!ops.empty()) {
    summary_ += "; top by total time:";
    for (size_t i = 0; i < std::min<size_t>(3, ops.size()); ++i)
      summary_ += fmt::format(" {} {:.1f} ms{}", ops[i].name, ops[i].total_ns * 1e-6, i + 1 < std::min<size_t>(3, ops.size()) ? "," : "");
  }
}

}  // namespace keel::monitor
