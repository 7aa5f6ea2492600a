// The memory layout a model's inputs are fed in: channels-last (NHWC, oneDNN's and cuDNN's native convolution
// layout) when the run asks for it, else as they come. One definition for the step's loop, evaluation and the
// planner's trials.
#pragma once
#include <ATen/ATen.h>

namespace keel::train {

inline at::Tensor to_layout(const at::Tensor& x, bool channels_last) {
  return channels_last ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
}

}  // namespace keel::train
