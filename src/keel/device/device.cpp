// Device resolution and the CPU side of device.h; the CUDA side is in cuda.cpp / no_cuda.cpp.
#include "keel/device/device.h"

#include <ATen/detail/CUDAHooksInterface.h>
#include <stdexcept>

#include "keel/memory/budget.h"
#include "keel/memory/cpu_allocator.h"

namespace keel::device {

// Declared here, defined in cuda.cpp (KEEL_CUDA) or no_cuda.cpp: the only entry points into CUDA code.
namespace detail {
void cuda_synchronize(int index);
MemoryStats cuda_memory_stats(int index);
void cuda_reset_peak(int index);
int64_t cuda_total_memory(int index);
void cuda_set_budget(int index, std::optional<int64_t> bytes);
void cuda_empty_cache();
}  // namespace detail

int cuda_device_count() {
  const auto& hooks = at::detail::getCUDAHooks();
  return hooks.hasCUDA() ? static_cast<int>(hooks.getNumGPUs()) : 0;
}

at::Device resolve(const std::string& spec) {
  const int n = cuda_device_count();
  if (spec == "auto") return n > 0 && cuda_built() ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
  if (spec == "cpu") return at::Device(at::kCPU);
  if (spec.rfind("cuda", 0) == 0) {
    int index = 0;
    if (spec.size() > 4) {
      const std::string num = spec.substr(spec.size() > 5 ? 5 : 4);
      if (spec[4] != ':' || num.empty() || num.find_first_not_of("0123456789") != std::string::npos) {
        throw std::invalid_argument("run.device = \"" + spec + "\": expected \"cuda\" or \"cuda:N\"");
      }
      index = std::stoi(num);
    }
    if (!cuda_built()) {
      throw std::invalid_argument("run.device = \"" + spec +
                                  "\": this keel was built without CUDA (needs a CUDA LibTorch, e.g. the PyPI "
                                  "wheel, and KEEL_CUDA=ON; see docs/libtorch.md)");
    }
    if (index >= n) {
      throw std::invalid_argument("run.device = \"" + spec + "\": " + std::to_string(n) +
                                  " CUDA device(s) usable here" + (n == 0 ? " (no GPU or no driver)" : ""));
    }
    return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  throw std::invalid_argument("run.device = \"" + spec + "\": expected auto, cpu, cuda or cuda:N");
}

at::Device of(const torch::nn::Module& m) {
  for (const auto& p : m.parameters()) return p.device();
  return at::Device(at::kCPU);
}

void synchronize(const at::Device& d) {
  if (d.is_cuda()) detail::cuda_synchronize(d.index() < 0 ? 0 : d.index());
}

MemoryStats memory_stats(const at::Device& d) {
  if (d.is_cuda()) return detail::cuda_memory_stats(d.index() < 0 ? 0 : d.index());
  const memory::MemoryStats c = memory::cpu_stats();
  MemoryStats s;
  s.current = c.current;
  s.peak = c.peak;
  s.reserved = c.current;
  s.budget = c.budget;
  return s;
}

int64_t total_memory(const at::Device& d) {
  return d.is_cuda() ? detail::cuda_total_memory(d.index() < 0 ? 0 : d.index()) : memory::total_cpu_memory_bytes();
}

void set_budget(const at::Device& d, std::optional<int64_t> bytes) {
  if (d.is_cuda()) {
    detail::cuda_set_budget(d.index() < 0 ? 0 : d.index(), bytes);
  } else {
    memory::set_cpu_budget(bytes);
  }
}

void empty_cache(const at::Device& d) {
  if (d.is_cuda()) detail::cuda_empty_cache();
}

void reset_peak(const at::Device& d) {
  if (d.is_cuda()) {
    detail::cuda_reset_peak(d.index() < 0 ? 0 : d.index());
  } else {
    memory::reset_peak();
  }
}

}  // namespace keel::device
