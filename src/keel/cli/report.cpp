// `keel report RUN_DIR`: writes RUN_DIR/report.html from the run's records and keel doctor's facts.
#include <fmt/format.h>

#include <ctime>
#include <filesystem>
#include <unistd.h>

#include "keel/cli/commands.h"
#include "keel/monitor/report.h"

namespace keel::cli {

Runner add_report(CLI::App& app) {
  auto* sub = app.add_subcommand(
      "report", "write RUN_DIR/report.html: charts, diagnosis, resolved config and environment (self-contained)");
  auto run_dir = std::make_shared<std::string>();
  auto no_env = std::make_shared<bool>(false);
  sub->add_option("run_dir", *run_dir, "run directory written by keel train (runs/<run.name>)")->required();
  sub->add_flag("--no-environment", *no_env, "leave out keel doctor's measurements (saves ~2 s)");
  return [run_dir, no_env] {
    // Fail on a bad directory before spending seconds on measurements.
    monitor::read_run(*run_dir);
    nlohmann::json env;
    std::string note = "left out (--no-environment)";
    if (!*no_env) {
      config::Config cfg;
      const std::string resolved = *run_dir + "/config.resolved.toml";
      // The run's own threads and data settings when its config still loads; defaults otherwise.
      try {
        if (std::filesystem::exists(resolved)) cfg = config::load(resolved);
      } catch (const std::exception& e) {
        fmt::print("keel report: {}: not used for the environment check ({})\n", resolved, e.what());
      }
      env = doctor_report(cfg);
      char host[256] = "?";
      gethostname(host, sizeof host - 1);
      std::time_t t = std::time(nullptr);
      char when[64];
      std::strftime(when, sizeof when, "%Y-%m-%d %H:%M", std::localtime(&t));
      note = fmt::format("What `keel doctor` measures, measured by `keel report` on {} at {} (the machine the report "
                         "was made on; the same as the run's when made right after it).",
                         host, when);
    }
    const std::string path = monitor::write_report(*run_dir, env, note);
    fmt::print("keel: report {}\n", path);
    return 0;
  };
}

}  // namespace keel::cli
