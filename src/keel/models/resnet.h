// ResNets with torchvision's layout and parameter names: ImageNet-style resnet18..152 and
// CIFAR-style resnet20..110 (3 stages of 16/32/64 channels, 3x3 stem, no max-pool).
#pragma once
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/pooling.h>
#include <optional>
#include "keel/models/net.h"
#include "keel/models/packed_linear.h"

namespace keel::models {

struct ResNetOptions {
  enum class Block { kBasic, kBottleneck };
  Block block = Block::kBasic;
  std::vector<int64_t> layers = {2, 2, 2, 2};   // blocks per stage
  std::vector<int64_t> widths = {64, 128, 256, 512};  // planes per stage
  bool imagenet_stem = true;  // 7x7/2 conv + 3x3/2 max-pool; false: 3x3/1 conv (CIFAR)
  int64_t in_channels = 3;
  int64_t num_classes = 1000;
  // Activation checkpointing: each stage (layer1..N) keeps only its input during the forward and
  // recomputes its activations in the backward (memory for compute; model.checkpoint_stages).
  bool checkpoint_stages = false;
};

// One residual block (basic: two 3x3 convs; bottleneck: 1x1, 3x3, 1x1 with expansion 4).
struct ResBlockImpl : torch::nn::Module {
  // `path` is the block's state-dict prefix ("layer2.0"), used to name watched outputs.
  ResBlockImpl(ResNetOptions::Block kind, int64_t in_planes, int64_t planes, int64_t stride, std::string path);
  at::Tensor forward(at::Tensor x);

  bool bottleneck;
  std::string path;
  // Watch-point names, built once: forward runs every step and must not allocate strings.
  std::string n_conv1, n_bn1, n_conv2, n_bn2, n_conv3, n_bn3, n_downsample;
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, bn3{nullptr};
  torch::nn::Sequential downsample{nullptr};
  bool folded = false;  // BatchNorms folded into the convs (fold_batchnorm): forward skips them
  torch::nn::Conv2d ds_conv{nullptr};  // once folded: downsample.0, the conv with the BatchNorm in it
};
TORCH_MODULE(ResBlock);

// The network: stem -> stages (layer1..layerN) -> global average pool -> fc.
struct ResNet : Net {
  explicit ResNet(const ResNetOptions& o);
  at::Tensor forward(at::Tensor x) override;
  double macs_per_image(int64_t height, int64_t width) const override;
  // Eval-time conv-BatchNorm folding: each BatchNorm's running statistics and affine parameters go into the
  // weight and (new) bias of the conv before it, and the forward skips the BatchNorms. For inference only:
  // the model must be in eval mode, its state dict gains conv biases, and training it afterwards is refused.
  // Returns the number of BatchNorms folded (0 when already folded).
  int64_t fold_batchnorm();
  bool folded() const { return folded_; }
  // The fc layer (the convs are not packed): 1.
  int64_t pack_linear_weights() override { return fc_packed.pack(fc->weight); }

  ResNetOptions opts;
  torch::nn::Conv2d conv1{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr};
  std::vector<torch::nn::Sequential> stages;
  torch::nn::Linear fc{nullptr};
  PackedLinear fc_packed;

 private:
  bool folded_ = false;
};

// Runs `stage` on x with activation checkpointing: the forward keeps no activations of the stage;
// the backward recomputes them (under the forward's autocast state, with the stage's BatchNorm
// statistics put back so they are updated once) and back-propagates through the recomputation.
// Without gradient mode, or when x does not require grad, it is a plain forward.
at::Tensor checkpointed_forward(torch::nn::Sequential& stage, const at::Tensor& x);

// ResNet options for a registered name (resnet18/34/50/101/152, resnet20/32/44/56/110); nullopt if unknown.
std::optional<ResNetOptions> resnet_options(const std::string& name);

}  // namespace keel::models
