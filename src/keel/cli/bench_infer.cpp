// `keel bench infer [CONFIG] [--checkpoint PATH]`: inference latency distribution (p50/p90/p99/max at batch 1)
// and throughput over a batch-size sweep, per optimisation setting (models/inference.h), with peak memory. The
// settings are measured in alternating rounds so they see the same machine load; ratios are what to compare.
#include <fmt/format.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "keel/checkpoint/checkpoint.h"
#include "keel/compat/torch_compat.h"
#include "keel/cli/commands.h"
#include "keel/config/config.h"
#include "keel/device/device.h"
#include "keel/memory/cpu_allocator.h"
#include "keel/models/inference.h"
#include "keel/models/registry.h"
#include "keel/models/state_dict.h"
#include "keel/models/vit.h"
#include "keel/run/model_spec.h"
#include "keel/run/trainer.h"

namespace keel::cli {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct InferArgs {
  std::string config;
  std::vector<std::string> sets;
  std::string checkpoint;
  std::string model = "resnet50";
  int64_t size = 0, channels = 3, classes = 1000;
  std::string settings =
      "plain,im,im+fold,im+fold+cl,im+fold+cl+pack,im+fold+cl+bf16,im+fold+cl+bf16w,im+fold+cl+bf16m,"
      "im+fold+cl+pack+bf16m";
  std::string batches = "1,8,32";
  int64_t latency_iters = 20, sweep_iters = 3, warmup = 2, rounds = 1, threads = -1;
  std::string device;
  std::string attention;
  bool json = false;
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string t; std::getline(ss, t, ',');)
    if (!t.empty()) out.push_back(t);
  return out;
}

// Nearest-rank percentile of sorted values.
double percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0.0;
  const auto rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(sorted.size())));
  return sorted[std::min(sorted.size() - 1, rank == 0 ? 0 : rank - 1)];
}

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// What is measured: the model (spec), its weights, input side, device and threads, resolved from the arguments.
struct Plan {
  models::ModelSpec spec;
  models::StateDict weights;  // empty = random initialisation (seeded)
  std::string weights_from = "random initialisation (seed 0)";
  int64_t size = 224;
  std::string device = "auto";
  int64_t threads = 0;
  std::string run_dir;  // the training run the weights or config belong to ("" = none): gets bench/infer.json
};

// The training run (a directory with the metrics.jsonl `keel train` writes) whose RUN/checkpoints/ holds
// `path` (a checkpoint directory or checkpoints/final.pt); "" when there is none.
std::string run_dir_of(const fs::path& path) {
  const fs::path p = fs::absolute(path).lexically_normal();
  if (p.parent_path().filename() != "checkpoints") return "";
  const fs::path run = p.parent_path().parent_path();
  return fs::exists(run / "metrics.jsonl") ? run.string() : "";
}

Plan resolve(const InferArgs& a) {
  Plan p;
  std::optional<config::Config> cfg;
  if (!a.config.empty()) cfg = config::load(a.config, a.sets);
  if (!a.checkpoint.empty()) {
    if (fs::is_directory(a.checkpoint)) {
      checkpoint::CheckpointContents c = checkpoint::load(a.checkpoint);  // verifies sizes and CRC-32s first
      if (!cfg) cfg = config::parse(c.config_toml, a.checkpoint + "/config.toml", a.sets);
      p.weights = std::move(c.model);
      p.weights_from = fmt::format("checkpoint {} (step {})", a.checkpoint, c.step);
    } else {
      p.weights = models::read_state_dict(a.checkpoint);
      p.weights_from = a.checkpoint;
    }
  }
  if (!a.checkpoint.empty()) p.run_dir = run_dir_of(a.checkpoint);
  if (cfg) {
    p.spec = run::model_spec(*cfg);
    p.spec.checkpoint_stages = false;  // a training-time memory setting
    p.device = cfg->run.device;
    p.threads = cfg->run.threads;
    if (p.weights.empty() && !cfg->model.weights.empty()) {
      p.weights = models::read_state_dict(cfg->model.weights);
      p.weights_from = cfg->model.weights;
    }
    const std::string& ds = cfg->data.dataset;
    p.size = ds == "image_folder" || ds == "synthetic" ? cfg->data.image_size
             : ds.rfind("cifar", 0) == 0               ? 32
                                                       : 28;
  } else {
    p.spec.name = a.model;
    p.spec.in_channels = a.channels;
    p.spec.num_classes = a.classes;
  }
  if (!a.attention.empty()) p.spec.attention = a.attention;
  if (a.size > 0) {
    p.size = a.size;
    if (p.spec.image_size == 0) p.spec.image_size = a.size;  // a ViT is built for the size asked
  } else if (auto vit = models::vit_options(p.spec.name)) {
    p.size = p.spec.image_size > 0 ? p.spec.image_size : vit->image_size;  // a ViT takes one size only
  }
  if (!a.device.empty()) p.device = a.device;
  if (a.threads >= 0) p.threads = a.threads;
  return p;
}

