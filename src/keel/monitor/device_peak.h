// Measured compute peak of this machine (for utilisation) and CPU feature facts.
#pragma once
#include <ATen/ATen.h>
#include <string>

namespace keel::monitor {

// Median GFLOP/s of an n x n x n matmul in `dtype` on `device`, after one warm-up.
double measure_gemm_gflops(int64_t n, at::ScalarType dtype, int reps = 7, at::Device device = at::kCPU);

// Whether /proc/cpuinfo lists `flag` (e.g. "avx512_bf16", "amx_bf16").
bool cpu_has_flag(const std::string& flag);

// The CPU can run bf16 matmuls natively (avx512_bf16 or AMX).
bool cpu_supports_bf16();

}  // namespace keel::monitor
