// The CUDA side of device.h (compiled only with KEEL_CUDA, against a CUDA LibTorch): device sync,
// caching-allocator statistics, and batch upload through pinned memory on a side stream.
// Not yet run on a GPU in CI (no GPU there); tests/device checks what a CPU machine can.
#ifdef KEEL_CUDA
#include "keel/device/device.h"
#include "keel/device/host_buffer.h"

#include <c10/core/Event.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
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

namespace {
// One upload's completion: an event recorded on the copy stream right after the copy.
class CopyDone : public UploadCompletion {
 public:
  CopyDone() : event_(c10::DeviceType::CUDA) {}
  c10::Event& event() { return event_; }
  bool done() override { return event_.query(); }
  void wait() noexcept override {
    try {
      event_.synchronize();
    } catch (const std::exception& e) {
      // The device is in error: no copy will run any more; the next CUDA call of the run reports it.
      std::fprintf(stderr, "keel: device: waiting for a host-to-device copy failed: %s\n", e.what());
    }
  }

 private:
  c10::Event event_;
};
}  // namespace

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
  // A pageable tensor is staged in pinned memory from LibTorch's caching host allocator, which records
  // the copy's stream and reuses the block only after the copy; a pinned one is copied from directly.
  const bool caller_pinned = t.is_pinned();
  at::Tensor pinned = caller_pinned ? t : t.pin_memory();
  const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(device_.index());
  at::Tensor out;
  {
    c10::cuda::CUDAStreamGuard on_copy_stream(impl_->copy_stream);
    out = pinned.to(device_, /*non_blocking=*/true);
  }
  // The compute stream waits for the copy (on the GPU, not the host) ...
  auto copied = std::make_shared<CopyDone>();
  copied->event().record(impl_->copy_stream.unwrap());
  copied->event().block(compute.unwrap());
  // ... and the caching allocator must not hand `out`'s block to the copy stream again until the
  // compute stream is done with it.
  c10::cuda::CUDACachingAllocator::recordStream(out.storage().data_ptr(), compute);
  if (caller_pinned) {
    // The GPU reads the caller's memory after this returns. A loader batch buffer carries its bookkeeping:
    // the loader's pool refills it only after this copy (device/host_buffer.h). Any other pinned tensor has
    // nothing to stop the caller overwriting it: wait for the copy here.
    if (PendingUploads* p = pending_uploads(t)) {
      p->add(copied);
    } else {
      copied->wait();
    }
  }
  return out;
}

}  // namespace keel::device
#endif
