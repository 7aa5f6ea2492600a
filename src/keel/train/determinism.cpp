// Deterministic mode: LibTorch, oneDNN, cuDNN and cuBLAS switches, and the thread count on resume.
#include "keel/train/determinism.h"

#include <cstdlib>
#include <type_traits>
#include <utility>

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>

namespace keel::train {
namespace {

// at::Context::setDeterministicMkldnn exists in LibTorch 2.x, not in 1.13 (whose oneDNN kernels keel
// uses are deterministic for a fixed thread count anyway).
template <typename C, typename = void>
struct HasMkldnnSwitch : std::false_type {};
template <typename C>
struct HasMkldnnSwitch<C, std::void_t<decltype(std::declval<C&>().setDeterministicMkldnn(true))>> : std::true_type {};

template <typename C>
void set_mkldnn_deterministic(C& ctx, bool on) {
  if constexpr (HasMkldnnSwitch<C>::value) ctx.setDeterministicMkldnn(on);
}

}  // namespace

void set_deterministic(bool on) {
  at::Context& ctx = at::globalContext();
  ctx.setDeterministicAlgorithms(on, /*warn_only=*/false);
  set_mkldnn_deterministic(ctx, on);
  ctx.setDeterministicCuDNN(on);
  ctx.setBenchmarkCuDNN(false);
  if (on) setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", /*overwrite=*/0);
}

bool deterministic() { return at::globalContext().deterministicAlgorithms(); }

std::string keep_checkpoint_threads(int64_t checkpoint_threads) {
  const int current = at::get_num_threads();
  if (checkpoint_threads <= 0 || checkpoint_threads == current) return "";
  at::set_num_threads(static_cast<int>(checkpoint_threads));
  return fmt::format("train.deterministic: using {} intra-op threads as the checkpoint's run did (this run "
                     "would use {}): a different count partitions reductions differently",
                     checkpoint_threads, current);
}

}  // namespace keel::train
