// GEMM peak measurement and CPU flags, shared by `keel doctor` and the trainer's utilisation.
#include "keel/monitor/device_peak.h"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <vector>

#include "keel/device/device.h"

namespace keel::monitor {

double measure_gemm_gflops(int64_t n, at::ScalarType dtype, int reps, at::Device device) {
  at::Tensor a = at::randn({n, n}).to(device, dtype), b = at::randn({n, n}).to(device, dtype);
  at::Tensor c = at::mm(a, b);  // warm-up (thread pool, packing buffers, cuBLAS handle)
  device::synchronize(device);
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    c = at::mm(a, b);
    device::synchronize(device);  // CUDA kernels are asynchronous: time them to completion
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return 2.0 * n * n * n / t[t.size() / 2] / 1e9;
}

bool cpu_has_flag(const std::string& flag) {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) == 0) return (" " + line + " ").find(" " + flag + " ") != std::string::npos;
  }
  return false;
}

bool cpu_supports_bf16() { return cpu_has_flag("avx512_bf16") || cpu_has_flag("amx_bf16"); }

}  // namespace keel::monitor
