// keel tune: the guided search over speed settings and its real trials (tune.h).
#include "keel/tune/tune.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fcntl.h>
#include <fmt/format.h>
#include <fstream>
#include <functional>
#include <optional>
#include <regex>
#include <sstream>
#include <unistd.h>

#include "keel/device/device.h"
#include "keel/memory/budget.h"
#include "keel/monitor/bottleneck.h"
#include "keel/monitor/device_peak.h"
#include "keel/monitor/step_timer.h"
#include "keel/run/trainer.h"
#include "keel/util/fs.h"

namespace keel::tune {
namespace {

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string micro_text(int64_t m) { return m == config::kAuto ? "auto" : m == 0 ? "whole batch" : std::to_string(m); }

// Sends this process's stdout to a file for its lifetime (a trial's console output goes to its log).
class StdoutToFile {
 public:
  explicit StdoutToFile(const std::string& path) {
    std::fflush(stdout);
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return;
    saved_ = ::dup(STDOUT_FILENO);
    ::dup2(fd, STDOUT_FILENO);
    ::close(fd);
  }
  ~StdoutToFile() {
    std::fflush(stdout);
    if (saved_ >= 0) {
      ::dup2(saved_, STDOUT_FILENO);
      ::close(saved_);
    }
  }
  StdoutToFile(const StdoutToFile&) = delete;
  StdoutToFile& operator=(const StdoutToFile&) = delete;

