// Loader: ordered multi-threaded batch assembly into pooled buffers (see loader.h).
#include "keel/data/loader.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <exception>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "keel/device/host_buffer.h"

namespace keel::data {
namespace {

// One reusable batch buffer with room for batch_size samples.
struct Slot {
  at::Tensor images;  // uint8 (batch_size, C, H, W)
  at::Tensor labels;  // int64 (batch_size)
  at::Tensor ids;     // int64 (batch_size): dataset index of each sample
  std::shared_ptr<device::PendingUploads> uploads;  // uploads still reading images / labels
};

// Free buffers. Shared with the deleters of delivered batches, so a batch may outlive its Loader.
class Pool {
 public:
  Pool(int64_t batch_size, ImageShape shape, size_t keep, bool pinned)
      : batch_size_(batch_size), shape_(shape), keep_(keep), pinned_(pinned) {
    free_.reserve(keep_);  // so give() never allocates (it runs inside tensor deleters)
  }

  // Waits for the uploads still reading the free buffers: their memory goes back to the allocator now.
  ~Pool() {
    for (auto& s : free_) s.uploads->wait();
  }

  // A free buffer whose uploads have all finished (the newest such), else the oldest free one once its
  // uploads have finished (waited for on this thread), else a new one when the consumer still holds all
  // the old ones. A buffer is never written while a device copy from it may still be running: only the
  // training step's host sync would otherwise guarantee that, and evaluation has none.
  Slot take() {
    Slot s;
    bool must_wait = false;
    {
      std::lock_guard<std::mutex> lk(mu_);
      for (size_t i = free_.size(); i-- > 0;) {
        if (free_[i].uploads->done()) {
          s = std::move(free_[i]);
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          return s;
        }
      }
      if (!free_.empty()) {
        s = std::move(free_.front());  // given back first: its copies were queued first
        free_.erase(free_.begin());
        must_wait = true;
      }
    }
    if (must_wait) {
      s.uploads->wait();
      return s;
    }
    const auto opt = at::TensorOptions().pinned_memory(pinned_);
    return Slot{at::empty({batch_size_, shape_.channels, shape_.height, shape_.width}, opt.dtype(at::kByte)),
                at::empty({batch_size_}, opt.dtype(at::kLong)), at::empty({batch_size_}, at::kLong),
                std::make_shared<device::PendingUploads>()};
  }

  // Returns a buffer; beyond `keep` free ones it is freed, so memory stays bounded — after its uploads
  // have finished, since a pinned block goes back to LibTorch's host allocator, which may hand it out again.
  void give(Slot s) noexcept {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (free_.size() < keep_) {
        free_.push_back(std::move(s));
        return;
      }
    }
    s.uploads->wait();
  }

 private:
  const int64_t batch_size_;
  const ImageShape shape_;
  const size_t keep_;
  const bool pinned_;  // images and labels page-locked (LoaderOptions::pin_memory)
  std::mutex mu_;
  std::vector<Slot> free_;
};

// Ties a delivered batch's buffer to its tensors: the last of them to go returns it to the pool.
struct Lease {
  Lease(std::shared_ptr<Pool> p, Slot s) : pool(std::move(p)), slot(std::move(s)) {}
  Lease(const Lease&) = delete;  // a copy would return the same buffer twice
  Lease& operator=(const Lease&) = delete;
  ~Lease() { pool->give(std::move(slot)); }
  std::shared_ptr<Pool> pool;
  Slot slot;
};

// A delivered tensor's storage context: keeps the lease (so the buffer) alive and exposes the buffer's
// pending uploads to device::Uploader (device/host_buffer.h).
struct LeaseView : device::TrackedHostMemory {
  explicit LeaseView(std::shared_ptr<Lease> l) : lease(std::move(l)) { uploads = lease->slot.uploads; }
  std::shared_ptr<Lease> lease;
};

// A tensor viewing `data` of the lease's buffer.
at::Tensor lease_view(const std::shared_ptr<Lease>& lease, void* data, at::IntArrayRef sizes, at::ScalarType dtype) {
  return device::tracked_host_tensor(data, sizes, at::TensorOptions().dtype(dtype), std::make_unique<LeaseView>(lease));
}

// A finished batch waiting for its turn (or the error that stopped it).
struct Ready {
  Slot slot;
  int64_t n = 0;
  std::exception_ptr error;
};

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("Loader: " + what);
}

}  // namespace