struct Measured {
  models::InferenceOptions opts;
  models::NetPtr model;
  models::Prepared prepared;
  int64_t param_bytes = 0, peak_extra_bytes = 0;
  std::vector<double> latency_ms;
  std::map<int64_t, std::vector<double>> ips;  // batch -> images/s per round
};

}  // namespace

Runner add_bench_infer(CLI::App* bench) {
  auto a = std::make_shared<InferArgs>();
  auto* sub = bench->add_subcommand(
      "infer", "inference latency percentiles (batch 1) and throughput (batch sweep) per optimisation setting");
  sub->add_option("config", a->config, "TOML config naming the model (model.*, run.threads, run.device); optional");
  sub->add_option("--set", a->sets, "key=value override of the config (repeatable)");
  sub->add_option("--checkpoint", a->checkpoint,
                  "weights: a checkpoint directory (its config.toml names the model when CONFIG is not given) or a "
                  "torch.save() state dict file (torchvision's loads by name)");
  sub->add_option("--model", a->model, "registered model, when no CONFIG is given")->capture_default_str();
  sub->add_option("--size", a->size, "image side (0: the model's for ViTs, else the config's data, else 224)")
      ->capture_default_str();
  sub->add_option("--channels", a->channels, "input channels, when no CONFIG is given")->capture_default_str();
  sub->add_option("--classes", a->classes, "classes, when no CONFIG is given")->capture_default_str();
  sub->add_option("--settings", a->settings,
                  "comma-separated settings, each plain or '+'-joined switches: im (inference mode), fold (conv-BN "
                  "folding), cl (channels_last), pack (oneDNN pre-packed linear weights; with fp32 or bf16m), bf16 "
                  "(autocast), bf16w (autocast + weights cast to bf16 once), bf16m (the whole model in bf16), fp16 "
                  "(CUDA autocast)")
      ->capture_default_str();
  sub->add_option("--batches", a->batches, "comma-separated batch sizes of the throughput sweep")->capture_default_str();
  sub->add_option("--latency-iters", a->latency_iters, "timed batch-1 forwards per setting and round (0 = none)")
      ->capture_default_str();
  sub->add_option("--sweep-iters", a->sweep_iters, "timed forwards per batch size, setting and round")
      ->capture_default_str();
  sub->add_option("--warmup", a->warmup, "untimed forwards before each measurement")->capture_default_str();
  sub->add_option("--rounds", a->rounds, "rounds over all settings (alternated); latency samples pool, throughput "
                                         "takes the median")->capture_default_str();
  sub->add_option("--threads", a->threads, "intra-op threads (default: the config's run.threads, else all cores)");
  sub->add_option("--device", a->device, "auto, cpu, cuda or cuda:N (default: the config's run.device, else auto)");
  sub->add_option("--attention", a->attention, "ViTs: auto, keel, sdpa (overrides model.attention)");
  sub->add_flag("--json", a->json, "print the result as one JSON object on the last line");
  return [a, sub]() -> int {
    (void)sub;
    const Plan plan = resolve(*a);
    const int threads = run::configure_threads(plan.threads);
    memory::install_cpu_allocator();
    const at::Device dev = device::resolve(plan.device);
    std::vector<int64_t> batches;
    for (const auto& b : split(a->batches)) batches.push_back(std::stoll(b));
    TORCH_CHECK(!batches.empty() && a->rounds >= 1 && a->sweep_iters >= 1 && a->latency_iters >= 0,
                "bench infer: need at least one batch size, one round and one sweep iteration");

    std::vector<Measured> ms;
    for (const auto& label : split(a->settings)) {
      Measured m;
      m.opts = models::InferenceOptions::parse(label);
      torch::manual_seed(0);
      m.model = models::create(plan.spec);
      if (!plan.weights.empty()) models::load_state_dict(*m.model, plan.weights);
      m.model->to(dev);
      m.prepared = models::prepare_for_inference(*m.model, m.opts);
      if (m.opts.pack && m.prepared.packed == 0) {
        fmt::print("  note: {}: no linear weight was packed ({}); the setting runs at::linear\n", label,
                   compat::has_packed_linear() ? "this CPU or device does not support it"
                                               : "this LibTorch has no mkldnn::_linear_pointwise");
      }
      for (const auto& p : m.model->parameters()) m.param_bytes += p.numel() * p.element_size();
      ms.push_back(std::move(m));
    }
    TORCH_CHECK(!ms.empty(), "bench infer: --settings names no setting");
    const int64_t C = plan.spec.in_channels, S = plan.size;
    auto input = [&](int64_t n) { return at::randn({n, C, S, S}, at::TensorOptions().device(dev)); };

    for (int64_t r = 0; r < a->rounds; ++r) {
      for (auto& m : ms) {
        device::synchronize(dev);
        const int64_t base = device::memory_stats(dev).current;
        device::reset_peak(dev);
        if (a->latency_iters > 0) {
          const at::Tensor x = input(1);
          for (int64_t i = 0; i < a->warmup; ++i) models::infer(*m.model, x, m.opts);
          for (int64_t i = 0; i < a->latency_iters; ++i) {
            device::synchronize(dev);
            const auto t0 = Clock::now();
            models::infer(*m.model, x, m.opts);
            device::synchronize(dev);
            m.latency_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
          }
        }
        for (int64_t b : batches) {
          const at::Tensor x = input(b);
          for (int64_t i = 0; i < a->warmup; ++i) models::infer(*m.model, x, m.opts);
          device::synchronize(dev);
          const auto t0 = Clock::now();
          for (int64_t i = 0; i < a->sweep_iters; ++i) models::infer(*m.model, x, m.opts);
          device::synchronize(dev);
          const double s = std::chrono::duration<double>(Clock::now() - t0).count();
          m.ips[b].push_back(static_cast<double>(b * a->sweep_iters) / s);
        }
        m.peak_extra_bytes = std::max(m.peak_extra_bytes, device::memory_stats(dev).peak - base);
      }
    }

    nlohmann::json out = {{"model", plan.spec.name}, {"size", S}, {"channels", C},
                          {"classes", plan.spec.num_classes}, {"weights", plan.weights_from},
                          {"device", dev.str()}, {"threads", threads}, {"rounds", a->rounds},
                          {"latency_iters", a->latency_iters}, {"sweep_iters", a->sweep_iters},
                          {"warmup", a->warmup}, {"batches", batches}};
    if (auto* vit = dynamic_cast<models::VisionTransformer*>(ms.front().model.get())) {
      out["attention"] = models::to_string(vit->opts.attention);
    }
    fmt::print("keel bench infer: {} {}x{}x{}, {} classes, weights: {}, {} with {} threads, {} round(s): "
               "latency over {} batch-1 forwards per round, throughput over {} forwards per batch size\n",
               plan.spec.name, C, S, S, plan.spec.num_classes, plan.weights_from, dev.str(), threads, a->rounds,
               a->latency_iters, a->sweep_iters);
    std::string head = fmt::format("  {:<18} {:>8} {:>8} {:>8} {:>8}", "setting", "p50 ms", "p90 ms", "p99 ms",
                                   "max ms");
    for (int64_t b : batches) head += fmt::format(" {:>10}", fmt::format("b{} img/s", b));
    head += fmt::format(" {:>9} {:>9}", "peak MiB", "x p50");
    fmt::print("{}\n", head);
    const double base_p50 = median(ms.front().latency_ms);
    for (auto& m : ms) {
      std::vector<double> lat = m.latency_ms;
      std::sort(lat.begin(), lat.end());
      const double p50 = percentile(lat, 50), p90 = percentile(lat, 90), p99 = percentile(lat, 99),
                   mx = lat.empty() ? 0.0 : lat.back();
      std::string line = fmt::format("  {:<18} {:8.2f} {:8.2f} {:8.2f} {:8.2f}", m.opts.label(), p50, p90, p99, mx);
      nlohmann::json j = {{"setting", m.opts.label()},
                          {"latency_ms", {{"p50", p50}, {"p90", p90}, {"p99", p99}, {"max", mx}, {"samples", m.latency_ms}}},
                          {"peak_extra_bytes", m.peak_extra_bytes}, {"param_bytes", m.param_bytes},
                          {"batchnorms_folded", m.prepared.folded}, {"linears_packed", m.prepared.packed}};
      for (int64_t b : batches) {
        const double ips = median(m.ips[b]);
        line += fmt::format(" {:10.1f}", ips);
        j["images_per_second"][std::to_string(b)] = ips;
        j["images_per_second_samples"][std::to_string(b)] = m.ips[b];
      }
      line += fmt::format(" {:9.1f} {:>9}", m.peak_extra_bytes / 1048576.0,
                          p50 > 0 && base_p50 > 0 ? fmt::format("x{:.2f}", base_p50 / p50) : std::string("-"));
      fmt::print("{}\n", line);
      out["settings"].push_back(j);
    }
    fmt::print("  (peak MiB: memory allocated beyond what was live before the setting ran (weights excluded); "
               "x p50: the first setting's p50 / this one's)\n");
    if (!plan.run_dir.empty()) {  // `keel report RUN` shows the latest measurement of the run's weights
      const std::string path = plan.run_dir + "/bench/infer.json";
      fs::create_directories(plan.run_dir + "/bench");
      std::ofstream f(path);
      f << out.dump() << "\n";
      if (!f) throw std::runtime_error(path + ": cannot write the benchmark result");
      fmt::print("  written to {} (keel report {} shows it)\n", path, plan.run_dir);
    }
    if (a->json) std::cout << out.dump() << std::endl;
    return 0;
  };
}

}  // namespace keel::cli
