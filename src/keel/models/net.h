// Net: the common base of every keel model, so the trainer can hold any model by pointer.
#pragma once
#include <torch/nn/module.h>
#include <ATen/ATen.h>

namespace keel::models {

// A model: images (N, C, H, W) float -> logits (N, num_classes).
struct Net : torch::nn::Module {
  virtual at::Tensor forward(at::Tensor x) = 0;
  // Multiply-accumulates of one forward pass for one image of the given size (for FLOP/s reports).
  virtual double macs_per_image(int64_t height, int64_t width) const { return 0.0; }
};

using NetPtr = std::shared_ptr<Net>;

}  // namespace keel::models
