// Out-of-memory recognition by exception type and origin.
//
// Why the CPU case needs an origin check: LibTorch 1.13's DefaultCPUAllocator reports a failed
// posix_memalign with CAFFE_ENFORCE, which throws a plain c10::Error, the same type as a shape
// error. c10::Error has no structured source location: its context() is empty and the Caffe2-style
// constructor that CAFFE_ENFORCE uses writes the origin into msg() as
//   "[enforce fail at alloc_cpu.cpp:75] err == 0. DefaultCPUAllocator: can't allocate memory: ..."
// (checked here against Debian's libc10.so.1.13). TORCH_CHECK-style errors (LibTorch 2.x) instead
// record "Exception raised from <function> at <file>:<line>" at the start of backtrace(). So the
// origin is read from those two places; the message itself is checked only to tell the allocation
// failure apart from alloc_cpu's other check (a negative size, which is a bug). When an error
// carries no origin at all, the one fallback is the exact DefaultCPUAllocator message prefix.
#include "keel/memory/oom.h"

#include <c10/util/Exception.h>

#include "keel/compat/torch_compat.h"

#include <new>
#include <string>

namespace keel::memory {
namespace {

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

// The messages alloc_cpu uses for "the system has no memory for this request".
bool names_allocation_failure(const std::string& msg) {
  return msg.find("DefaultCPUAllocator: can't allocate memory") != std::string::npos ||
         msg.find("DefaultCPUAllocator: not enough memory") != std::string::npos;
}

}  // namespace

bool is_cpu_allocator_failure(const std::exception& e) {
  const auto* err = dynamic_cast<const c10::Error*>(&e);
  if (err == nullptr) return false;
  const std::string& msg = err->msg();
  // Caffe2-style origin (CAFFE_ENFORCE in c10/core/impl/alloc_cpu.cpp), LibTorch 1.13.
  if (starts_with(msg, "[enforce fail at ")) {
    return starts_with(msg, "[enforce fail at alloc_cpu.cpp:") && names_allocation_failure(msg);
  }
  // TORCH_CHECK-style origin: "Exception raised from alloc_cpu at .../alloc_cpu.cpp:NN".
  const std::string bt = compat::error_backtrace(*err);
  if (starts_with(bt, "Exception raised from ")) {
    const std::string head = bt.substr(0, bt.find('\n'));
    return head.find("alloc_cpu.cpp:") != std::string::npos && names_allocation_failure(msg);
  }
  // No origin recorded: the exact message prefix is all there is.
  return starts_with(msg, "DefaultCPUAllocator: can't allocate memory") ||
         starts_with(msg, "DefaultCPUAllocator: not enough memory");
}

bool is_out_of_memory(const std::exception& e) {
  if (dynamic_cast<const c10::OutOfMemoryError*>(&e) != nullptr) return true;
  if (dynamic_cast<const std::bad_array_new_length*>(&e) != nullptr) return false;
  if (dynamic_cast<const std::bad_alloc*>(&e) != nullptr) return true;
  if (is_cpu_allocator_failure(e)) return true;
  if (const auto* nested = dynamic_cast<const std::nested_exception*>(&e)) {
    if (nested->nested_ptr()) return is_out_of_memory(nested->nested_ptr());
  }
  return false;
}

bool is_out_of_memory(const std::exception_ptr& e) {
  if (!e) return false;
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    return is_out_of_memory(ex);
  } catch (...) {
    return false;
  }
}

}  // namespace keel::memory
