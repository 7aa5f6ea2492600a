// `keel plan-batch`: the largest micro-batch (training and evaluation) whose real step fits the
// memory budget, and the accumulation steps that keep train.batch_size.
#include <fmt/format.h>
#include <iostream>
#include <nlohmann/json.hpp>

#include "keel/cli/commands.h"
#include "keel/config/config.h"
#include "keel/device/device.h"
#include "keel/memory/budget.h"
#include "keel/memory/cpu_allocator.h"
#include "keel/run/trainer.h"

namespace keel::cli {

Runner add_plan_batch(CLI::App& app) {
  struct Args {
    std::string config;
    std::vector<std::string> sets;
    bool json = false;
  };
  auto a = std::make_shared<Args>();
  auto* sub = app.add_subcommand(
      "plan-batch", "find the largest micro-batch whose full step (forward, backward, optimizer) fits memory.budget, "
                    "by running real steps; prints micro-batch, accumulation steps and peak memory");
  sub->add_option("config", a->config, "TOML config file (e.g. configs/default.toml)")->required();
  sub->add_option("--set", a->sets, "override a key: --set section.key=value (repeatable)");
  sub->add_flag("--json", a->json, "also print the plan as one JSON object on the last line");
  return [a] {
    const config::Config cfg = config::load(a->config, a->sets);
    const int threads = run::configure_threads(cfg.run.threads);
    memory::install_cpu_allocator();
    memory::set_cpu_budget(std::nullopt);
    const data::ImageShape shape = run::make_dataset(cfg, true)->shape();
    models::NetPtr model = run::make_model(cfg);
    if (cfg.train.channels_last) run::model_to_channels_last(*model);
    auto opt = train::make_optimizer(*model, run::optimizer_options(cfg));
    const at::Device dev = device::of(*model);
    fmt::print("keel: planning {} at {}x{}x{}, batch {} (eval {}), precision {}, on {} ({} threads); budget {}{}\n",
               cfg.model.name, shape.channels, shape.height, shape.width, cfg.train.batch_size,
               cfg.train.eval_batch_size, cfg.train.precision, dev.str(), threads,
               memory::format_bytes(run::run_budget(cfg, dev)),
               cfg.memory.budget.empty() ? " (all of the device: memory.budget is empty)" : "");
    std::fflush(stdout);
    const train::PlanResult plan = run::plan_for_config(cfg, *model, *opt, shape);
    fmt::print("{}", plan.summary());
    fmt::print("keel: set train.micro_batch = {} (or \"auto\" to plan at start-up)\n", plan.micro_batch);
    if (a->json) std::cout << plan.to_json().dump() << std::endl;
    return 0;
  };
}

}  // namespace keel::cli