 private:
  int saved_ = -1;
};

bool has_rule(const Trial& t, const std::string& rule) {
  return std::find(t.rules.begin(), t.rules.end(), rule) != t.rules.end();
}

}  // namespace

bool Settings::operator==(const Settings& o) const {
  return workers == o.workers && prefetch == o.prefetch && micro_batch == o.micro_batch && threads == o.threads &&
         precision == o.precision && channels_last == o.channels_last && checkpoint_stages == o.checkpoint_stages;
}

std::vector<std::string> Settings::overrides() const {
  return {fmt::format("data.workers={}", workers),
          fmt::format("data.prefetch={}", prefetch),
          micro_batch == config::kAuto ? std::string("train.micro_batch=auto")
                                       : fmt::format("train.micro_batch={}", micro_batch),
          fmt::format("run.threads={}", threads),
          fmt::format("train.precision=\"{}\"", precision),
          fmt::format("train.channels_last={}", channels_last ? "true" : "false"),
          fmt::format("model.checkpoint_stages={}", checkpoint_stages ? "true" : "false")};
}

std::string Settings::str() const {
  return fmt::format("workers {}, prefetch {}, micro-batch {}, threads {}, {}{}{}", workers, prefetch,
                     micro_text(micro_batch), threads, precision, channels_last ? ", channels_last" : "",
                     checkpoint_stages ? ", checkpointing" : "");
}

nlohmann::json Settings::to_json() const {
  return {{"workers", workers},     {"prefetch", prefetch},
          {"micro_batch", micro_batch == config::kAuto ? nlohmann::json("auto") : nlohmann::json(micro_batch)},
          {"threads", threads},     {"precision", precision},
          {"channels_last", channels_last}, {"checkpoint_stages", checkpoint_stages}};
}

Settings Settings::from(const config::Config& c, int cores) {
  Settings s;
  s.workers = c.data.workers >= 0 ? c.data.workers : std::max<int64_t>(1, cores - 1);  // as the loader resolves -1
  s.prefetch = c.data.prefetch;
  s.micro_batch = c.train.micro_batch;
  s.threads = c.run.threads > 0 ? c.run.threads : cores;
  s.precision = c.train.precision;
  s.channels_last = c.train.channels_last;
  s.checkpoint_stages = c.model.checkpoint_stages;
  return s;
}

nlohmann::json Trial::to_json() const {
  return {{"settings", settings.to_json()}, {"group", group},
          {"images_per_second", images_per_second}, {"data_wait_share", data_wait_share},
          {"peak_memory_bytes", peak_memory_bytes}, {"resolved_micro_batch", resolved_micro_batch},
          {"seconds", seconds}, {"error", error}, {"rules", rules}};
}

nlohmann::json SearchResult::to_json() const {
  nlohmann::json t = nlohmann::json::array();
  for (const auto& x : trials) t.push_back(x.to_json());
  return {{"start", start.to_json()}, {"best", best.to_json()}, {"note", note},
          {"start_images_per_second", start_images_per_second}, {"best_images_per_second", best_images_per_second},
          {"speedup", speedup()}, {"trials", t}};
}

std::string SearchResult::table() const {
  std::string out = fmt::format("{:>3}  {:<8} {:>9} {:>9} {:>10} {:>6}  {}\n", "#", "group", "img/s", "data wait",
                                "peak mem", "micro", "settings");
  for (size_t i = 0; i < trials.size(); ++i) {
    const Trial& t = trials[i];
    out += fmt::format("{:>3}  {:<8} {:>9} {:>8.1f}% {:>10} {:>6}  {}{}\n", i + 1, t.group,
                       t.error.empty() ? fmt::format("{:.1f}", t.images_per_second) : std::string("failed"),
                       100 * t.data_wait_share, memory::format_bytes(t.peak_memory_bytes), t.resolved_micro_batch,
                       t.settings.str(), t.error.empty() ? "" : " (" + t.error.substr(0, t.error.find('\n')) + ")");
  }
  return out;
}

std::vector<std::string> group_order(const Trial& t, int64_t batch_size) {
  std::vector<std::string> order;
  auto add = [&](const std::string& g) {
    if (std::find(order.begin(), order.end(), g) == order.end()) order.push_back(g);
  };
  if (t.resolved_micro_batch > 0 && t.resolved_micro_batch < batch_size) add("memory");
  if (has_rule(t, "input-bound") || has_rule(t, "h2d-bound")) add("data");
  // Memory-bound: the micro-batch and checkpointing. Low utilisation (kernels too small for the
  // device): a larger micro-batch first, when there is one to take.
  if (has_rule(t, "memory-bound") || has_rule(t, "low-utilisation")) add("memory");
  if (has_rule(t, "compute-bound") || has_rule(t, "low-utilisation") || has_rule(t, "channels-last")) add("compute");
  for (const char* g : {"data", "memory", "compute"}) add(g);
  return order;
}

std::vector<Settings> candidates(const std::string& group, const Settings& best, const Trial& best_trial,
                                 const SearchOptions& o) {
  std::vector<Settings> out;
  auto push = [&](const Settings& s) {
    if (!(s == best) && std::find(out.begin(), out.end(), s) == out.end()) out.push_back(s);
  };
  if (group == "data") {
    std::vector<int64_t> workers = {0, 1, std::max(1, o.cores - 1), o.cores, 2 * o.cores};
    std::sort(workers.begin(), workers.end());
    for (int64_t w : workers) {
      Settings s = best;
      s.workers = w;
      push(s);
    }
    for (int64_t p : {2, 4, 8}) {
      Settings s = best;
      s.prefetch = p;
      push(s);
    }
  } else if (group == "memory") {
    const bool memory_bound = has_rule(best_trial, "memory-bound");
    const int64_t used = best_trial.resolved_micro_batch > 0 ? best_trial.resolved_micro_batch : o.batch_size;
    // Larger micro-batches run faster while they fit: the planner's largest fitting one, the whole batch.
    if (best.micro_batch != config::kAuto && (o.has_memory_budget || memory_bound)) {
      Settings s = best;
      s.micro_batch = config::kAuto;
      push(s);
    }
    if (used < o.batch_size && !memory_bound) {
      Settings s = best;
      s.micro_batch = 0;
      push(s);
      if (o.batch_size % (2 * used) == 0 && 2 * used < o.batch_size) {
        s.micro_batch = 2 * used;
        push(s);
      }
    }
    // Activation checkpointing only pays when it lets the micro-batch grow: with the planner.
    if (o.conv_model && !best.checkpoint_stages && (memory_bound || used < o.batch_size) &&
        (o.has_memory_budget || memory_bound)) {
      Settings s = best;
      s.checkpoint_stages = true;
      s.micro_batch = config::kAuto;
      push(s);
    }
    if (best.checkpoint_stages) {  // costs a recomputation: try without
      Settings s = best;
      s.checkpoint_stages = false;
      push(s);
    }
  } else if (group == "compute") {
    if (o.allow_precision && best.precision == "fp32") {
      if (o.bf16_fast || o.cuda) {
        Settings s = best;
        s.precision = "bf16";
        push(s);
      }
      if (o.cuda) {
        Settings s = best;
        s.precision = "fp16";
        push(s);
      }
    }
    if (o.conv_model) {
      Settings s = best;
      s.channels_last = !best.channels_last;
      push(s);
    }
    if (!o.cuda) {
      for (int64_t t : {static_cast<int64_t>(o.cores), static_cast<int64_t>(std::max(1, o.cores / 2))}) {
        Settings s = best;
        s.threads = t;
        push(s);
      }
    }
  }
  return out;
}

Search::Search(SearchOptions o, TrialFn trial, ClockFn clock)
    : o_(std::move(o)), trial_(std::move(trial)), clock_(std::move(clock)) {}

bool Search::time_for_another(double best_seconds) const {
  if (o_.max_trials > 0 && static_cast<int>(trials_.size()) >= o_.max_trials) return false;
  std::vector<double> secs;
  for (const auto& t : trials_) secs.push_back(t.seconds);
  // Room for one more trial (the median so far) and the final re-measurement: the start and the
  // best (or this trial, should it win and be faster to run) remeasure_repeats times each.
  const double next = median(secs);
  const double reserve = o_.remeasure_repeats * (trials_.front().seconds + std::max(best_seconds, next));
  return clock_() + next + reserve <= o_.budget_seconds;
}

SearchResult Search::run(const Settings& start) {
  trials_.clear();
  trials_.push_back(trial_(start, "start"));
  if (!trials_.back().error.empty()) {
    throw std::runtime_error("the starting settings fail, nothing to tune from: " + trials_.back().error);
  }
  Settings best = start;
  Trial best_trial = trials_.back();
  std::vector<size_t> adopted;
  auto tried = [&](const Settings& s) {
    return std::any_of(trials_.begin(), trials_.end(), [&](const Trial& t) { return t.settings == s; });
  };
  bool improved = true, out_of_time = false;
  while (improved && !out_of_time) {
    improved = false;
    for (const std::string& g : group_order(best_trial, o_.batch_size)) {
      // The group's candidates are derived from the best so far: after an adoption they are derived
      // again from the new best (the next untried one is always relative to the current best).
      for (;;) {
        std::optional<Settings> next;
        for (const Settings& c : candidates(g, best, best_trial, o_)) {
          if (!tried(c)) {
            next = c;
            break;
          }
        }
        if (!next) break;
        if (!time_for_another(best_trial.seconds)) {
          out_of_time = true;
          break;
        }
        trials_.push_back(trial_(*next, g));
        const Trial& t = trials_.back();
        if (t.error.empty() && t.images_per_second > best_trial.images_per_second * (1 + o_.min_gain)) {
          best = *next;
          best_trial = t;
          adopted.push_back(trials_.size() - 1);
          improved = true;
        }
      }
      if (out_of_time) break;
    }
  }
  SearchResult r;
  r.start = start;
  r.best = best;
  // Re-measured in this run, alternating, so a drift in machine load touches both alike.
  std::vector<double> s_ips = {trials_.front().images_per_second}, b_ips = {best_trial.images_per_second};
  if (!(best == start)) {
    s_ips.clear();
    b_ips.clear();
    for (int i = 0; i < o_.remeasure_repeats; ++i) {
      trials_.push_back(trial_(start, "final"));
      s_ips.push_back(trials_.back().images_per_second);
      trials_.push_back(trial_(best, "final"));
      b_ips.push_back(trials_.back().images_per_second);
    }
  }
  r.start_images_per_second = median(s_ips);
  r.best_images_per_second = median(b_ips);
  r.trials = trials_;
  r.adopted = adopted;
  // The search's gain must hold when re-measured next to the start; otherwise it was noise and the
  // start settings are kept (the tuned config is then never slower than the input).
  if (!(best == start) && !(r.best_images_per_second > r.start_images_per_second * (1 + o_.min_gain))) {
    r.note = fmt::format("re-measured, the search's best ({}) ran {:.1f} img/s against the start's {:.1f}: its gain "
                         "did not hold (> {:.0f}% needed), so the start settings are kept",
                         best.str(), r.best_images_per_second, r.start_images_per_second, 100 * o_.min_gain);
    r.best = start;
    r.adopted.clear();
    r.best_images_per_second = r.start_images_per_second;
  }
  return r;
}

Trial run_trial(const std::string& config_path, const std::vector<std::string>& sets, const Settings& s,
                const std::string& dir, const std::string& name, const std::string& group) {
  const config::Config base = config::load(config_path, sets);
  const int64_t warm = base.tune.warmup_steps;
  const int64_t measure = (base.tune.measure_steps + warm - 1) / warm * warm;  // whole logging windows
  std::vector<std::string> o = sets;
  for (auto& x : s.overrides()) o.push_back(x);
  for (auto& x : std::vector<std::string>{
           fmt::format("train.max_steps={}", warm + measure), fmt::format("train.log_every={}", warm),
           "train.epochs=1000",  // max_steps ends the trial, whatever the dataset size
           fmt::format("data.test_limit={}", base.train.eval_batch_size), "checkpoint.save_final=false",
           "checkpoint.every_steps=0", "checkpoint.every_minutes=0", "checkpoint.keep_best=\"\"",
           "early_stop.enabled=false", fmt::format("run.dir=\"{}\"", dir), fmt::format("run.name=\"{}\"", name)}) {
    o.push_back(x);
  }
  Trial t;
  t.settings = s;
  t.group = group;
  const auto t0 = std::chrono::steady_clock::now();
  config::Config cfg = config::load(config_path, o);
  util::make_dirs(dir);
  try {
    StdoutToFile quiet(dir + "/" + name + ".log");
    run::Trainer trainer(cfg);
    trainer.fit();
  } catch (const std::exception& e) {
    t.error = e.what();
  }
  t.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!t.error.empty()) return t;

