// Net: the common base of every keel model, so the trainer can hold any model by pointer.
#pragma once
#include <torch/nn/module.h>
#include <ATen/ATen.h>
#include <string>
#include <utility>
#include <vector>

namespace keel::models {

// Named tensors in order (the same type as state_dict.h's StateDict).
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// A model: images (N, C, H, W) float -> logits (N, num_classes).
struct Net : torch::nn::Module {
  virtual at::Tensor forward(at::Tensor x) = 0;
  // Multiply-accumulates of one forward pass for one image of the given size (for FLOP/s reports).
  virtual double macs_per_image(int64_t height, int64_t width) const { return 0.0; }
  // A state dict of this architecture saved with other settings, rewritten to this model's shapes before
  // load_state_dict checks it (a ViT saved at another image size: its position embeddings are interpolated).
  // The default returns it unchanged.
  virtual NamedTensors adapt_state_dict(const NamedTensors& sd) const { return sd; }
  // Packs every linear layer's weight for oneDNN (models/packed_linear.h; the `pack` inference switch) in its
  // current dtype and returns how many were packed (0 where this LibTorch or CPU cannot). A packed copy is used
  // only while its weight is unchanged and gradients are off, so training after it stays correct. Default: none.
  virtual int64_t pack_linear_weights() { return 0; }
};

using NetPtr = std::shared_ptr<Net>;

}  // namespace keel::models
