// `keel export RUN_DIR --format pt`: a run's weights as a torch.save-format file for PyTorch Python.
#include <filesystem>
#include <iostream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "keel/checkpoint/checkpoint.h"
#include "keel/run/model_spec.h"
#include "keel/cli/commands.h"
#include "keel/config/config.h"
#include "keel/models/registry.h"
#include "keel/models/state_dict.h"
#include "keel/util/fs.h"

namespace keel::cli {
namespace {

namespace fs = std::filesystem;

struct ExportArgs {
  std::string run_dir;
  std::string format = "pt";
  std::string from = "auto";
  std::string output;
  bool json = false;
};

// The weights chosen for export, with the resolved config that says which model they belong to.
struct Source {
  std::string path;  // the file or checkpoint directory read
  std::string what;  // "final weights", "checkpoint step 120", ...
  models::StateDict weights;
  config::Config cfg;
};

config::Config config_of(const std::string& toml_text, const std::string& where) {
  try {
    return config::parse(toml_text, where);
  } catch (const config::ConfigError& e) {
    throw std::runtime_error(fmt::format("{}: the resolved config of these weights does not parse ({}): cannot tell "
                                         "which model they belong to", where, e.what()));
  }
}

Source from_checkpoint(const std::string& dir, const std::string& what) {
  checkpoint::CheckpointContents c = checkpoint::load(dir);  // verifies sizes and CRC-32s first
  Source s;
  s.path = dir;
  s.what = fmt::format("{} (step {})", what, c.step);
  s.cfg = config_of(c.config_toml, dir + "/config.toml");
  s.weights = std::move(c.model);
  return s;
}

Source from_final(const std::string& run_dir) {
  const std::string ckpts = run_dir + "/checkpoints";
  Source s;
  s.path = ckpts + "/final.pt";
  s.what = "final weights";
  std::string cfg_path = ckpts + "/final.toml";
  if (!fs::exists(cfg_path)) cfg_path = run_dir + "/config.resolved.toml";
  if (!fs::exists(cfg_path)) {
    throw std::runtime_error(fmt::format("{}: neither {}/final.toml nor {}/config.resolved.toml exists: cannot tell "
                                         "which model the weights belong to", s.path, ckpts, run_dir));
  }
  s.cfg = config::load(cfg_path);
  s.weights = models::read_state_dict(s.path);
  return s;
}

Source choose(const ExportArgs& a) {
  const std::string ckpts = a.run_dir + "/checkpoints";
  if (!fs::is_directory(a.run_dir)) throw std::runtime_error(a.run_dir + ": no such run directory");
  const bool have_final = fs::exists(ckpts + "/final.pt");
  if (a.from == "final" || (a.from == "auto" && have_final)) {
    if (!have_final) throw std::runtime_error(ckpts + "/final.pt: missing (the run did not finish, or ran with "
                                              "checkpoint.save_final = false); try --from latest");
    return from_final(a.run_dir);
  }
  if (a.from == "auto" || a.from == "latest" || a.from == "best") {
    std::vector<std::string> skipped;
    auto latest = checkpoint::find_latest_valid(ckpts, &skipped);
    for (const auto& why : skipped) std::cerr << "checkpoint: skipped " << why << "\n";
    if (!latest) {
      throw std::runtime_error(fmt::format("{}: {}no valid step checkpoint to export{}", ckpts,
                                           a.from == "auto" ? "no final.pt and " : "",
                                           skipped.empty() ? "" : " (the invalid ones are listed above)"));
    }
    if (a.from != "best") return from_checkpoint(*latest, "newest valid checkpoint");
    checkpoint::CheckpointContents newest = checkpoint::load(*latest);
    const nlohmann::json best = newest.state.value("best_checkpoint", nlohmann::json());
    if (best.is_null()) {
      throw std::runtime_error(*latest + ": records no best checkpoint (train with checkpoint.keep_best = "
                               "\"test_top1\" or another metric)");
    }
    return from_checkpoint(ckpts + "/" + best.at("dir").get<std::string>(),
                           fmt::format("best checkpoint by {} = {:.6g}", best.at("monitor").get<std::string>(),
                                       best.at("value").get<double>()));
  }
  if (!fs::is_directory(a.from)) {
    throw std::runtime_error("--from " + a.from + ": neither auto, final, latest, best nor a checkpoint directory");
  }
  return from_checkpoint(a.from, "checkpoint");  // a checkpoint directory
}

}  // namespace

Runner add_export(CLI::App& app) {
  auto a = std::make_shared<ExportArgs>();
  auto* sub = app.add_subcommand("export", "write a run's weights in a format other tools load");
  sub->add_option("run_dir", a->run_dir, "run directory (runs/<name>)")->required();
  sub->add_option("--format", a->format,
                  "pt: a torch.save-format dict of tensors that Python's torch.load reads; for resnet18..152 the "
                  "names are torchvision's, so model.load_state_dict(torch.load(path)) works")
      ->check(CLI::IsMember({"pt"}));
  sub->add_option("--from", a->from,
                  "auto (final.pt, else the newest valid checkpoint), final, latest, best (checkpoint.keep_best), "
                  "or a checkpoint directory");
  sub->add_option("--output,-o", a->output, "output file (default RUN_DIR/export/<model>.pt)");
  sub->add_flag("--json", a->json, "also print a JSON summary on the last line");
  return [a] {
    Source s = choose(*a);
    // The weights must fit the model their config names, strictly, before anything is written.
    auto model = models::create(run::model_spec(s.cfg));
    try {
      models::load_state_dict(*model, s.weights);
    } catch (const std::exception& e) {
      throw std::runtime_error(fmt::format("{}: the weights do not fit {} (in_channels {}, num_classes {}) that its "
                                           "config names: {}", s.path, s.cfg.model.name, s.cfg.model.in_channels,
                                           s.cfg.model.num_classes, e.what()));
    }
    models::StateDict out = models::state_dict_of(*model);  // torchvision order, model's dtypes
    int64_t params = 0;
    for (auto& [name, t] : out) {
      t = t.cpu().contiguous();  // channels-last conv weights as plain NCHW tensors
      if (name.find("running_") == std::string::npos && name.find("num_batches") == std::string::npos)
        params += t.numel();
    }
    const std::string path = a->output.empty() ? a->run_dir + "/export/" + s.cfg.model.name + ".pt" : a->output;
    const fs::path parent = fs::path(path).parent_path();
    if (!parent.empty()) util::make_dirs(parent.string());
    models::write_state_dict(out, path);

    const std::string& m = s.cfg.model.name;
    const bool torchvision = m == "resnet18" || m == "resnet34" || m == "resnet50" || m == "resnet101" ||
                             m == "resnet152";
    fmt::print("keel: exported {} from {} ({}: {} tensors, {} parameters) to {}\n", m, s.what, s.path, out.size(),
               params, path);
    if (torchvision && s.cfg.model.in_channels == 3) {
      fmt::print("keel: in Python: torchvision.models.{}(num_classes={}).load_state_dict(torch.load(\"{}\"))\n", m,
                 s.cfg.model.num_classes, path);
    } else if (torchvision) {
      fmt::print("keel: torchvision's {} takes 3 input channels; these weights take {} (conv1.weight differs)\n", m,
                 s.cfg.model.in_channels);
    }
    if (a->json) {
      std::cout << nlohmann::json{{"output", path},          {"source", s.path},
                                  {"model", m},              {"num_classes", s.cfg.model.num_classes},
                                  {"in_channels", s.cfg.model.in_channels}, {"tensors", out.size()},
                                  {"parameters", params},    {"torchvision", torchvision}}
                       .dump()
                << std::endl;
    }
    return 0;
  };
}

}  // namespace keel::cli
