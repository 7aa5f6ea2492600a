// CPU memory statistics and budget: a wrapper around LibTorch's CPU allocator (c10::SetCPUAllocator).
//
// Every CPU tensor allocation after install_cpu_allocator() passes through the wrapper, which
// counts live and peak bytes and, when a budget is set, throws c10::OutOfMemoryError (the type
// CUDA's caching allocator throws) instead of allocating past it. That makes out-of-memory
// reproducible and testable on a CPU-only machine.
#pragma once
#include <c10/core/Allocator.h>

#include <cstdint>
#include <optional>

namespace keel::memory {

// A snapshot of the CPU allocator's counters. Bytes are what tensors asked for (the wrapper's
// 64-byte bookkeeping header per block is not counted).
struct MemoryStats {
  int64_t current = 0;      // bytes held by live blocks
  int64_t peak = 0;         // highest `current` since install or the last reset_peak()
  int64_t budget = -1;      // budget in bytes, -1 when none is set
  int64_t allocations = 0;  // successful allocations since install (cumulative)
  int64_t live_blocks = 0;  // blocks allocated and not yet freed
  int64_t ooms = 0;         // allocations refused (over budget) or failed in the wrapped allocator
};

// Installs the counting wrapper as the CPU allocator, delegating to the allocator that was set
// before (Debian's DefaultCPUAllocator). Installing twice is a no-op. Call it at start-up, before
// worker threads allocate (c10::SetCPUAllocator is not thread-safe). Throws std::runtime_error
// when a higher-priority allocator prevents the install.
void install_cpu_allocator();

// True once install_cpu_allocator() has taken effect.
bool cpu_allocator_installed();

// Sets (bytes > 0) or clears (nullopt) the budget. Allocations that would raise `current` above
// it throw c10::OutOfMemoryError. Thread-safe; applies to the next allocation.
void set_cpu_budget(std::optional<int64_t> bytes);

// The budget in bytes, if one is set.
std::optional<int64_t> cpu_budget();

// The counters now (each read atomically; the set is not one atomic snapshot under concurrency).
MemoryStats cpu_stats();

// Starts a new peak window: peak = current.
void reset_peak();

// The wrapper itself, for tests and for code that needs the allocator object (e.g. to compare
// against c10::GetCPUAllocator()). Valid for the life of the process.
c10::Allocator* budget_allocator();

}  // namespace keel::memory