struct Loader::Impl {
  enum class State { kIdle, kRunning, kDone };

  Impl(const Dataset& ds, const LoaderOptions& o)
      : dataset(ds),
        opts(o),
        shape(ds.shape()),
        sample_bytes(static_cast<size_t>(shape.numel())),
        cap(o.workers() > 0 ? o.prefetch() + o.workers() : 1),
        // +1: the batch the consumer holds while it asks for the next one.
        pool(std::make_shared<Pool>(o.batch_size(), shape, static_cast<size_t>(cap) + 1, o.pin_memory())) {}

  const Dataset& dataset;
  const LoaderOptions opts;
  const ImageShape shape;
  const size_t sample_bytes;
  const int64_t cap;  // batches in flight (claimed, not yet delivered)
  std::shared_ptr<Pool> pool;

  std::vector<int64_t> order;  // this rank's indices for the epoch
  int64_t batches = 0;

  std::mutex mu;                     // guards everything below except `cancel`
  std::condition_variable ready_cv;  // a batch was finished
  std::condition_variable space_cv;  // in_flight dropped, or cancel
  std::map<int64_t, Ready> ready;    // finished out of order, delivered in order
  int64_t next_claim = 0, next_deliver = 0, in_flight = 0;
  int64_t claim_limit = 0;  // no batch at or past it is assembled (lowered by an error)
  std::atomic<bool> cancel{false};
  std::vector<std::thread> threads;

  int64_t epoch = 0;
  std::atomic<int64_t> skipped{0};  // samples replaced this epoch (OnError::kSkip)
  std::atomic<int64_t> loaded{0};   // samples assembled this epoch
  std::atomic<int64_t> busy_ns{0};  // time spent assembling them, summed over threads