  // The logging windows after the warm-up: time-weighted throughput and shares.
  std::ifstream in(dir + "/" + name + "/metrics.jsonl");
  double seconds = 0, images = 0, wait = 0;
  std::vector<double> shares(monitor::kNumPhases, 0.0);
  int64_t prev_step = 0;
  std::string line;
  nlohmann::json last;
  while (std::getline(in, line)) {
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || j.value("event", "") != "step") continue;
    const int64_t step = j.at("step").get<int64_t>();
    const double secs = j.at("step_seconds").get<double>() * static_cast<double>(step - prev_step);
    prev_step = step;
    t.peak_memory_bytes = std::max<int64_t>(t.peak_memory_bytes, j.value("memory_peak_bytes", 0.0));
    last = j;
    if (step <= warm) continue;
    seconds += secs;
    images += j.at("images_per_second").get<double>() * secs;
    wait += j.value("data_wait_share", 0.0) * secs;
    for (int ph = 0; ph < monitor::kNumPhases; ++ph) {
      const std::string key = std::string(monitor::phase_name(static_cast<monitor::Phase>(ph))) + "_share";
      shares[ph] += j.value(key, 0.0) * secs;
    }
  }
  if (seconds <= 0) {
    t.error = fmt::format("no measured steps after the {} warm-up steps (the run stopped at step {})", warm, prev_step);
    return t;
  }
  t.images_per_second = images / seconds;
  t.data_wait_share = wait / seconds;
  for (auto& x : shares) x /= seconds;
  t.shares = shares;
  t.resolved_micro_batch = static_cast<int64_t>(last.value("micro_batch", 0.0));

  monitor::Measurements m;
  for (int ph = 0; ph < monitor::kNumPhases; ++ph) m.share[ph] = shares[ph];
  m.data_workers = static_cast<int>(s.workers);
  if (last.contains("utilisation")) m.utilisation = last.at("utilisation").get<double>();
  m.peak_memory_bytes = t.peak_memory_bytes;
  const at::Device dev = device::resolve(cfg.run.device);
  if (!cfg.memory.budget.empty()) m.memory_budget_bytes = run::run_budget(cfg, dev);
  m.precision = s.precision;
  m.cpu_supports_bf16 = monitor::cpu_supports_bf16();
  m.on_cuda = dev.is_cuda();
  m.channels_last = s.channels_last;
  for (const auto& a : monitor::diagnose(m)) t.rules.push_back(a.rule);
  return t;
}

