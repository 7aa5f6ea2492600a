// The counting, budget-enforcing CPU allocator wrapper.
//
// Layout of one block: [64-byte header | user bytes]. The wrapped allocator allocates both; the
// DataPtr handed out has data == context == the address after the header. This matters because
// oneDNN (through ideep) allocates with Allocator::raw_allocate, which asserts data == context and
// later frees with raw_deleter()(data): the deleter must find its bookkeeping from the data
// pointer alone, so the bookkeeping lives in the header, not in a separate context object.
#include "keel/memory/cpu_allocator.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <unordered_set>

#include "keel/compat/torch_compat.h"
#include "keel/memory/budget.h"

namespace keel::memory {
namespace {

// Size of the header before every block: a whole alignment unit (c10::gAlignment is 64 on
// x86-64 Linux), so the user pointer keeps the wrapped allocator's alignment.
constexpr size_t kHeaderBytes = 64;

// Bookkeeping for one block, stored in the header. Whether a pointer came from this wrapper is
// decided by the owned-pointer set below; `magic`, tied to the block's address, then checks that the
// header was not overwritten.
struct BlockHeader {
  uint64_t magic;                // kMagic ^ address of the user bytes; cleared on free
  uint64_t size;                 // user bytes requested (what the counters hold)
  void* inner_context;           // the wrapped allocator's context for this block
  c10::DeleterFnPtr inner_free;  // the wrapped allocator's deleter for that context
};
static_assert(sizeof(BlockHeader) <= kHeaderBytes, "header must fit its alignment unit");

constexpr uint64_t kMagic = 0x6b65656c2d6d656dULL;  // "keel-mem"

// Process-wide counters and settings shared by the allocator and its deleter.
struct State {
  std::atomic<int64_t> current{0};
  std::atomic<int64_t> peak{0};
  std::atomic<int64_t> budget{-1};
  std::atomic<int64_t> allocations{0};
  std::atomic<int64_t> live_blocks{0};
  std::atomic<int64_t> ooms{0};
  std::atomic<c10::Allocator*> wrapped{nullptr};
  std::mutex install_mutex;
};

State& state() {
  static State s;
  return s;
}

// Address of the header that precedes `user`.
BlockHeader* header_of(void* user) {
  return reinterpret_cast<BlockHeader*>(static_cast<char*>(user) - kHeaderBytes);
}

uint64_t magic_for(const void* user) { return kMagic ^ reinterpret_cast<uint64_t>(user); }

// The user pointers of the live blocks this wrapper handed out, sharded by address so that the lock
// taken once per allocation and once per free is rarely contended (~0.1 us each). free_block asks it
// whether a pointer is ours instead of reading the header bytes before the pointer: for a foreign
// block (a raw oneDNN block of the wrapped allocator) those bytes lie outside the block, a read out of
// bounds that AddressSanitizer reported (CpuAllocator.RawBlockFromTheWrappedAllocatorIsHandedBack,
// tests/sanitizers/README.md). Never destroyed: tensors may be freed during static destruction.
struct OwnedShard {
  std::mutex m;
  std::unordered_set<const void*> live;
};
constexpr size_t kOwnedShards = 64;

OwnedShard& owned_shard(const void* user) {
  static OwnedShard* shards = new OwnedShard[kOwnedShards];
  return shards[(reinterpret_cast<uintptr_t>(user) / kHeaderBytes) % kOwnedShards];
}

void remember_owned(const void* user) {
  OwnedShard& sh = owned_shard(user);
  std::lock_guard<std::mutex> lock(sh.m);
  sh.live.insert(user);
}

// True (and forgotten) when `user` is a live block of this wrapper.
bool forget_owned(const void* user) {
  OwnedShard& sh = owned_shard(user);
  std::lock_guard<std::mutex> lock(sh.m);
  return sh.live.erase(user) == 1;
}

// Raises `peak` to at least `value`.
void raise_peak(int64_t value) {
  auto& peak = state().peak;
  int64_t seen = peak.load(std::memory_order_relaxed);
  while (value > seen && !peak.compare_exchange_weak(seen, value, std::memory_order_relaxed)) {
  }
}

// Frees a block handed out by the wrapper (the deleter of every DataPtr it returns, and its
// raw_deleter). Must not throw: it runs in destructors.
void free_block(void* user) {
  if (user == nullptr) return;
  if (!forget_owned(user)) {
    // Not ours: a raw (oneDNN) block allocated by the wrapped allocator before install and freed
    // through GetCPUAllocator()->raw_deallocate after it. Hand it back to its owner.
    c10::Allocator* wrapped = state().wrapped.load();
    c10::DeleterFnPtr d = wrapped ? wrapped->raw_deleter() : nullptr;
    if (d == nullptr) {
      std::fprintf(stderr, "keel::memory: freeing %p that the CPU allocator wrapper does not own\n", user);
      std::abort();
    }
    d(user);
    return;
  }
  BlockHeader* h = header_of(user);
  if (h->magic != magic_for(user)) {
    std::fprintf(stderr, "keel::memory: the header of block %p was overwritten\n", user);
    std::abort();
  }
  const int64_t size = static_cast<int64_t>(h->size);
  void* ctx = h->inner_context;
  c10::DeleterFnPtr inner_free = h->inner_free;
  h->magic = 0;
  inner_free(ctx);
  state().current.fetch_sub(size, std::memory_order_relaxed);
  state().live_blocks.fetch_sub(1, std::memory_order_relaxed);
}

// Wraps the previous CPU allocator: counts bytes, enforces the budget, keeps data == context.
// (compat::CpuAllocatorBase adapts to c10::Allocator's 1.13 and 2.x interfaces.)
struct BudgetAllocator final : compat::CpuAllocatorBase {
  c10::DataPtr allocate_impl(size_t n) const override {
    const c10::Device cpu(c10::DeviceType::CPU);
    // Empty tensors own no memory, as with the default allocator; the deleter accepts nullptr.
    if (n == 0) return {nullptr, nullptr, &free_block, cpu};

    State& s = state();
    const int64_t want = n > static_cast<size_t>(std::numeric_limits<int64_t>::max() / 2)
                             ? std::numeric_limits<int64_t>::max() / 2
                             : static_cast<int64_t>(n);
    // Reserve the bytes first, so concurrent allocations cannot together pass the budget.
    int64_t cur = s.current.load(std::memory_order_relaxed);
    while (true) {
      const int64_t budget = s.budget.load(std::memory_order_relaxed);
      if (budget >= 0 && cur + want > budget) {
        s.ooms.fetch_add(1, std::memory_order_relaxed);
        TORCH_CHECK_WITH(OutOfMemoryError, false, "CPU out of memory: tried to allocate ", format_bytes(want),
                         " (", want, " bytes) with ", format_bytes(cur), " (", cur,
                         " bytes) already allocated, over the budget of ", format_bytes(budget), " (", budget,
                         " bytes; keel memory.budget). Lower train.micro_batch or raise memory.budget.");
      }
      if (s.current.compare_exchange_weak(cur, cur + want, std::memory_order_relaxed)) break;
    }
    c10::Allocator* wrapped = s.wrapped.load();
    c10::DataPtr inner;
    std::string failure;
    try {
      if (n > std::numeric_limits<size_t>::max() - kHeaderBytes) throw std::bad_alloc();
      inner = wrapped->allocate(n + kHeaderBytes);
      if (!inner) failure = "the wrapped allocator returned no memory";
    } catch (const c10::Error& e) {
      // DefaultCPUAllocator reports a failed posix_memalign as a plain c10::Error; the wrapper
      // knows the origin, so it re-raises the one out-of-memory type.
      failure = e.what_without_backtrace();
    } catch (const std::bad_alloc& e) {
      failure = e.what();
    }
    if (!failure.empty()) {
      s.current.fetch_sub(want, std::memory_order_relaxed);
      s.ooms.fetch_add(1, std::memory_order_relaxed);
      const int64_t budget = s.budget.load(std::memory_order_relaxed);
      TORCH_CHECK_WITH(OutOfMemoryError, false, "CPU out of memory: the system allocator could not provide ",
                       format_bytes(want), " (", want, " bytes) with ", format_bytes(cur), " (", cur,
                       " bytes) allocated by tensors",
                       budget >= 0 ? " (budget " + format_bytes(budget) + ")" : std::string(" (no budget set)"),
                       ": ", failure);
    }

    void* base = inner.get();
    void* user = static_cast<char*>(base) + kHeaderBytes;
    auto* h = static_cast<BlockHeader*>(base);
    h->inner_free = inner.get_deleter();
    h->inner_context = inner.release_context();
    h->size = static_cast<uint64_t>(n);
    h->magic = magic_for(user);
    remember_owned(user);
    raise_peak(cur + want);  // only blocks that exist count towards the peak
    s.allocations.fetch_add(1, std::memory_order_relaxed);
    s.live_blocks.fetch_add(1, std::memory_order_relaxed);
    return {user, user, &free_block, cpu};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &free_block; }
};

static_assert(!std::is_abstract_v<BudgetAllocator>, "c10::Allocator's interface changed: update compat::CpuAllocatorBase");

BudgetAllocator& instance() {
  static BudgetAllocator a;
  return a;
}

}  // namespace

void install_cpu_allocator() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.install_mutex);
  c10::Allocator* prev = c10::GetCPUAllocator();
  if (prev == &instance()) return;
  s.wrapped.store(prev);
  c10::SetCPUAllocator(&instance(), /*priority=*/0);
  if (c10::GetCPUAllocator() != &instance()) {
    s.wrapped.store(nullptr);
    throw std::runtime_error(
        "keel::memory: could not install the CPU allocator wrapper (a higher-priority CPU allocator is set)");
  }
}

