// `keel doctor`: measures and reports the facts that decide training speed on this machine.
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include <nlohmann/json.hpp>

#include "keel/cli/commands.h"
#include "keel/compat/torch_compat.h"
#include "keel/config/config.h"
#include "keel/monitor/device_peak.h"
#include "keel/run/trainer.h"

namespace keel::cli {
namespace {

// The BLAS shared object actually mapped into this process (resolves Debian's alternatives).
std::string loaded_blas() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    auto p = line.find('/');
    if (p == std::string::npos) continue;
    std::string path = line.substr(p);
    std::string file = std::filesystem::path(path).filename().string();
    if (file.rfind("libblas", 0) == 0 || file.rfind("libopenblas", 0) == 0 || file.rfind("libmkl", 0) == 0) {
      std::error_code ec;
      auto real = std::filesystem::canonical(path, ec);
      return ec ? path : real.string();
    }
  }
  return "";
}

}  // namespace

nlohmann::json doctor_report(const config::Config& cfg) {
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int default_threads = at::get_num_threads();
  const int threads = run::configure_threads(cfg.run.threads);
  nlohmann::json r;
  std::vector<std::string> advice, lines;
  auto line = [&](const std::string& label, const std::string& text) {
    lines.push_back(fmt::format("{:<15} {}", label, text));
  };

  line("LibTorch", compat::torch_version());
  line("threads", fmt::format("{} intra-op of {} cores (LibTorch default here: {}){}", threads, cores, default_threads,
                              default_threads < cores ? "; keel sets all cores (run.threads = 0)" : ""));
  r["torch_version"] = compat::torch_version();
  r["cores"] = cores;
  r["threads_default"] = default_threads;
  r["threads"] = threads;

  const std::string blas = loaded_blas();
  const double fp32 = monitor::measure_gemm_gflops(1024, at::kFloat);
  // An optimised BLAS reaches tens of GFLOP/s per AVX2 core; the reference BLAS ~2-4.
  const bool optimized = fp32 > 15.0 * threads;
  line("fp32 GEMM", fmt::format("{:.1f} GFLOP/s (1024^3 matmul, median of 7) via {}: {}", fp32,
                                blas.empty() ? "LibTorch's built-in BLAS" : blas,
                                optimized ? "optimised BLAS" : "SLOW: looks like the reference BLAS"));
  if (!optimized) {
    advice.push_back(
        "fp32 matmul runs through the reference BLAS: `apt-get install libopenblas0-openmp` (scripts/setup.sh "
        "does) or `update-alternatives --config libblas.so.3-x86_64-linux-gnu` to pick OpenBLAS");
  }
  r["blas"] = blas;
  r["fp32_gemm_gflops"] = fp32;
  r["blas_optimized"] = optimized;

  const bool onednn = at::hasMKLDNN();
  line("oneDNN", onednn ? "available (convolutions, channels_last)" : "not available");
  r["onednn"] = onednn;

  const bool avx512_bf16 = monitor::cpu_has_flag("avx512_bf16"), amx = monitor::cpu_has_flag("amx_bf16");
  double bf16 = 0;
  try {
    bf16 = monitor::measure_gemm_gflops(1024, at::kBFloat16);
  } catch (const std::exception&) {
  }
  line("bf16", fmt::format("CPU {}{}; bf16 GEMM {:.1f} GFLOP/s ({:.2f}x fp32)",
                           avx512_bf16 ? "has avx512_bf16" : "has no avx512_bf16", amx ? " and AMX" : "", bf16,
                           fp32 > 0 ? bf16 / fp32 : 0.0));
  r["cpu_avx512_bf16"] = avx512_bf16;
  r["cpu_amx_bf16"] = amx;
  r["bf16_gemm_gflops"] = bf16;

  const bool cuda = torch::cuda::is_available();
  line("CUDA", cuda ? fmt::format("{} device(s)", torch::cuda::device_count())
                    : "not available (this LibTorch build or machine has no GPU)");
  r["cuda"] = cuda;
  r["cuda_devices"] = cuda ? static_cast<int64_t>(torch::cuda::device_count()) : 0;

  std::string data_status;
  bool data_ok = false;
  try {
    auto ds = run::make_dataset(cfg, true);
    auto ts = run::make_dataset(cfg, false);
    data_ok = true;
    data_status = fmt::format("{} at {}: {} train / {} test images", cfg.data.dataset, cfg.data.root, ds->size(),
                              ts->size());
  } catch (const std::exception& e) {
    data_status = fmt::format("MISSING or unreadable: {}", e.what());
    advice.push_back("install the default data: `apt-get install dataset-fashion-mnist` (scripts/setup.sh does)");
  }
  line("default data", data_status);
  r["data_ok"] = data_ok;
  r["data"] = data_status;
  r["advice"] = advice;
  r["lines"] = lines;
  return r;
}

Runner add_doctor(CLI::App& app) {
  auto* sub = app.add_subcommand("doctor", "report threads, BLAS speed, oneDNN, bf16, CUDA and data on this machine");
  auto json = std::make_shared<bool>(false);
  auto config_path = std::make_shared<std::string>();
  sub->add_flag("--json", *json, "also print the report as one JSON object on the last line");
  sub->add_option("--config", *config_path, "config whose run.threads and data.root to check (default: defaults)");
  return [json, config_path] {
    nlohmann::json r = doctor_report(config::load(*config_path));
    for (const auto& l : r.at("lines")) fmt::print("{}\n", l.get<std::string>());
    for (const auto& a : r.at("advice")) fmt::print("advice: {}\n", a.get<std::string>());
    r.erase("lines");
    std::fflush(stdout);
    if (*json) std::cout << r.dump() << std::endl;
    return 0;
  };
}

}  // namespace keel::cli