  // fill() timed into the epoch's loader-only throughput.
  int64_t timed_fill(int64_t k, Slot& slot) {
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t n = fill(k, slot);
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0);
    if (n > 0) {
      busy_ns.fetch_add(ns.count(), std::memory_order_relaxed);
      loaded.fetch_add(n, std::memory_order_relaxed);
    }
    return n;
  }
  std::mutex log_mu;                // guards `reported`
  std::set<size_t> reported;        // samples already logged as unreadable (once per run)

  // Samples found unreadable under OnError::kSkip: one flag per dataset index, allocated at the first
  // failure; a sample known bad is not read again by this Loader (in this epoch or a later one).
  std::mutex bad_mu;  // guards bad_store's allocation, `skip` and `skipped_positions`
  std::unique_ptr<std::atomic<bool>[]> bad_store;
  std::atomic<std::atomic<bool>*> bad{nullptr};
  // Per epoch, over positions of `order`: skip[p] == p, or a later position (cyclic) to look at instead,
  // because p's sample is known bad (a union-find forest with path compression, so a search for the next
  // readable position steps over a run of known-bad ones in near-constant time). Built at the first failure.
  std::vector<int64_t> skip;
  int64_t skipped_positions = 0;  // positions linked past in `skip`

  bool known_bad(size_t index) const {
    const std::atomic<bool>* b = bad.load(std::memory_order_acquire);
    return b && b[index].load(std::memory_order_relaxed);
  }
  void mark_bad(size_t index) {
    std::lock_guard<std::mutex> lk(bad_mu);
    if (!bad_store) {
      bad_store.reset(new std::atomic<bool>[dataset.size()]());
      bad.store(bad_store.get(), std::memory_order_release);
    }
    bad_store[index].store(true, std::memory_order_relaxed);
  }
  // The first position at or after p (cyclic) whose sample is not known bad; -1 when none is left.
  int64_t candidate(int64_t p) {
    const auto n = static_cast<int64_t>(order.size());
    std::lock_guard<std::mutex> lk(bad_mu);
    if (skip.empty()) {
      skip.resize(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) skip[static_cast<size_t>(i)] = i;
    }
    for (;;) {
      if (skipped_positions >= n) return -1;  // every link set: following them would cycle
      int64_t r = p;
      while (skip[static_cast<size_t>(r)] != r) r = skip[static_cast<size_t>(r)];
      while (p != r) {  // path compression
        const int64_t next = skip[static_cast<size_t>(p)];
        skip[static_cast<size_t>(p)] = r;
        p = next;
      }
      if (!known_bad(static_cast<size_t>(order[static_cast<size_t>(r)]))) return r;
      skip[static_cast<size_t>(r)] = (r + 1) % n;
      ++skipped_positions;
      p = r;
    }
  }

  std::exception_ptr error;  // sticky until start_epoch()
  State state = State::kIdle;
  double last_wait = 0.0;

  // Names a sample even when the dataset's describe() itself fails.
  std::string describe(size_t index) const {
    try {
      return dataset.describe(index);
    } catch (...) {
      return "sample " + std::to_string(index);
    }
  }

  // Reads one sample and its label into place; throws with the dataset's reason.
  void load(size_t index, uint8_t* image, int64_t* label_out) const {
    dataset.read_sample(index, epoch, image);
    const int64_t label = dataset.label(index);
    const int64_t classes = dataset.num_classes();
    if (label < 0 || label >= classes) {
      throw std::runtime_error("label " + std::to_string(label) + " out of range, expected [0, " +
                               std::to_string(classes) + ")");
    }
    *label_out = label;
  }

  // Logs an unreadable sample the first time it is seen in this Loader's life.
  void report(size_t index, const std::string& reason) {
    std::lock_guard<std::mutex> lk(log_mu);
    if (!reported.insert(index).second) return;
    std::fprintf(stderr, "keel: data: skipping unreadable %s: %s (data.on_error = skip: replaced by the next readable "
                 "sample of the epoch order)\n", describe(index).c_str(), reason.c_str());
  }

  // Writes batch k into `slot`; returns its sample count, or -1 when cancelled part-way.
  int64_t fill(int64_t k, Slot& slot) {
    const int64_t begin = k * opts.batch_size();
    const int64_t end = std::min<int64_t>(begin + opts.batch_size(), order.size());
    uint8_t* images = slot.images.data_ptr<uint8_t>();
    int64_t* labels = slot.labels.data_ptr<int64_t>();
    int64_t* ids = slot.ids.data_ptr<int64_t>();
    for (int64_t j = begin; j < end; ++j) {
      if (cancel.load(std::memory_order_relaxed)) return -1;
      const size_t index = static_cast<size_t>(order[j]);
      uint8_t* dst = images + (j - begin) * sample_bytes;
      std::string reason;  // empty: known unreadable, not read again
      if (!known_bad(index)) {
        try {
          load(index, dst, &labels[j - begin]);
          ids[j - begin] = static_cast<int64_t>(index);
          continue;
        } catch (const std::exception& e) {
          reason = e.what();
        } catch (...) {
          reason = "unknown exception";
        }
        if (reason.empty()) reason = "unknown error";
      }
      if (opts.on_error() == OnError::kFail) throw std::runtime_error(describe(index) + ": " + reason);
      if (!reason.empty()) {
        report(index, reason);
        mark_bad(index);
      } else {
        reason = "unreadable, reported when first read";
      }
      skipped.fetch_add(1, std::memory_order_relaxed);
      // The replacement rule: the next readable sample of this rank's epoch order, wrapping around.
      // Known-bad positions are stepped over without reading (candidate()), so each unreadable sample is
      // read once, not once per sample whose replacement search passes it.
      for (;;) {
        if (cancel.load(std::memory_order_relaxed)) return -1;
        const int64_t q = candidate((j + 1) % static_cast<int64_t>(order.size()));
        if (q < 0) {
          throw std::runtime_error("no readable sample left to replace " + describe(index) + " (" + reason +
                                   "): every sample of this epoch failed to load");
        }
        const size_t alt = static_cast<size_t>(order[static_cast<size_t>(q)]);
        std::string why;
        try {
          load(alt, dst, &labels[j - begin]);
          ids[j - begin] = static_cast<int64_t>(alt);
          break;
        } catch (const std::exception& e) {
          why = e.what();
        } catch (...) {
          why = "unknown exception";
        }
        report(alt, why);
        mark_bad(alt);
      }
    }
    return end - begin;
  }

  // Worker thread: claims batch numbers in order, assembles them, hands them over.
  void work() {
    for (;;) {
      int64_t k;
      {
        std::unique_lock<std::mutex> lk(mu);
        space_cv.wait(lk, [&] { return cancel || next_claim >= claim_limit || in_flight < cap; });
        if (cancel || next_claim >= claim_limit) return;
        k = next_claim++;
        ++in_flight;
      }
      Ready r;
      try {
        r.slot = pool->take();
        r.n = timed_fill(k, r.slot);
      } catch (...) {
        r.error = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lk(mu);
        if (cancel || r.n < 0) {
          if (r.slot.images.defined()) pool->give(std::move(r.slot));
          return;
        }
        // Batches after a failed one would never be delivered: stop assembling them.
        if (r.error) claim_limit = std::min(claim_limit, k + 1);
        ready.emplace(k, std::move(r));
      }
      ready_cv.notify_one();
    }
  }

  // Cancels and joins the workers, and returns every undelivered buffer to the pool.
  void halt() noexcept {
    {
      std::lock_guard<std::mutex> lk(mu);
      cancel = true;
    }
    space_cv.notify_all();
    for (auto& t : threads) t.join();
    threads.clear();
    std::lock_guard<std::mutex> lk(mu);
    for (auto& entry : ready) {
      if (entry.second.slot.images.defined()) pool->give(std::move(entry.second.slot));
    }
    ready.clear();
    in_flight = 0;
    cancel = false;
  }
};

