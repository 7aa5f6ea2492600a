// The one place for LibTorch calls whose API differs between 1.13 (Debian) and 2.x (PyPI wheel).
#pragma once
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Parallel.h>
#include <ATen/Functions.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>
#include <torch/optim/optimizer.h>
#include <torch/version.h>

#include <cstdint>
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

// RAII autocast for one device type, kCPU or kCUDA (1.13 has the setters but no guard, and different
// setter names per device). Restores the previous state and clears the cast cache when it leaves, as
// torch.autocast's __exit__ does.
class AutocastGuard {
 public:
  AutocastGuard(at::DeviceType device, bool enabled, at::ScalarType dtype) : device_(device) {
    TORCH_CHECK(device == at::kCPU || device == at::kCUDA, "autocast: unsupported device type ", device);
    prev_enabled_ = is_enabled(device_);
    prev_dtype_ = get_dtype(device_);
    set(device_, enabled, dtype);
    at::autocast::increment_nesting();
  }
  ~AutocastGuard() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    set(device_, prev_enabled_, prev_dtype_);
  }
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

  // The current thread's autocast state for a device type.
  static bool is_enabled(at::DeviceType d) {
#if KEEL_TORCH_AT_LEAST(2, 4)
    return at::autocast::is_autocast_enabled(d);
#else
    return d == at::kCPU ? at::autocast::is_cpu_enabled() : at::autocast::is_enabled();
#endif
  }
  static at::ScalarType get_dtype(at::DeviceType d) {
#if KEEL_TORCH_AT_LEAST(2, 4)
    return at::autocast::get_autocast_dtype(d);
#else
    return d == at::kCPU ? at::autocast::get_autocast_cpu_dtype() : at::autocast::get_autocast_gpu_dtype();
#endif
  }

 private:
  static void set(at::DeviceType d, bool enabled, at::ScalarType dtype) {
#if KEEL_TORCH_AT_LEAST(2, 4)
    at::autocast::set_autocast_enabled(d, enabled);
    at::autocast::set_autocast_dtype(d, dtype);
#else
    if (d == at::kCPU) {
      at::autocast::set_cpu_enabled(enabled);
      at::autocast::set_autocast_cpu_dtype(dtype);
    } else {
      at::autocast::set_enabled(enabled);
      at::autocast::set_autocast_gpu_dtype(dtype);
    }
#endif
  }
  at::DeviceType device_;
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

// Start and duration of a profiler event (torch::autograd::profiler::KinetoEvent) in nanoseconds: 1.13 has
// startUs()/durationUs(), 2.x startNs()/durationNs(). Detected, not guessed from the version number.
namespace detail {
template <class E, class = void>
struct HasStartNs : std::false_type {};
template <class E>
struct HasStartNs<E, std::void_t<decltype(std::declval<const E&>().startNs())>> : std::true_type {};
}  // namespace detail
template <class Event>
uint64_t profiler_event_start_ns(const Event& e) {
  if constexpr (detail::HasStartNs<Event>::value) return e.startNs();
  else return static_cast<uint64_t>(e.startUs()) * 1000;
}
template <class Event>
uint64_t profiler_event_duration_ns(const Event& e) {
  if constexpr (detail::HasStartNs<Event>::value) return e.durationNs();
  else return static_cast<uint64_t>(e.durationUs()) * 1000;
}

// Fused attention. LibTorch >= 2.0 has at::scaled_dot_product_attention (q (B, H, L, d), k/v (B, H, S, d),
// scale 1/sqrt(d), no mask); 1.13 has none, so keel's models fall back to their own batched-matmul attention
// (models/vit.h: attention_keel) where kHasSdpa is false.
#if KEEL_TORCH_AT_LEAST(2, 0)
constexpr bool kHasSdpa = true;
inline at::Tensor scaled_dot_product_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return at::scaled_dot_product_attention(q, k, v);
}
#else
constexpr bool kHasSdpa = false;
inline at::Tensor scaled_dot_product_attention(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "scaled_dot_product_attention needs LibTorch >= 2.0 (this is ", TORCH_VERSION,
              "); use attention = \"keel\"");
}
#endif

// oneDNN pre-packed linear layers (models/packed_linear.h). LibTorch >= 2.0 on CPU registers the dispatcher
// operators TorchInductor uses for frozen linears: mkldnn::_reorder_linear_weight (weight (out, in) -> an opaque
// tensor in oneDNN's blocked layout) and mkldnn::_linear_pointwise (x W^T + b from that layout, with an optional
// fused post-op). They have no public C++ API, so they are found by name at run time: a LibTorch built without
// oneDNN has none, and on 1.13 (which predates them) has_packed_linear() is false.
#if KEEL_TORCH_AT_LEAST(2, 0)
namespace detail {
struct PackedLinearOps {
  using Reorder = at::Tensor(const at::Tensor&, std::optional<int64_t>);
  using Pointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                               c10::string_view, c10::List<std::optional<at::Scalar>>,
                               std::optional<c10::string_view>);
  std::optional<c10::TypedOperatorHandle<Reorder>> reorder;
  std::optional<c10::TypedOperatorHandle<Pointwise>> pointwise;
};
inline const PackedLinearOps& packed_linear_ops() {
  static const PackedLinearOps ops = [] {
    PackedLinearOps o;
    auto& d = c10::Dispatcher::singleton();
    auto r = d.findSchema({"mkldnn::_reorder_linear_weight", ""});
    auto p = d.findSchema({"mkldnn::_linear_pointwise", ""});
    if (!r || !p) return o;
    try {  // typed() checks the C++ signature against the registered kernel's: a changed one means "absent"
      o.reorder = r->typed<PackedLinearOps::Reorder>();
      o.pointwise = p->typed<PackedLinearOps::Pointwise>();
    } catch (const c10::Error&) {
      o = PackedLinearOps{};
    }
    return o;
  }();
  return ops;
}
}  // namespace detail
inline bool has_packed_linear() { return detail::packed_linear_ops().pointwise.has_value(); }
// weight (out, in), contiguous CPU fp32/bf16 -> the packed (opaque) weight; throws where the CPU lacks the dtype.
inline at::Tensor reorder_linear_weight(const at::Tensor& weight) {
  TORCH_CHECK(has_packed_linear(), "packed linear: this LibTorch has no mkldnn::_reorder_linear_weight");
  return detail::packed_linear_ops().reorder->call(weight, std::nullopt);
}
// x (..., in) -> (..., out) = x W^T + bias through the packed weight, then the post-op `attr` ("none" or "gelu";
// for gelu, algorithm "none" is the exact erf form, "tanh" the approximation).
inline at::Tensor linear_pointwise(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias,
                                   c10::string_view attr, c10::string_view algorithm) {
  TORCH_CHECK(has_packed_linear(), "packed linear: this LibTorch has no mkldnn::_linear_pointwise");
  return detail::packed_linear_ops().pointwise->call(
      x, packed, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, attr,
      c10::List<std::optional<at::Scalar>>(), std::optional<c10::string_view>(algorithm));
}
#else
inline bool has_packed_linear() { return false; }
inline at::Tensor reorder_linear_weight(const at::Tensor&) {
  TORCH_CHECK(false, "packed linear layers need LibTorch >= 2.0 (this is ", TORCH_VERSION, ")");
}
inline at::Tensor linear_pointwise(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
                                   c10::string_view) {
  TORCH_CHECK(false, "packed linear layers need LibTorch >= 2.0 (this is ", TORCH_VERSION, ")");
}
#endif

}  // namespace keel::compat
