// The CUDA side of device.h (compiled only with KEEL_CUDA, against a CUDA LibTorch): device sync,
// caching-allocator statistics, and batch upload through pinned memory on a side stream.
// Not yet run on a GPU in CI (no GPU there); tests/device checks what a CPU machine can.
#ifdef KEEL_CUDA
#include "keel/device/device.h"

#include <c10/core/Event.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <map>
#include <mutex>

namespace keel::device {

bool cuda_built() { return true; }

namespace detail {

void cuda_synchronize(int index) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(index));
  c10::cuda::device_synchronize();
}

namespace {
// memory.budget per device index, as set by cuda_set_budget (absent: none).
std::mutex budget_mutex;
std::map<int, int64_t> budgets;
}  // namespace

int64_t cuda_total_memory(int index) {
  size_t free_bytes = 0, total_bytes = 0;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(index));
  C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  return static_cast<int64_t>(total_bytes);
}

void cuda_set_budget(int index, std::optional<int64_t> bytes) {
  const int64_t total = cuda_total_memory(index);
  const double fraction = bytes ? std::min(1.0, static_cast<double>(*bytes) / static_cast<double>(total)) : 1.0;
  c10::cuda::CUDACachingAllocator::setMemoryFraction(fraction, static_cast<c10::DeviceIndex>(index));
  std::lock_guard<std::mutex> lock(budget_mutex);
  if (bytes) budgets[index] = *bytes; else budgets.erase(index);
}

void cuda_empty_cache() { c10::cuda::CUDACachingAllocator::emptyCache(); }

MemoryStats cuda_memory_stats(int index) {
  const auto dev = static_cast<c10::DeviceIndex>(index);
  const auto st = c10::cuda::CUDACachingAllocator::getDeviceStats(dev);
  constexpr size_t kAggregate = 0;  // StatType::AGGREGATE: small and large pools together
  MemoryStats s;
  s.current = st.allocated_bytes[kAggregate].current;
  s.peak = st.allocated_bytes[kAggregate].peak;
  s.reserved = st.reserved_bytes[kAggregate].current;
  s.alloc_retries = st.num_alloc_retries;
  s.budget = cuda_total_memory(index);
  std::lock_guard<std::mutex> lock(budget_mutex);
  if (auto it = budgets.find(index); it != budgets.end()) s.budget = it->second;
  return s;
}

void cuda_reset_peak(int index) {
  c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(index));
}

}  // namespace detail

struct Uploader::Impl {
  explicit Impl(at::Device d) : copy_stream(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, d.index())) {}
  c10::cuda::CUDAStream copy_stream;
};

Uploader::Uploader(at::Device d) : device_(d) {
  if (device_.is_cuda()) {
    if (device_.index() < 0) device_ = at::Device(at::kCUDA, 0);
    impl_ = new Impl(device_);
  }
}

Uploader::~Uploader() { delete impl_; }

at::Tensor Uploader::upload(const at::Tensor& t) {
  if (!impl_) return t;  // CPU: the batch is already where it computes
  // Pinned staging (LibTorch's caching host allocator records the copy's stream, so the pinned block
  // is not reused before the copy has finished), then an asynchronous copy on the side stream.
  at::Tensor pinned = t.is_pinned() ? t : t.pin_memory();
  const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(device_.index());
  at::Tensor out;
  {
    c10::cuda::CUDAStreamGuard on_copy_stream(impl_->copy_stream);
    out = pinned.to(device_, /*non_blocking=*/true);
  }
  // The compute stream waits for the copy (on the GPU, not the host) ...
  c10::Event copied(c10::DeviceType::CUDA);
  copied.record(impl_->copy_stream.unwrap());
  copied.block(compute.unwrap());
  // ... and the caching allocator must not hand `out`'s block to the copy stream again until the
  // compute stream is done with it.
  c10::cuda::CUDACachingAllocator::recordStream(out.storage().data_ptr(), compute);
  return out;
}

}  // namespace keel::device
#endif
