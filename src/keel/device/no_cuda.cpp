// The CUDA entry points of device.h for a keel built without KEEL_CUDA: resolve() never returns a
// CUDA device then, so reaching these is a logic error, reported as such.
#include "keel/device/device.h"

#ifndef KEEL_CUDA
#include <stdexcept>

namespace keel::device {
namespace {
[[noreturn]] void no_cuda() { throw std::logic_error("keel was built without CUDA (KEEL_CUDA=OFF)"); }
}  // namespace

bool cuda_built() { return false; }

namespace detail {
void cuda_synchronize(int) { no_cuda(); }
MemoryStats cuda_memory_stats(int) { no_cuda(); }
void cuda_reset_peak(int) { no_cuda(); }
int64_t cuda_total_memory(int) { no_cuda(); }
void cuda_set_budget(int, std::optional<int64_t>) { no_cuda(); }
void cuda_empty_cache() { no_cuda(); }
}  // namespace detail

struct Uploader::Impl {};
Uploader::Uploader(at::Device d) : device_(d) {
  if (d.is_cuda()) no_cuda();
}
Uploader::~Uploader() = default;
at::Tensor Uploader::upload(const at::Tensor& t) { return t; }

}  // namespace keel::device
#endif