Loader::Loader(std::shared_ptr<const Dataset> dataset, LoaderOptions options)
    : dataset_(std::move(dataset)), options_(std::move(options)) {
  require(dataset_ != nullptr, "dataset is null");
  require(options_.batch_size() >= 1,
          "batch_size must be >= 1, got " + std::to_string(options_.batch_size()));
  require(options_.workers() >= 0,
          "workers must be >= 0 (0 = load on the calling thread), got " +
              std::to_string(options_.workers()));
  require(options_.prefetch() >= 1,
          "prefetch must be >= 1, got " + std::to_string(options_.prefetch()));
  require(options_.world_size() >= 1,
          "world_size must be >= 1, got " + std::to_string(options_.world_size()));
  require(options_.rank() >= 0 && options_.rank() < options_.world_size(),
          "rank " + std::to_string(options_.rank()) + " out of range, expected 0 <= rank < " +
              std::to_string(options_.world_size()) + " (world_size)");
  const ImageShape s = dataset_->shape();
  require(s.channels > 0 && s.height > 0 && s.width > 0,
          "dataset shape must be positive, got " + std::to_string(s.channels) + "x" +
              std::to_string(s.height) + "x" + std::to_string(s.width));
  impl_ = std::make_unique<Impl>(*dataset_, options_);
}

Loader::~Loader() { impl_->halt(); }