std::string patch_toml(const std::string& text, const std::vector<Change>& changes) {
  std::vector<std::string> lines;
  {
    std::istringstream is(text);
    std::string l;
    while (std::getline(is, l)) lines.push_back(l);
  }
  static const std::regex section_re(R"(^\s*\[\s*([A-Za-z0-9_.\-]+)\s*\]\s*(#.*)?$)");
  static const std::regex key_re(R"(^(\s*)([A-Za-z0-9_\-]+)\s*=)");
  for (const Change& c : changes) {
    const auto dot = c.key.rfind('.');
    const std::string section = c.key.substr(0, dot), name = c.key.substr(dot + 1);
    const std::string new_line = fmt::format("{} = {}  # {}", name, c.value, c.comment);
    std::string current;
    int last_in_section = -1;
    bool done = false;
    for (size_t i = 0; i < lines.size() && !done; ++i) {
      std::smatch m;
      if (std::regex_match(lines[i], m, section_re)) {
        current = m[1];
        if (current == section) last_in_section = static_cast<int>(i);
        continue;
      }
      if (current != section) continue;
      if (std::regex_search(lines[i], m, key_re)) {
        last_in_section = static_cast<int>(i);
        if (m[2] == name) {
          lines[i] = std::string(m[1]) + new_line;
          done = true;
        }
      }
    }
    if (done) continue;
    if (last_in_section >= 0) {
      lines.insert(lines.begin() + last_in_section + 1, new_line);
    } else {
      if (!lines.empty() && !lines.back().empty()) lines.push_back("");
      lines.push_back("[" + section + "]");
      lines.push_back(new_line);
    }
  }
  std::string out;
  for (const auto& l : lines) out += l + "\n";
  return out;
}

