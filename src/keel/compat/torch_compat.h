// The one place for LibTorch calls whose API differs between 1.13 (Debian) and 2.x (PyPI wheel).
#pragma once
#include <ATen/autocast_mode.h>
#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>
#include <torch/optim/optimizer.h>
#include <torch/version.h>

#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

namespace keel::compat {

constexpr int kTorchMajor = TORCH_VERSION_MAJOR;
constexpr int kTorchMinor = TORCH_VERSION_MINOR;

inline std::string torch_version() { return TORCH_VERSION; }

// True when the LibTorch in use is at least major.minor (3.0 counts as newer than 2.4).
#define KEEL_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

// RAII autocast on CPU (1.13 has the setters but no guard). Restores the previous state and
// clears the cast cache when it leaves, as torch.autocast's __exit__ does.
class CpuAutocastGuard {
 public:
  CpuAutocastGuard(bool enabled, at::ScalarType dtype) {
#if KEEL_TORCH_AT_LEAST(2, 4)
    prev_enabled_ = at::autocast::is_autocast_enabled(at::kCPU);
    prev_dtype_ = at::autocast::get_autocast_dtype(at::kCPU);
    at::autocast::set_autocast_enabled(at::kCPU, enabled);
    at::autocast::set_autocast_dtype(at::kCPU, dtype);
#else
    prev_enabled_ = at::autocast::is_cpu_enabled();
    prev_dtype_ = at::autocast::get_autocast_cpu_dtype();
    at::autocast::set_cpu_enabled(enabled);
    at::autocast::set_autocast_cpu_dtype(dtype);
#endif
    at::autocast::increment_nesting();
  }
  ~CpuAutocastGuard() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
#if KEEL_TORCH_AT_LEAST(2, 4)
    at::autocast::set_autocast_enabled(at::kCPU, prev_enabled_);
    at::autocast::set_autocast_dtype(at::kCPU, prev_dtype_);
#else
    at::autocast::set_cpu_enabled(prev_enabled_);
    at::autocast::set_autocast_cpu_dtype(prev_dtype_);
#endif
  }
  CpuAutocastGuard(const CpuAutocastGuard&) = delete;
  CpuAutocastGuard& operator=(const CpuAutocastGuard&) = delete;

 private:
  bool prev_enabled_;
  at::ScalarType prev_dtype_;
};

namespace detail {
inline std::string backtrace_text(const std::string& text) { return text; }
template <class Lazy>
std::string backtrace_text(const std::shared_ptr<Lazy>& lazy) {
  return lazy ? lazy->get() : std::string();
}
}  // namespace detail

// c10::Error::backtrace() as text. 1.13 returns `const std::string&`; 2.x returns c10::Backtrace, a
// shared_ptr to a lazily symbolised string (nullptr when none was recorded). Overload resolution picks
// the right one, so no version number has to be guessed. Symbolising costs time: call it on error paths.
inline std::string error_backtrace(const c10::Error& e) { return detail::backtrace_text(e.backtrace()); }

// The type of c10::Error's backtrace argument (std::string in 1.13, c10::Backtrace in 2.x); a
// value-initialised one means "no backtrace": `c10::Error(msg, compat::ErrorBacktrace{})`.
using ErrorBacktrace = std::decay_t<decltype(std::declval<const c10::Error&>().backtrace())>;

// Key of torch::optim::Optimizer::state(): the parameter's TensorImpl address, as text in 1.13 and as
// `void*` in 2.x.
using OptimizerStateKey = std::decay_t<decltype(std::declval<torch::optim::Optimizer&>().state().begin()->first)>;

namespace detail {
template <class Key>
Key optimizer_state_key(c10::TensorImpl* impl) {
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream ss;  // how 1.13 spells the key (c10::guts::to_string of the pointer)
    ss << impl;
    return ss.str();
  } else {
    return impl;
  }
}
}  // namespace detail

// The key under which an optimizer keeps parameter p's state (momentum buffer, Adam moments).
inline OptimizerStateKey optimizer_state_key(const at::Tensor& p) {
  return detail::optimizer_state_key<OptimizerStateKey>(p.unsafeGetTensorImpl());
}

// Base for a keel c10::Allocator: implement `allocate_impl(n) const` (and raw_deleter()) once.
// 1.13 declares `virtual DataPtr allocate(size_t) const = 0`; 2.x made it non-const and added a pure
// virtual `copy_data(dest, src, n) const`. Both `allocate` overloads and `copy_data` are declared here
// without `override` on purpose: each overrides whichever the LibTorch in use declares, the other is an
// ordinary member. If a later LibTorch changes the interface again, a derived `final` allocator is
// abstract and fails to compile where it is instantiated (see the static_assert in CpuAllocatorBase users).
struct CpuAllocatorBase : c10::Allocator {
  virtual c10::DataPtr allocate_impl(size_t n) const = 0;
  c10::DataPtr allocate(size_t n) const { return allocate_impl(n); }
  c10::DataPtr allocate(size_t n) { return allocate_impl(n); }
  // Blocks are plain host memory: a byte copy is the clone (what Allocator::default_copy_data does).
  void copy_data(void* dest, const void* src, std::size_t count) const { std::memcpy(dest, src, count); }
};

}  // namespace keel::compat
