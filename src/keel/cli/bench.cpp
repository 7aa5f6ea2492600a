// `keel bench step`: training-step throughput of a model on random data, for several precisions measured
// alternately in the same run (ratios, not absolute seconds, are what to compare). `keel bench infer` is in
// bench_infer.cpp.
// `keel bench data`: the input pipeline of a config alone (loader + device augmentation, no model).
#include <fmt/format.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

#include "keel/cli/commands.h"
#include "keel/config/config.h"
#include "keel/data/augment.h"
#include "keel/data/loader.h"
#include "keel/device/device.h"
#include "keel/memory/cpu_allocator.h"
#include "keel/models/registry.h"
#include "keel/train/optimizer.h"
#include "keel/train/step.h"
#include "keel/run/trainer.h"

namespace keel::cli {
namespace {

struct BenchArgs {
  std::string model = "resnet18";
  int64_t size = 64, batch = 64, channels = 3, classes = 10, steps = 10, warmup = 3, repeats = 3, threads = 0;
  std::string precisions = "fp32,bf16";
  std::string device = "auto";
  bool channels_last = true;
  bool json = false;
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string t; std::getline(ss, t, ',');) if (!t.empty()) out.push_back(t);
  return out;
}

// Images per second of `steps` optimizer steps after `warmup`,
// with the given precision, on the resolved device.
double measure(const BenchArgs& a, const std::string& precision, int64_t* peak_bytes) {
  torch::manual_seed(0);
  const at::Device dev = device::resolve(a.device);
  auto model = models::create({a.model, a.channels, a.classes});
  model->to(dev);
  if (a.channels_last) run::model_to_channels_last(*model);
  at::Tensor x = at::randn({a.batch, a.channels, a.size, a.size}, at::TensorOptions().device(dev));
  if (a.channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
  model->train();
  train::OptimizerOptions oo;
  oo.lr = 0.01;
  auto opt = train::make_optimizer(*model, oo);
  train::StepOptions so;
  so.precision = train::parse_precision(precision);
  so.channels_last = a.channels_last;
  so.guard.snapshot_every = 1 << 30;  // measure the step itself, not snapshots
  train::StepRunner runner(*model, *opt, so, [](int64_t) { return 0.01; });
  at::Tensor y = at::randint(0, a.classes, {a.batch}, at::TensorOptions(at::kLong).device(dev));
  for (int64_t i = 0; i < a.warmup; ++i) runner.run(x, y);
  device::synchronize(dev);  // (each step also syncs once, for the guard)
  device::reset_peak(dev);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < a.steps; ++i) runner.run(x, y);
  device::synchronize(dev);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  *peak_bytes = device::memory_stats(dev).peak;
  return static_cast<double>(a.steps * a.batch) / s;
}

struct DataBenchArgs {
  std::string config;
  std::vector<std::string> sets;
  int64_t batches = 20, warmup = 3, repeats = 3;
  bool json = false;
};

// Images per second of `batches` training batches (after `warmup`) through loader + upload to the
// training device (device::Uploader: pinned side-stream copy on CUDA, nothing on CPU) + augmentation
// there (mixup/cutmix included), as the trainer does.
double measure_data(const DataBenchArgs& a, data::Loader& loader, device::Uploader& upload, data::DeviceAugment& aug,
                    int64_t epoch, int64_t* images_out) {
  int64_t images = 0, counted = 0;
  auto t0 = std::chrono::steady_clock::now();
  loader.start_epoch(epoch);
  for (int64_t k = 0; counted < a.batches; ++k) {
    auto b = loader.next();
    if (!b) {  // a small dataset: the next epoch continues the stream
      loader.start_epoch(++epoch);
      continue;
    }
    at::Tensor x = aug.train(upload.upload(b->images));  // what a model would get, on its device
    const at::Tensor targets = aug.mix(x, upload.upload(b->labels));
    if (k + 1 == a.warmup) {
      device::synchronize(upload.device());
      t0 = std::chrono::steady_clock::now();
    } else if (k >= a.warmup) {
      images += x.size(0);
      ++counted;
    }
  }
  device::synchronize(upload.device());  // CUDA: the queued copies and augmentation finished
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  loader.stop();
  *images_out = images;
  return static_cast<double>(images) / s;
}

}  // namespace

