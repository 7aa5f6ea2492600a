// Device: where a run computes (run.device), and the few operations that differ between CPU and CUDA.
// Everything CUDA-specific sits behind this header; cuda.cpp implements it when keel is built with
// KEEL_CUDA (a CUDA LibTorch, e.g. the PyPI wheel), no_cuda.cpp otherwise.
#pragma once
#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <optional>
#include <string>

namespace keel::device {

// True when keel's CUDA code paths were compiled in (CMake KEEL_CUDA).
bool cuda_built();

// CUDA devices this process can use (0 on a CPU-only LibTorch or a machine without a GPU).
int cuda_device_count();

// Resolves run.device: "auto" (cuda:0 when a GPU is usable, else cpu), "cpu", "cuda" (= cuda:0),
// "cuda:N". Throws std::invalid_argument naming the value and why it cannot be used.
at::Device resolve(const std::string& spec);

// The device a module's parameters live on (CPU for a module without parameters).
at::Device of(const torch::nn::Module& m);

// Waits for all work queued on the device (no-op on CPU).
void synchronize(const at::Device& d);

// Memory of a device in bytes. CPU: keel's counting allocator (memory/cpu_allocator.h);
// CUDA: the caching allocator (allocated = tensors, reserved = held from the driver).
struct MemoryStats {
  int64_t current = 0;   // bytes in live tensors
  int64_t peak = 0;      // highest `current` since the last reset_peak()
  int64_t reserved = 0;  // bytes held by the allocator (CUDA caching allocator; = current on CPU)
  int64_t budget = -1;   // memory.budget (set_budget); CUDA without one: total device memory; -1 when unknown
  int64_t alloc_retries = 0;  // CUDA: allocations that freed cached blocks and retried (0 on CPU)
};
MemoryStats memory_stats(const at::Device& d);
void reset_peak(const at::Device& d);

// All the memory the device has: CPU = memory::total_cpu_memory_bytes(); CUDA = the GPU's total.
int64_t total_memory(const at::Device& d);

// Caps what the run may allocate on `d` (nullopt: no cap). CPU: keel's counting allocator throws
// c10::OutOfMemoryError past it (memory/cpu_allocator.h); CUDA: the caching allocator's memory
// fraction (bytes / total), past which it throws the same error.
void set_budget(const at::Device& d, std::optional<int64_t> bytes);

// After an out-of-memory error: hands the caching allocator's free blocks back (CUDA); no-op on CPU.
void empty_cache(const at::Device& d);

// Moves uint8 batches from the loader to the training device. On CUDA the host batch is staged in
// pinned memory and copied on a side stream, so the copy of batch k+1 overlaps the compute of
// batch k; the compute stream waits for the copy before using it. On CPU it returns the batch
// itself: nothing is pinned or copied (pin_memory() throws on a CPU-only LibTorch).
class Uploader {
 public:
  explicit Uploader(at::Device d);
  ~Uploader();
  Uploader(const Uploader&) = delete;
  Uploader& operator=(const Uploader&) = delete;
  // t: a host tensor -> the same values on the device; the host tensor may be overwritten as soon as this
  // returns. CUDA: a pageable tensor is staged in pinned memory and copied asynchronously; a pinned
  // Loader batch is copied from directly, with the copy's completion recorded in the batch buffer's
  // bookkeeping (host_buffer.h), so the loader refills that buffer only after the copy; any other pinned
  // tensor is copied from directly and waited for before returning.
  at::Tensor upload(const at::Tensor& t);
  const at::Device& device() const { return device_; }

 private:
  struct Impl;
  at::Device device_;
  Impl* impl_ = nullptr;  // CUDA state (side stream, pinned staging); null on CPU
};

}  // namespace keel::device
