// Dynamic loss scaler for fp16 training (LibTorch has no C++ GradScaler), with
// torch.cuda.amp.GradScaler's rule and state.
#pragma once
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <vector>

namespace keel::train {

struct LossScalerOptions {
  double init_scale = 65536.0;
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;
  // Below this the scale has collapsed: the gradients overflow at any scale, which is divergence, not fp16
  // range (2^-14: 30 backoffs from 65536). The step stops the run with a report when the scale falls under it.
  double min_scale = 1.0 / 16384.0;
  bool enabled = false;  // disabled: scale 1, never changes (fp32 / bf16); amp.scaler's default (auto: fp16 only)
};

// The rule (PyTorch's _amp_update_scale_): on a step with inf/NaN gradients, scale *= backoff
// and the growth counter resets; otherwise the counter grows, and when it reaches
// growth_interval, scale *= growth and the counter resets. Scale and counter live in tensors so
// that scaling, unscaling and updating need no host sync; the caller reads found_inf once.
class LossScaler {
 public:
  explicit LossScaler(LossScalerOptions o = {});
  // loss * scale (a no-op when disabled).
  at::Tensor scale(const at::Tensor& loss) const;
  // Divides every gradient by the scale in place; returns a 0-dim float tensor, 1 if any
  // gradient holds inf/NaN (checked whether or not the scaler is enabled).
  at::Tensor unscale_(const std::vector<at::Tensor>& grads) const;
  // Applies the rule given found_inf from unscale_ (tensor; no sync).
  void update(const at::Tensor& found_inf);

  double scale_value() const;     // host read (for logs)
  int64_t growth_tracker() const;  // host read
  bool enabled() const { return opts_.enabled; }
  const LossScalerOptions& options() const { return opts_; }

  nlohmann::json state() const;
  void load_state(const nlohmann::json& s);
  // Keeps the scale and counter on the training device (the gradients' device), so that scaling,
  // unscaling and updating never copy between host and device.
  void to(const at::Device& d);

 private:
  LossScalerOptions opts_;
  at::Tensor scale_;    // float32 0-dim
  at::Tensor tracker_;  // int32 0-dim
};

}  // namespace keel::train
