// is_out_of_memory: each out-of-memory exception type is recognised by type and origin; other
// errors (a shape error, look-alike messages from elsewhere) are not.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include <exception>
#include <new>
#include <stdexcept>
#include <string>

#include "keel/compat/torch_compat.h"
#include "keel/memory/cpu_allocator.h"
#include "keel/memory/oom.h"

namespace km = keel::memory;

namespace {
// Runs `f` and returns what it threw (null when it did not throw).
template <typename F>
std::exception_ptr capture(F&& f) {
  try {
    f();
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

const std::string kAllocMsg =
    "DefaultCPUAllocator: can't allocate memory: you tried to allocate 4503599627370496 bytes. "
    "Error code 12 (Cannot allocate memory)";
}  // namespace

TEST(Oom, RealDefaultCpuAllocatorFailureIsRecognisedByOrigin) {
  // The unwrapped DefaultCPUAllocator, asked for 4 PiB: the plain c10::Error it really throws.
  c10::Allocator* def = c10::GetDefaultCPUAllocator();
  ASSERT_NE(def, km::budget_allocator());
  std::exception_ptr ep = capture([&] { def->allocate(size_t{1} << 52); });
  ASSERT_TRUE(ep) << "a 4 PiB allocation succeeded";
  try {
    std::rethrow_exception(ep);
  } catch (const c10::OutOfMemoryError&) {
    // Newer LibTorch may throw the OOM type directly; still recognised below.
  } catch (const c10::Error& e) {
    EXPECT_TRUE(km::is_cpu_allocator_failure(e)) << e.msg();
  }
  EXPECT_TRUE(km::is_out_of_memory(ep));
}

TEST(Oom, OutOfMemoryErrorFromTheBudgetAllocator) {
  km::install_cpu_allocator();
  km::set_cpu_budget(km::cpu_stats().current + 16);
  std::exception_ptr ep = capture([] { at::empty({1024}, at::kFloat); });
  km::set_cpu_budget(std::nullopt);
  ASSERT_TRUE(ep);
  EXPECT_TRUE(km::is_out_of_memory(ep));
}

TEST(Oom, OutOfMemoryErrorAsCudaThrowsIt) {
  std::exception_ptr ep = capture([] {
    TORCH_CHECK_WITH(OutOfMemoryError, false, "CUDA out of memory. Tried to allocate 2.00 GiB");
  });
  EXPECT_TRUE(km::is_out_of_memory(ep));
  // Recognised by type, whatever the message says.
  EXPECT_TRUE(km::is_out_of_memory(c10::OutOfMemoryError("anything", keel::compat::ErrorBacktrace{})));
}

TEST(Oom, BadAllocButNotBadArrayNewLength) {
  EXPECT_TRUE(km::is_out_of_memory(capture([] { throw std::bad_alloc(); })));
  EXPECT_TRUE(km::is_out_of_memory(std::bad_alloc()));
  EXPECT_FALSE(km::is_out_of_memory(std::bad_array_new_length()));
}

TEST(Oom, OriginDecidesForPlainC10Errors) {
  // Caffe2-style (CAFFE_ENFORCE) origin, as LibTorch 1.13 writes it.
  EXPECT_TRUE(km::is_out_of_memory(c10::Error("../c10/core/impl/alloc_cpu.cpp", 75, "err == 0", kAllocMsg, keel::compat::ErrorBacktrace{})));
  // The same message enforced somewhere else is not an allocator failure.
  EXPECT_FALSE(km::is_out_of_memory(c10::Error("../aten/src/ATen/native/Foo.cpp", 10, "x", kAllocMsg, keel::compat::ErrorBacktrace{})));
  // alloc_cpu's other check (negative size) is a bug, not out of memory.
  EXPECT_FALSE(km::is_out_of_memory(c10::Error("alloc_cpu.cpp", 40, "((ptrdiff_t)nbytes) >= 0",
                                               "alloc_cpu() seems to have been called with negative number: -1", keel::compat::ErrorBacktrace{})));
  // TORCH_CHECK-style origin (source location), as LibTorch 2.x records it.
  EXPECT_TRUE(km::is_out_of_memory(c10::Error(c10::SourceLocation{"alloc_cpu", "/build/c10/core/impl/alloc_cpu.cpp", 80}, kAllocMsg)));
  EXPECT_FALSE(km::is_out_of_memory(c10::Error(c10::SourceLocation{"resize", "/build/aten/src/ATen/native/Resize.cpp", 80}, kAllocMsg)));
  // No origin at all: the exact DefaultCPUAllocator prefix is the one fallback.
  EXPECT_TRUE(km::is_out_of_memory(c10::Error(kAllocMsg, keel::compat::ErrorBacktrace{})));
  EXPECT_FALSE(km::is_out_of_memory(c10::Error("tensor too big: " + kAllocMsg, keel::compat::ErrorBacktrace{})));
}

TEST(Oom, OtherErrorsAreNotOutOfMemory) {
  // A plain shape error.
  std::exception_ptr shape = capture([] { at::matmul(at::ones({2, 3}), at::ones({4, 5})); });
  ASSERT_TRUE(shape);
  EXPECT_FALSE(km::is_out_of_memory(shape));
  // The allocator's words in a non-c10 exception type.
  EXPECT_FALSE(km::is_out_of_memory(std::runtime_error(kAllocMsg)));
  EXPECT_FALSE(km::is_out_of_memory(std::invalid_argument("out of memory")));
  EXPECT_FALSE(km::is_out_of_memory(std::exception_ptr()));
  EXPECT_FALSE(km::is_out_of_memory(capture([] { throw 42; })));
}

TEST(Oom, NestedOutOfMemoryIsFound) {
  std::exception_ptr ep = capture([] {
    try {
      throw std::bad_alloc();
    } catch (...) {
      std::throw_with_nested(std::runtime_error("while running step 3"));
    }
  });
  EXPECT_TRUE(km::is_out_of_memory(ep));
  std::exception_ptr plain = capture([] {
    try {
      throw std::logic_error("bad shape");
    } catch (...) {
      std::throw_with_nested(std::runtime_error("while running step 3"));
    }
  });
  EXPECT_FALSE(km::is_out_of_memory(plain));
}
