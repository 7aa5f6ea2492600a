// Inference optimisations: preparation of a model and the forward under the chosen modes.
#include "keel/models/inference.h"

#include <c10/core/InferenceMode.h>
#include <torch/autograd.h>

#include <optional>
#include <sstream>
#include <stdexcept>

#include "keel/compat/torch_compat.h"
#include "keel/models/resnet.h"

namespace keel::models {

std::string InferenceOptions::label() const {
  std::string s;
  auto add = [&s](bool on, const std::string& what) {
    if (!on) return;
    if (!s.empty()) s += '+';
    s += what;
  };
  add(inference_mode, "im");
  add(fold_bn, "fold");
  add(channels_last, "cl");
  add(pack, "pack");
  add(precision != "fp32", bf16_model ? std::string("bf16m") : bf16_weights ? std::string("bf16w") : precision);
  return s.empty() ? "plain" : s;
}

InferenceOptions InferenceOptions::parse(const std::string& label) {
  InferenceOptions o;
  o.inference_mode = o.fold_bn = o.channels_last = false;
  if (label == "plain") return o;
  std::stringstream ss(label);
  for (std::string t; std::getline(ss, t, '+');) {
    if (t == "im") o.inference_mode = true;
    else if (t == "fold") o.fold_bn = true;
    else if (t == "cl") o.channels_last = true;
    else if (t == "pack") o.pack = true;
    else if (t == "bf16" || t == "fp16") o.precision = t;
    else if (t == "bf16w") {
      o.precision = "bf16";
      o.bf16_weights = true;
    }
    else if (t == "bf16m") {
      o.precision = "bf16";
      o.bf16_model = true;
    }
    else if (t == "fp32") o.precision = "fp32";
    else throw std::invalid_argument("inference setting '" + label + "': unknown switch '" + t +
                                     "'; expected plain or a '+'-joined list of im, fold, cl, pack, bf16, bf16w, bf16m, fp16");
  }
  return o;
}

Prepared prepare_for_inference(Net& m, const InferenceOptions& o) {
  if (o.pack && o.precision != "fp32" && !o.bf16_model) {
    throw std::invalid_argument("inference setting '" + o.label() + "': pack keeps the weights in one dtype, which "
                                "autocast would override per call; use pack with fp32 or bf16m");
  }
  m.eval();
  Prepared done;
  if (o.fold_bn) {
    if (auto* r = dynamic_cast<ResNet*>(&m)) done.folded = r->fold_batchnorm();
  }
  torch::NoGradGuard ng;
  if (o.channels_last) {
    for (auto& p : m.parameters()) {
      if (p.dim() == 4) p.set_data(p.contiguous(at::MemoryFormat::ChannelsLast));
    }
  }
  if (o.bf16_model) {
    TORCH_CHECK(o.precision == "bf16", "a bf16 model needs precision bf16 (setting bf16m)");
    m.to(at::kBFloat16);
  } else if (o.bf16_weights) {
    TORCH_CHECK(o.precision == "bf16", "bf16 weights need bf16 autocast (setting bf16w)");
    // By rule, not by module type: the matrices and kernels (*weight, >= 2-D) that autocast would cast per call.
    for (auto& p : m.named_parameters()) {
      const std::string& n = p.key();
      if (p.value().dim() >= 2 && n.size() >= 6 && n.compare(n.size() - 6, 6, "weight") == 0) {
        p.value().set_data(p.value().to(at::kBFloat16));
      }
    }
  }
  if (o.pack) done.packed = m.pack_linear_weights();  // after the dtype change: packed in the compute dtype
  return done;
}

at::Tensor infer(Net& m, const at::Tensor& x, const InferenceOptions& o) {
  // x: (N, C, H, W) -> logits (N, K) float
  TORCH_CHECK(o.precision == "fp32" || o.precision == "bf16" || o.precision == "fp16", "unknown precision \"",
              o.precision, "\"");
  TORCH_CHECK(o.precision != "fp16" || x.is_cuda(), "fp16 inference needs a CUDA device (CPU autocast is bf16 only)");
  std::optional<c10::InferenceMode> im;
  std::optional<torch::NoGradGuard> ng;
  if (o.inference_mode) im.emplace();
  else ng.emplace();
  const at::Tensor in = o.channels_last && x.dim() == 4 ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
  if (o.precision == "fp32") return m.forward(in);
  if (o.bf16_model) return m.forward(in.to(at::kBFloat16)).to(at::kFloat);
  compat::AutocastGuard ac(x.device().type(), true, o.precision == "bf16" ? at::kBFloat16 : at::kHalf);
  return m.forward(in).to(at::kFloat);
}

}  // namespace keel::models
