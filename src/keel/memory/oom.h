// Out-of-memory recognition: is this exception an allocation failure (to recover from by
// shrinking the micro-batch) or some other error (to report)? Decided by type and origin.
#pragma once
#include <exception>

namespace keel::memory {

// True for:
//  - c10::OutOfMemoryError: CUDA's caching allocator and keel's CPU budget allocator;
//  - std::bad_alloc (but not std::bad_array_new_length, which is a size bug, not a lack of memory);
//  - the plain c10::Error that LibTorch's DefaultCPUAllocator raises when posix_memalign fails,
//    recognised by its origin (see is_cpu_allocator_failure);
//  - any of these wrapped as the nested exception of a std::nested_exception.
// False for every other exception (shape errors, invalid arguments, ...).
bool is_out_of_memory(const std::exception& e);

// The same for a captured exception; false for a null pointer or a non-std exception.
// Rethrows internally to inspect; the caller's exception_ptr keeps its (single) reference.
bool is_out_of_memory(const std::exception_ptr& e);

// True when `e` is a c10::Error raised by c10::alloc_cpu (c10/core/impl/alloc_cpu.cpp), i.e. the
// DefaultCPUAllocator failing to get memory from the system.
bool is_cpu_allocator_failure(const std::exception& e);

}  // namespace keel::memory