bool cpu_allocator_installed() { return c10::GetCPUAllocator() == &instance(); }

void set_cpu_budget(std::optional<int64_t> bytes) {
  if (bytes && *bytes <= 0)
    throw std::invalid_argument("keel::memory: CPU budget must be positive (got " + std::to_string(*bytes) + ")");
  state().budget.store(bytes ? *bytes : -1, std::memory_order_relaxed);
}

std::optional<int64_t> cpu_budget() {
  const int64_t b = state().budget.load(std::memory_order_relaxed);
  if (b < 0) return std::nullopt;
  return b;
}

MemoryStats cpu_stats() {
  const State& s = state();
  MemoryStats m;
  m.current = s.current.load(std::memory_order_relaxed);
  m.peak = s.peak.load(std::memory_order_relaxed);
  m.budget = s.budget.load(std::memory_order_relaxed);
  m.allocations = s.allocations.load(std::memory_order_relaxed);
  m.live_blocks = s.live_blocks.load(std::memory_order_relaxed);
  m.ooms = s.ooms.load(std::memory_order_relaxed);
  return m;
}

void reset_peak() { state().peak.store(state().current.load(std::memory_order_relaxed), std::memory_order_relaxed); }

c10::Allocator* budget_allocator() { return &instance(); }

}  // namespace keel::memory
