// `keel tune CONFIG`: short real training trials over the speed settings, guided by the bottleneck
// diagnosis; writes a tuned config beside the input (changed values commented with the measured
// reason), the trials as a table and <run dir>/tune/tune.json (shown by `keel report`).
#include <chrono>
#include <filesystem>
#include <fmt/format.h>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "keel/cli/commands.h"
#include "keel/config/config.h"
#include "keel/device/device.h"
#include "keel/memory/budget.h"
#include "keel/monitor/device_peak.h"
#include "keel/tune/tune.h"
#include "keel/util/fs.h"

namespace keel::cli {
namespace {

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot read");
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

// " (input-bound, compute-bound)" or "".
std::string rules_text(const std::vector<std::string>& rules) {
  std::string s;
  for (const auto& r : rules) s += (s.empty() ? " (" : ", ") + r;
  return s.empty() ? s : s + ")";
}

}  // namespace

Runner add_tune(CLI::App& app) {
  struct Args {
    std::string config, out;
    std::vector<std::string> sets;
    double budget_minutes = 0;
    int max_trials = 0;
    bool json = false;
  };
  auto a = std::make_shared<Args>();
  auto* sub = app.add_subcommand(
      "tune", "find the fastest safe settings for this model on this machine: short real training trials over "
              "loader workers, prefetch, micro-batch, precision (with tune.allow), channels_last and threads, "
              "guided by the bottleneck diagnosis; writes CONFIG's tuned copy beside it");
  sub->add_option("config", a->config, "TOML config file (e.g. configs/default.toml)")->required();
  sub->add_option("--set", a->sets, "override a key for every trial: --set section.key=value (repeatable; not "
                                    "written into the tuned file)");
  sub->add_option("--budget-minutes", a->budget_minutes, "wall-clock budget (default: tune.budget_minutes)");
  sub->add_option("--max-trials", a->max_trials, "stop exploring after this many trials (0 = only the budget)");
  sub->add_option("--out", a->out, "tuned config path (default: CONFIG with .tuned.toml)");
  sub->add_flag("--json", a->json, "also print the result as one JSON object on the last line");
  return [a] {
    const config::Config cfg = config::load(a->config, a->sets);
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    const at::Device dev = device::resolve(cfg.run.device);
    tune::SearchOptions o;
    o.budget_seconds = 60.0 * (a->budget_minutes > 0 ? a->budget_minutes : cfg.tune.budget_minutes);
    o.min_gain = cfg.tune.min_gain;
    o.allow_precision = std::count(cfg.tune.allow.begin(), cfg.tune.allow.end(), "precision") > 0;
    o.cores = cores;
    o.cuda = dev.is_cuda();
    o.bf16_fast = o.cuda || monitor::cpu_supports_bf16();
    o.conv_model = cfg.model.name.rfind("resnet", 0) == 0;
    o.has_memory_budget = !cfg.memory.budget.empty();
    o.batch_size = cfg.train.batch_size;
    o.max_trials = a->max_trials;
    const std::string run_dir = cfg.run.dir + "/" + cfg.run.name;
    const std::string dir = run_dir + "/tune";
    util::make_dirs(dir);
    const tune::Settings start = tune::Settings::from(cfg, cores);
    fmt::print("keel tune: {} on {}, batch {} (never changed), {} cores, budget {:.1f} min{}\n", cfg.model.name,
               dev.str(), cfg.train.batch_size, cores, o.budget_seconds / 60,
               o.allow_precision ? "" : "; precision kept (tune.allow = [\"precision\"] to let it change)");
    fmt::print("keel tune: each trial {} warm-up + {} measured steps; trial logs in {}\n", cfg.tune.warmup_steps,
               cfg.tune.measure_steps, dir);
    std::fflush(stdout);
    int n = 0;
    const auto t0 = std::chrono::steady_clock::now();
    tune::TrialFn trial = [&](const tune::Settings& s, const std::string& group) {
      ++n;
      tune::Trial t = tune::run_trial(a->config, a->sets, s, dir, fmt::format("trial-{:02}", n), group);
      fmt::print("trial {:>2} [{}] {}: {}\n", n, group, s.str(),
                 t.error.empty() ? fmt::format("{:.1f} img/s, data wait {:.1f}%, peak {}, micro-batch {}{}",
                                               t.images_per_second, 100 * t.data_wait_share,
                                               memory::format_bytes(t.peak_memory_bytes), t.resolved_micro_batch,
                                               rules_text(t.rules))
                                 : "failed: " + t.error.substr(0, t.error.find('\n')));
      std::fflush(stdout);
      return t;
    };
    tune::Search search(o, trial, [&] {
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    });
    const tune::SearchResult r = search.run(start);
    std::string out_path = a->out;
    if (out_path.empty()) {
      std::filesystem::path p(a->config);
      out_path = (p.parent_path() / (p.stem().string() + ".tuned.toml")).string();
    }
    const auto changes = tune::tuned_changes(r);
    std::string text = read_text(a->config);
    text = tune::patch_toml(text, changes);
    text = fmt::format("# Tuned by `keel tune` on {} cores ({}): {:.1f} -> {:.1f} img/s re-measured in the same "
                       "run (x{:.2f}).\n",
                       cores, dev.str(), r.start_images_per_second, r.best_images_per_second, r.speedup()) +
           text;
    // The file must say what was measured: parse it back and compare.
    const tune::Settings check = tune::Settings::from(config::parse(text, out_path, a->sets), cores);
    if (!(check == r.best)) {
      throw std::runtime_error(fmt::format("{}: the tuned file reads back as \"{}\", not the tuned \"{}\" (a key "
                                           "in a form keel tune cannot edit?)", out_path, check.str(), r.best.str()));
    }
    util::atomic_write_file(out_path, text);
    nlohmann::json j = r.to_json();
    j["config"] = a->config;
    j["tuned_config"] = out_path;
    j["budget_seconds"] = o.budget_seconds;
    j["allow"] = cfg.tune.allow;
    nlohmann::json ch = nlohmann::json::array();
    for (const auto& c : changes) ch.push_back({{"key", c.key}, {"value", c.value}, {"reason", c.comment}});
    j["changes"] = ch;
    util::atomic_write_file(dir + "/tune.json", j.dump(1) + "\n");
    fmt::print("\n{}", r.table());
    fmt::print("keel tune: start {:.1f} img/s -> tuned {:.1f} img/s (x{:.2f}, medians of {} alternated "
               "re-measurements)\n",
               r.start_images_per_second, r.best_images_per_second, r.speedup(),
               r.best == r.start ? 1 : o.remeasure_repeats);
    if (!r.note.empty()) fmt::print("keel tune: {}\n", r.note);
    if (changes.empty()) fmt::print("keel tune: no change was faster by more than {:.0f}%\n", 100 * o.min_gain);
    for (const auto& c : changes) fmt::print("  {} = {}  ({})\n", c.key, c.value, c.comment);
    fmt::print("keel tune: wrote {} and {}/tune.json\n", out_path, dir);
    if (a->json) std::cout << j.dump() << std::endl;
    return 0;
  };
}

}  // namespace keel::cli