Runner add_bench(CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  auto* bench = app.add_subcommand("bench", "benchmarks (ratios measured in the same run)");
  bench->require_subcommand(1);
  auto* step = bench->add_subcommand("step", "training-step throughput per precision on random data");
  // `keel bench infer` has its own options and runner (bench_infer.cpp).
  Runner infer_runner = add_bench_infer(bench);
  CLI::App* infer = bench->get_subcommand("infer");
  for (auto* sub : {step}) {
    sub->add_option("--model", a->model, "registered model name")->capture_default_str();
    sub->add_option("--size", a->size, "image height and width")->capture_default_str();
    sub->add_option("--batch", a->batch, "batch size")->capture_default_str();
    sub->add_option("--channels", a->channels, "input channels")->capture_default_str();
    sub->add_option("--classes", a->classes, "classes")->capture_default_str();
    sub->add_option("--steps", a->steps, "measured steps (forward passes) per repeat")->capture_default_str();
    sub->add_option("--warmup", a->warmup, "unmeasured steps before each repeat")->capture_default_str();
    sub->add_option("--repeats", a->repeats, "repeats per precision, alternated; the median is reported")
        ->capture_default_str();
    sub->add_option("--precisions", a->precisions, "comma-separated: fp32,bf16,fp16 (fp16: CUDA)")
        ->capture_default_str();
    sub->add_option("--threads", a->threads, "intra-op threads (0 = all cores)")->capture_default_str();
    sub->add_option("--device", a->device, "auto, cpu, cuda or cuda:N (as run.device)")->capture_default_str();
    sub->add_flag("!--no-channels-last", a->channels_last, "use NCHW instead of channels_last");
    sub->add_flag("--json", a->json, "print the result as one JSON object on the last line");
  }
  auto d = std::make_shared<DataBenchArgs>();
  auto* dcmd = bench->add_subcommand("data", "input-pipeline throughput of a config: loader + device augmentation, no model");
  dcmd->add_option("config", d->config, "TOML config (data.*, train.batch_size, run.threads)")->required();
  dcmd->add_option("--set", d->sets, "key=value override (repeatable)");
  dcmd->add_option("--batches", d->batches, "measured batches per repeat")->capture_default_str();
  dcmd->add_option("--warmup", d->warmup, "unmeasured batches before each repeat (fills the prefetch queue)")
      ->capture_default_str();
  dcmd->add_option("--repeats", d->repeats, "repeats (each a fresh epoch); the median is reported")
      ->capture_default_str();
  dcmd->add_flag("--json", d->json, "print the result as one JSON object on the last line");
  return [a, d, dcmd, infer, infer_runner] {
    if (infer->parsed()) return infer_runner();
    if (dcmd->parsed()) {
      const config::Config cfg = config::load(d->config, d->sets);
      const int threads = run::configure_threads(cfg.run.threads);
      auto ds = run::make_dataset(cfg, true);
      data::Loader loader(ds, run::loader_options(cfg, true));
      data::DeviceAugment aug(run::augment_options(cfg), static_cast<uint64_t>(cfg.run.seed) + 1);
      device::Uploader upload(device::resolve(cfg.run.device));
      std::vector<double> ips, loader_ips;
      int64_t images = 0;
      for (int64_t r = 0; r < d->repeats; ++r) {
        ips.push_back(measure_data(*d, loader, upload, aug, r, &images));
        loader_ips.push_back(loader.loader_images_per_second());
      }
      std::vector<double> sorted = ips;
      std::sort(sorted.begin(), sorted.end());
      const double median = sorted[sorted.size() / 2];
      const auto shape = ds->shape();
      std::sort(loader_ips.begin(), loader_ips.end());
      const double loader_median = loader_ips[loader_ips.size() / 2];
      fmt::print("keel bench data: {} at {} ({} samples, {}x{}x{}), batch {}, {} workers, {} threads, device {}: "
                 "median {:.1f} images/s (loader alone {:.1f}) over {} repeats of {} batches ({} unreadable samples "
                 "replaced)\n",
                 cfg.data.dataset, cfg.data.root, ds->size(), shape.channels, shape.height, shape.width,
                 cfg.train.batch_size, loader.options().workers(), threads, upload.device().str(), median,
                 loader_median, d->repeats, d->batches, loader.skipped_samples());
      if (d->json) {
        nlohmann::json out = {{"dataset", cfg.data.dataset}, {"root", cfg.data.root},
                              {"batch", cfg.train.batch_size}, {"workers", loader.options().workers()},
                              {"threads", threads}, {"device", upload.device().str()},
                              {"images_per_second", median}, {"loader_images_per_second", loader_median},
                              {"samples", ips}};
        std::cout << out.dump() << std::endl;
      }
      return 0;
    }
    const int threads = run::configure_threads(a->threads);
    memory::install_cpu_allocator();
    const auto precisions = split(a->precisions);
    std::map<std::string, std::vector<double>> ips;
    std::map<std::string, int64_t> peak;
    for (int64_t r = 0; r < a->repeats; ++r) {
      for (const auto& p : precisions) {
        int64_t pk = 0;
        ips[p].push_back(measure(*a, p, &pk));
        peak[p] = std::max(peak[p], pk);
      }
    }
    const std::string dev = device::resolve(a->device).str();
    nlohmann::json out = {{"mode", "train"}, {"model", a->model}, {"size", a->size},
                          {"batch", a->batch}, {"threads", threads}, {"device", dev},
                          {"channels_last", a->channels_last}};
    const std::string& base = precisions.front();
    auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    fmt::print("{} {} {}x{} batch {} ({}) on {}, {} threads, median of {} repeats of {} {}:\n",
               "training", a->model, a->size, a->size, a->batch,
               a->channels_last ? "channels_last" : "NCHW", dev, threads, a->repeats, a->steps, "steps");
    for (const auto& p : precisions) {
      const double m = median(ips[p]), ratio = m / median(ips[base]);
      fmt::print("  {:5s} {:8.1f} images/s  x{:.2f} vs {}  peak {:.1f} MiB\n", p, m, ratio, base,
                 peak[p] / 1048576.0);
      out["images_per_second"][p] = m;
      out["ratio_vs_" + base][p] = ratio;
      out["peak_bytes"][p] = peak[p];
      out["samples"][p] = ips[p];
    }
    if (a->json) std::cout << out.dump() << std::endl;
    return 0;
  };
}

}  // namespace keel::cli
