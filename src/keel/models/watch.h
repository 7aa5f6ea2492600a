// Forward instrumentation points: LibTorch C++ modules have no forward hooks, so models pass
// each named module's output through watch(name, x). With no active Watcher it returns x as is
// (one thread-local pointer test); the non-finite locator and fault injection install one.
#pragma once
#include <ATen/ATen.h>
#include <string>

namespace keel::models {

// Receives every watched output of a forward pass on this thread while installed.
class Watcher {
 public:
  virtual ~Watcher() = default;
  // Returns the tensor the model continues with (the same one, or an injected fault).
  virtual at::Tensor on_output(const std::string& module, const at::Tensor& out) = 0;
};

namespace detail {
inline thread_local Watcher* active_watcher = nullptr;
}

// Passes `out` of module `module` (its state-dict prefix, e.g. "layer2.1.bn2") to the watcher.
// Takes the name by reference: callers keep it in the module so a forward allocates no strings.
inline at::Tensor watch(const std::string& module, at::Tensor out) {
  Watcher* w = detail::active_watcher;
  return w ? w->on_output(module, out) : out;
}

// Installs a watcher on this thread for its lifetime (nesting restores the previous one).
class WatchScope {
 public:
  explicit WatchScope(Watcher* w) : prev_(detail::active_watcher) { detail::active_watcher = w; }
  ~WatchScope() { detail::active_watcher = prev_; }
  WatchScope(const WatchScope&) = delete;
  WatchScope& operator=(const WatchScope&) = delete;

 private:
  Watcher* prev_;
};

}  // namespace keel::models
