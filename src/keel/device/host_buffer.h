// Reusable host buffers that an upload may still be reading: the bookkeeping that keeps a loader batch
// buffer from being handed out again while a GPU copy still reads it. Header-only, so that the data layer
// (the loader's buffer pool) can use it without linking device code; device::Uploader (cuda.cpp) records
// one completion per upload from a tracked tensor.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/Allocator.h>

#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace keel::device {

// The end of one asynchronous read of a host buffer (on CUDA: an event recorded on the copy stream
// right after the copy). Implementations are thread-safe.
class UploadCompletion {
 public:
  virtual ~UploadCompletion() = default;
  virtual bool done() = 0;           // true once the read has finished; never blocks
  virtual void wait() noexcept = 0;  // blocks the calling thread until it has (an error is logged, not thrown)
};

// The reads still pending on one reusable host buffer. Thread-safe.
class PendingUploads {
 public:
  void add(std::shared_ptr<UploadCompletion> c) {
    std::lock_guard<std::mutex> lk(mu_);
    pending_.push_back(std::move(c));
  }
  // True when every read has finished; forgets the finished ones.
  bool done() {
    std::lock_guard<std::mutex> lk(mu_);
    std::vector<std::shared_ptr<UploadCompletion>> left;
    for (auto& c : pending_) {
      if (!c->done()) left.push_back(std::move(c));
    }
    pending_.swap(left);
    return pending_.empty();
  }
  // Blocks until every read has finished.
  void wait() noexcept {
    std::vector<std::shared_ptr<UploadCompletion>> all;
    {
      std::lock_guard<std::mutex> lk(mu_);
      all.swap(pending_);
    }
    for (auto& c : all) c->wait();
  }

 private:
  std::mutex mu_;
  std::vector<std::shared_ptr<UploadCompletion>> pending_;
};

// The storage context of a tracked tensor: whatever keeps its memory alive (a subclass's members) and
// the buffer's pending uploads.
struct TrackedHostMemory {
  virtual ~TrackedHostMemory() = default;
  std::shared_ptr<PendingUploads> uploads;
};
inline void delete_tracked_host_memory(void* ctx) { delete static_cast<TrackedHostMemory*>(ctx); }

// A CPU tensor over `data` (not owned) whose storage owns `owner`, deleted with the last view of it.
inline at::Tensor tracked_host_tensor(void* data, at::IntArrayRef sizes, at::TensorOptions options,
                                      std::unique_ptr<TrackedHostMemory> owner) {
  // The maker owns the context from here on (and deletes it should make_tensor throw).
  return at::for_blob(data, sizes).options(options).context(owner.release(), &delete_tracked_host_memory).make_tensor();
}

// The pending uploads of a tracked tensor's buffer (any view of it), or null for any other tensor.
inline PendingUploads* pending_uploads(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return nullptr;
  auto* m = t.storage().data_ptr().cast_context<TrackedHostMemory>(&delete_tracked_host_memory);
  return m ? m->uploads.get() : nullptr;
}

}  // namespace keel::device