std::vector<Change> tuned_changes(const SearchResult& r) {
  struct Knob {
    const char* key;
    std::function<std::string(const Settings&)> value;  // as TOML
  };
  const std::vector<Knob> knobs = {
      {"data.workers", [](const Settings& s) { return std::to_string(s.workers); }},
      {"data.prefetch", [](const Settings& s) { return std::to_string(s.prefetch); }},
      {"train.micro_batch",
       [](const Settings& s) { return s.micro_batch == config::kAuto ? std::string("\"auto\"") : std::to_string(s.micro_batch); }},
      {"run.threads", [](const Settings& s) { return std::to_string(s.threads); }},
      {"train.precision", [](const Settings& s) { return "\"" + s.precision + "\""; }},
      {"train.channels_last", [](const Settings& s) { return std::string(s.channels_last ? "true" : "false"); }},
      {"model.checkpoint_stages", [](const Settings& s) { return std::string(s.checkpoint_stages ? "true" : "false"); }},
  };
  std::vector<Change> out;
  for (const auto& k : knobs) {
    const std::string was = k.value(r.start), now = k.value(r.best);
    if (was == now) continue;
    // The adopted trial that set this knob to its final value, and the best it replaced.
    std::string why;
    const Trial* before = &r.trials.front();
    for (size_t i : r.adopted) {
      const Trial& t = r.trials[i];
      if (k.value(t.settings) != k.value(before->settings) && k.value(t.settings) == now) {
        why = fmt::format("trial {} ({}): {:.1f} -> {:.1f} img/s, data wait {:.1f}% -> {:.1f}%", i + 1, t.group,
                          before->images_per_second, t.images_per_second, 100 * before->data_wait_share,
                          100 * t.data_wait_share);
      }
      before = &t;
    }
    out.push_back({k.key, now, fmt::format("keel tune: was {}; {}", was, why)});
  }
  return out;
}

}  // namespace keel::tune