void Loader::start_epoch(int64_t epoch) {
  Impl& m = *impl_;
  m.halt();
  m.error = nullptr;
  m.epoch = epoch;
  m.skipped = 0;
  m.loaded = 0;
  m.busy_ns = 0;
  m.order = epoch_indices(dataset_->size(), options_.sampler(), epoch, options_.rank(),
                          options_.world_size());
  m.batches = batches_per_epoch();
  m.next_claim = m.next_deliver = m.in_flight = 0;
  m.skip.clear();
  m.skipped_positions = 0;
  m.claim_limit = m.batches;
  m.state = Impl::State::kRunning;
  const int64_t threads = std::min(options_.workers(), m.batches);
  try {
    for (int64_t i = 0; i < threads; ++i) m.threads.emplace_back([&m] { m.work(); });
  } catch (...) {
    m.halt();
    m.state = Impl::State::kDone;
    throw;
  }
}

std::optional<Batch> Loader::next() {
  Impl& m = *impl_;
  if (m.state == Impl::State::kIdle) {
    throw std::logic_error("Loader::next(): call start_epoch() first");
  }
  if (m.error) std::rethrow_exception(m.error);
  if (m.state == Impl::State::kDone) return std::nullopt;
  if (m.next_deliver >= m.batches) {
    m.halt();  // workers have already exited; this only joins them
    m.state = Impl::State::kDone;
    return std::nullopt;
  }

  const auto t0 = std::chrono::steady_clock::now();
  const int64_t k = m.next_deliver;
  Ready r;
  if (options_.workers() == 0) {
    try {
      r.slot = m.pool->take();
      r.n = m.timed_fill(k, r.slot);
    } catch (...) {
      r.error = std::current_exception();
    }
  } else {
    {
      std::unique_lock<std::mutex> lk(m.mu);
      m.ready_cv.wait(lk, [&] { return m.ready.count(k) > 0; });
      auto node = m.ready.extract(k);
      r = std::move(node.mapped());
      --m.in_flight;
    }
    m.space_cv.notify_one();
  }
  m.last_wait = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ++m.next_deliver;

  if (r.error) {
    if (r.slot.images.defined()) m.pool->give(std::move(r.slot));
    m.error = r.error;
    m.halt();
    m.state = Impl::State::kDone;
    std::rethrow_exception(m.error);
  }

  // The tensors view the pooled buffer; the lease returns it when both are released.
  auto lease = std::make_shared<Lease>(m.pool, std::move(r.slot));
  const ImageShape& s = m.shape;
  Batch batch;
  batch.index = k;
  batch.images = lease_view(lease, lease->slot.images.data_ptr(), {r.n, s.channels, s.height, s.width}, at::kByte);
  batch.labels = lease_view(lease, lease->slot.labels.data_ptr(), {r.n}, at::kLong);
  batch.ids = lease_view(lease, lease->slot.ids.data_ptr(), {r.n}, at::kLong);
  return batch;
}

int64_t Loader::batches_per_epoch() const {
  const auto n = static_cast<int64_t>(
      samples_per_rank(dataset_->size(), options_.world_size(), options_.rank(), options_.sampler().pad));
  const int64_t bs = options_.batch_size();
  return options_.drop_last() ? n / bs : (n + bs - 1) / bs;
}

int64_t Loader::dropped_samples() const {
  const auto n = static_cast<int64_t>(
      samples_per_rank(dataset_->size(), options_.world_size(), options_.rank(), options_.sampler().pad));
  return options_.drop_last() ? n % options_.batch_size() : 0;
}

void Loader::stop() {
  impl_->halt();
  if (impl_->state == Impl::State::kRunning) impl_->state = Impl::State::kDone;
}

int64_t Loader::skipped_samples() const { return impl_->skipped.load(std::memory_order_relaxed); }

double Loader::last_wait_seconds() const { return impl_->last_wait; }

double Loader::loader_images_per_second() const {
  const int64_t ns = impl_->busy_ns.load(std::memory_order_relaxed);
  if (ns <= 0) return 0.0;
  return static_cast<double>(impl_->loaded.load(std::memory_order_relaxed)) * 1e9 / static_cast<double>(ns) *
         static_cast<double>(std::max<int64_t>(1, options_.workers()));
}

int64_t Loader::loaded_samples() const { return impl_->loaded.load(std::memory_order_relaxed); }

}  // namespace keel::data
