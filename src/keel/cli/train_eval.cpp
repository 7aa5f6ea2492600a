// `keel train` and `keel eval`.
#include <fmt/format.h>
#include <filesystem>
#include <iostream>
#include <thread>
#include <nlohmann/json.hpp>

#include "keel/cli/commands.h"
#include "keel/config/config.h"
#include "keel/data/loader.h"
#include "keel/dist/launch.h"
#include "keel/models/state_dict.h"
#include "keel/monitor/profiler.h"
#include "keel/run/trainer.h"
#include "keel/util/interrupt.h"

namespace keel::cli {
namespace {

struct CommonArgs {
  std::string config;
  std::vector<std::string> sets;
  bool json = false;
};

void add_common(CLI::App* sub, CommonArgs& a) {
  sub->add_option("config", a.config, "TOML config file (e.g. configs/default.toml)")->required();
  sub->add_option("--set", a.sets, "override a key: --set section.key=value (repeatable)");
  sub->add_flag("--json", a.json, "also print the final summary as one JSON object on the last line");
}

}  // namespace

Runner add_train(CLI::App& app) {
  auto args = std::make_shared<CommonArgs>();
  auto* sub = app.add_subcommand("train", "train a model from a config; writes runs/<name>/");
  add_common(sub, *args);
  auto resume = std::make_shared<std::string>();
  sub->add_option("--resume", *resume,
                  "continue a run: `auto` = newest valid checkpoint in runs/<name>/checkpoints (fresh start if "
                  "none), or a checkpoint directory");
  auto profile = std::make_shared<std::string>();
  sub->add_option("--profile-steps", *profile,
                  "record steps A..B (1-based, inclusive) with LibTorch's profiler: writes "
                  "runs/<name>/profile_steps_A-B.trace.json (chrome://tracing, Perfetto) and .ops.txt (operators "
                  "by total time)");
  auto nproc = std::make_shared<int>(0);
  sub->add_option("--nproc", *nproc,
                  "data-parallel on this machine: start N ranks (processes) of this training, each with "
                  "train.batch_size / N samples per step, gradients all-reduced (docs/distributed.md); on a "
                  "cluster start each rank with torchrun or srun instead")
      ->check(CLI::Range(1, 1024));
  return [args, resume, profile, nproc] {
    config::Config cfg = config::load(args->config, args->sets);
    if (*nproc > 1) {
      // The checks every rank makes, before starting any: one clear error instead of N.
      try {
        run::check_data_parallel(cfg, *nproc);
      } catch (const config::ConfigError& e) {
        throw config::ConfigError(fmt::format("--nproc {}: {}", *nproc, e.what()));
      }
      dist::LaunchOptions lo;
      lo.nproc = *nproc;
      lo.timeout_seconds = cfg.dist.timeout_seconds;
      lo.log_dir = (std::filesystem::path(cfg.run.dir) / cfg.run.name).string();
      std::filesystem::create_directories(lo.log_dir);
      lo.args = {"train", args->config};
      for (const auto& s : args->sets) lo.args.insert(lo.args.end(), {"--set", s});
      if (cfg.run.threads == 0) {
        // N ranks on one machine share its cores: each gets its part instead of all of them.
        const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
        const int per = std::max(1, cores / *nproc);
        lo.args.insert(lo.args.end(), {"--set", fmt::format("run.threads={}", per)});
        fmt::print("keel: --nproc {}: run.threads = 0 -> {} intra-op threads per rank ({} cores)\n", *nproc, per, cores);
      }
      if (!resume->empty()) lo.args.insert(lo.args.end(), {"--resume", *resume});
      if (!profile->empty()) lo.args.insert(lo.args.end(), {"--profile-steps", *profile});
      if (args->json) lo.args.push_back("--json");
      return dist::launch_local(lo);
    }
    monitor::ProfileRange range;
    if (!profile->empty()) {
      try {
        range = monitor::parse_profile_steps(*profile);
      } catch (const std::invalid_argument& e) {
        throw config::ConfigError(e.what());
      }
    }
    run::Trainer trainer(cfg);
    trainer.set_profile_steps(range);
    util::InterruptGuard ctrl_c;  // first Ctrl-C: stop after the step with a checkpoint; second: exit now
    run::FitResult r = trainer.fit(*resume);
    if (r.interrupted) {
      if (args->json) std::cout << r.to_json().dump() << std::endl;
      if (util::stop_requested()) {
        std::string cmd = "keel train " + args->config;
        for (const auto& s : args->sets) cmd += " --set " + s;
        fmt::print("keel: interrupted; checkpoint {}\nkeel: resume with: {} --resume auto\n", r.checkpoint, cmd);
        std::fflush(stdout);
        return 130;  // the shell's code for a SIGINT exit
      }
      return 0;
    }
    fmt::print("keel: test accuracy {:.2f}% (top-5 {:.2f}%), test loss {:.4f}, {} steps in {:.1f}s "
               "({:.0f} images/s, {:.0f}% waiting for data), wall {:.1f}s\n",
               100 * r.test.top1, 100 * r.test.top5, r.test.loss, r.steps, r.train_seconds,
               r.images_per_second, 100 * r.data_wait_share, r.wall_seconds);
    if (!r.checkpoint.empty()) fmt::print("keel: checkpoint {}\n", r.checkpoint);
    if (args->json) std::cout << r.to_json().dump() << std::endl;
    return 0;
  };
}

Runner add_eval(CLI::App& app) {
  auto args = std::make_shared<CommonArgs>();
  auto checkpoint = std::make_shared<std::string>();
  auto* sub = app.add_subcommand("eval", "evaluate a checkpoint on the config's test split");
  add_common(sub, *args);
  sub->add_option("--checkpoint", *checkpoint, "weights file (runs/<name>/checkpoints/final.pt)")->required();
  return [args, checkpoint] {
    config::Config cfg = config::load(args->config, args->sets);
    const int threads = run::configure_threads(cfg.run.threads);
    auto ds = run::make_dataset(cfg, false);
    cfg.model.weights = *checkpoint;
    auto model = run::make_model(cfg);
    if (cfg.train.channels_last) run::model_to_channels_last(*model);
    data::Loader loader(ds, run::loader_options(cfg, false));
    data::DeviceAugment aug(run::augment_options(cfg), 0);
    train::EvalResult r = train::evaluate(*model, loader, aug, cfg.train.channels_last,
                                              train::parse_precision(cfg.train.precision));
    fmt::print("keel: {} on {} test images ({} threads): top-1 {:.2f}%, top-5 {:.2f}%, loss {:.4f}, {:.1f}s\n",
               cfg.model.name, r.samples, threads, 100 * r.top1, 100 * r.top5, r.loss, r.seconds);
    if (args->json) {
      nlohmann::json j = r.to_json();
      j["images_per_second"] = r.seconds > 0 ? r.samples / r.seconds : 0.0;
      j["checkpoint"] = *checkpoint;
      std::cout << j.dump() << std::endl;
    }
    return 0;
  };
}

Runner add_config(CLI::App& app) {
  auto* sub = app.add_subcommand("config", "print the configuration reference or a resolved config");
  auto reference = std::make_shared<bool>(false);
  auto args = std::make_shared<CommonArgs>();
  sub->add_flag("--reference", *reference, "print docs/configuration.md (every key, type, default)");
  sub->add_option("config", args->config, "config file to resolve and print as TOML");
  sub->add_option("--set", args->sets, "override a key: --set section.key=value (repeatable)");
  return [reference, args] {
    if (*reference) std::cout << config::reference_markdown();
    else std::cout << config::to_toml(config::load(args->config, args->sets));
    return 0;
  };
}

}  // namespace keel::cli
