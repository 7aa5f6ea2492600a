// ResNet implementation: torchvision's module tree (conv1, bn1, layerK.i.{conv,bn}J, downsample.{0,1}, fc)
// and initialisation (Kaiming-normal fan-out convs, unit BN weights).
#include "keel/models/resnet.h"

#include <torch/autograd.h>
#include <torch/torch.h>

#include "keel/compat/torch_compat.h"

#include "keel/models/norm.h"
#include "keel/models/watch.h"

#include <torch/nn/init.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/pooling.h>

namespace keel::models {
namespace {

constexpr int64_t kBottleneckExpansion = 4;

torch::nn::Conv2d conv(int64_t in, int64_t out, int64_t k, int64_t stride) {
  return torch::nn::Conv2d(
      torch::nn::Conv2dOptions(in, out, k).stride(stride).padding(k / 2).bias(false));
}

int64_t expansion(ResNetOptions::Block b) {
  return b == ResNetOptions::Block::kBottleneck ? kBottleneckExpansion : 1;
}

}  // namespace

ResBlockImpl::ResBlockImpl(ResNetOptions::Block kind, int64_t in_planes, int64_t planes,
                           int64_t stride, std::string path_)
    : bottleneck(kind == ResNetOptions::Block::kBottleneck),
      path(std::move(path_)),
      n_conv1(path + ".conv1"),
      n_bn1(path + ".bn1"),
      n_conv2(path + ".conv2"),
      n_bn2(path + ".bn2"),
      n_conv3(path + ".conv3"),
      n_bn3(path + ".bn3"),
      n_downsample(path + ".downsample") {
  const int64_t out_planes = planes * expansion(kind);
  if (bottleneck) {
    // torchvision (ResNet v1.5) puts the stride on the 3x3 conv.
    conv1 = register_module("conv1", conv(in_planes, planes, 1, 1));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(planes));
    conv2 = register_module("conv2", conv(planes, planes, 3, stride));
    bn2 = register_module("bn2", torch::nn::BatchNorm2d(planes));
    conv3 = register_module("conv3", conv(planes, out_planes, 1, 1));
    bn3 = register_module("bn3", torch::nn::BatchNorm2d(out_planes));
  } else {
    conv1 = register_module("conv1", conv(in_planes, planes, 3, stride));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(planes));
    conv2 = register_module("conv2", conv(planes, planes, 3, 1));
    bn2 = register_module("bn2", torch::nn::BatchNorm2d(planes));
  }
  if (stride != 1 || in_planes != out_planes) {
    downsample = register_module(
        "downsample",
        torch::nn::Sequential(conv(in_planes, out_planes, 1, stride), torch::nn::BatchNorm2d(out_planes)));
  }
}

at::Tensor ResBlockImpl::forward(at::Tensor x) {
  // x: (N, in_planes, H, W) -> (N, planes * expansion, H / stride, W / stride)
  if (folded) {  // BatchNorms live in the convs' weights and biases (fold_batchnorm)
    at::Tensor y = watch(n_bn1, conv1(x)).relu_();
    y = watch(n_bn2, conv2(y));
    if (bottleneck) y = watch(n_bn3, conv3(y.relu_()));
    at::Tensor identity = downsample ? watch(n_downsample, ds_conv(x)) : x;
    return watch(path, y.add_(identity).relu_());
  }
  at::Tensor y = watch(n_conv1, conv1(x));
  y = watch(n_bn1, batch_norm(*bn1, y)).relu_();
  y = watch(n_conv2, conv2(y));
  y = watch(n_bn2, batch_norm(*bn2, y));
  if (bottleneck) {
    y = watch(n_conv3, conv3(y.relu_()));
    y = watch(n_bn3, batch_norm(*bn3, y));
  }
  at::Tensor identity =
      downsample ? watch(n_downsample, batch_norm(*downsample[1]->as<torch::nn::BatchNorm2d>(),
                                                  downsample[0]->as<torch::nn::Conv2d>()->forward(x)))
                 : x;
  return watch(path, y.add_(identity).relu_());
}

ResNet::ResNet(const ResNetOptions& o) : opts(o) {
  TORCH_CHECK(o.layers.size() == o.widths.size() && !o.layers.empty(),
              "ResNet: layers and widths must have the same non-zero length");
  const int64_t stem = o.widths.front();
  conv1 = register_module("conv1", o.imagenet_stem ? conv(o.in_channels, stem, 7, 2)
                                                   : conv(o.in_channels, stem, 3, 1));
  bn1 = register_module("bn1", torch::nn::BatchNorm2d(stem));
  int64_t in_planes = stem;
  for (size_t s = 0; s < o.layers.size(); ++s) {
    torch::nn::Sequential stage;
    for (int64_t b = 0; b < o.layers[s]; ++b) {
      const int64_t stride = (s > 0 && b == 0) ? 2 : 1;
      stage->push_back(ResBlock(o.block, in_planes, o.widths[s], stride,
                                  "layer" + std::to_string(s + 1) + "." + std::to_string(b)));
      in_planes = o.widths[s] * expansion(o.block);
    }
    stages.push_back(register_module("layer" + std::to_string(s + 1), stage));
  }
  fc = register_module("fc", torch::nn::Linear(in_planes, o.num_classes));

  for (auto& m : modules(/*include_self=*/false)) {
    if (auto* c = m->as<torch::nn::Conv2d>()) {
      torch::nn::init::kaiming_normal_(c->weight, 0.0, torch::kFanOut, torch::kReLU);
    } else if (auto* bn = m->as<torch::nn::BatchNorm2d>()) {
      torch::nn::init::ones_(bn->weight);
      torch::nn::init::zeros_(bn->bias);
    }
  }
}

at::Tensor ResNet::forward(at::Tensor x) {
  // x: (N, C, H, W) float -> logits (N, num_classes)
  TORCH_CHECK(!(folded_ && is_training()), "ResNet: BatchNorms are folded into the convs (inference only); "
              "a folded model cannot train: build a fresh one");
  x = folded_ ? watch("bn1", conv1(x)).relu_() : watch("bn1", batch_norm(*bn1, watch("conv1", conv1(x)))).relu_();
  if (opts.imagenet_stem) {
    x = torch::nn::functional::max_pool2d(
        x, torch::nn::functional::MaxPool2dFuncOptions(3).stride(2).padding(1));
  }
  for (auto& stage : stages) x = opts.checkpoint_stages ? checkpointed_forward(stage, x) : stage->forward(x);
  x = x.mean({2, 3});  // (N, C_last)
  return watch("fc", fc_packed(x, fc->weight, fc->bias));
}

namespace {

// A conv with BN(conv) in it: w' = w * g / sqrt(var + eps) per output channel, b' = (b - mean) * g / sqrt(var + eps)
// + beta. A new module (the originals have no bias parameter to fill: LibTorch registers it undefined), computed in
// fp64 so the folded fp32 weights are the correctly rounded products.
torch::nn::Conv2d folded_conv(const torch::nn::Conv2dImpl& conv, const torch::nn::BatchNorm2dImpl& bn) {
  torch::NoGradGuard ng;
  const auto& o = conv.options;
  torch::nn::Conv2d out(torch::nn::Conv2dOptions(o.in_channels(), o.out_channels(), o.kernel_size())
                            .stride(o.stride())
                            .padding(o.padding())
                            .dilation(o.dilation())
                            .groups(o.groups())
                            .bias(true));
  out->to(conv.weight.device(), conv.weight.scalar_type());
  const at::Tensor scale = bn.weight.to(at::kDouble) / (bn.running_var.to(at::kDouble) + bn.options.eps()).sqrt();
  const at::Tensor w = conv.weight.to(at::kDouble) * scale.view({-1, 1, 1, 1});
  const at::Tensor b0 = conv.bias.defined() ? conv.bias.to(at::kDouble) : at::zeros_like(scale);
  const at::Tensor b = (b0 - bn.running_mean.to(at::kDouble)) * scale + bn.bias.to(at::kDouble);
  out->weight.set_data(w.to(conv.weight.scalar_type()).contiguous(conv.weight.suggest_memory_format()));
  out->bias.set_data(b.to(conv.weight.scalar_type()));
  return out;
}

}  // namespace

int64_t ResNet::fold_batchnorm() {
  TORCH_CHECK(!is_training(), "fold_batchnorm: the model is in training mode; folding uses the running statistics, "
              "which only eval mode uses (call eval() first)");
  if (folded_) return 0;
  int64_t n = 0;
  // The folded convs replace the originals under the same names (state dict: convK.weight + new convK.bias);
  // the BatchNorms stay registered but the forward no longer calls them.
  conv1 = replace_module("conv1", folded_conv(*conv1, *bn1));
  ++n;
  for (auto& stage : stages) {
    for (const auto& child : stage->children()) {
      auto* blk = child->as<ResBlockImpl>();
      blk->conv1 = blk->replace_module("conv1", folded_conv(*blk->conv1, *blk->bn1));
      blk->conv2 = blk->replace_module("conv2", folded_conv(*blk->conv2, *blk->bn2));
      n += 2;
      if (blk->bottleneck) {
        blk->conv3 = blk->replace_module("conv3", folded_conv(*blk->conv3, *blk->bn3));
        ++n;
      }
      if (blk->downsample) {
        auto c = std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(blk->downsample->ptr(0));
        auto bn = std::dynamic_pointer_cast<torch::nn::BatchNorm2dImpl>(blk->downsample->ptr(1));
        blk->ds_conv = blk->downsample->replace_module("0", folded_conv(*c, *bn));
        ++n;
      }
      blk->folded = true;
    }
  }
  folded_ = true;
  return n;
}

namespace {

// The autograd node of checkpointed_forward. Non-tensor arguments (the stage) pass through apply.
struct StageCheckpoint : torch::autograd::Function<StageCheckpoint> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor x, torch::nn::SequentialImpl* stage) {
    // Runs with gradients off (Function::apply): no activation of the stage is saved.
    ctx->save_for_backward({x});
    ctx->saved_data["stage"] = reinterpret_cast<int64_t>(stage);
    const at::DeviceType dt = x.device().type();
    const bool ac = (dt == at::kCPU || dt == at::kCUDA) && compat::AutocastGuard::is_enabled(dt);
    ctx->saved_data["autocast"] = ac;
    ctx->saved_data["autocast_dtype"] = static_cast<int64_t>(ac ? compat::AutocastGuard::get_dtype(dt) : at::kFloat);
    return stage->forward(x);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto* stage = reinterpret_cast<torch::nn::SequentialImpl*>(ctx->saved_data["stage"].toInt());
    const at::Tensor x = ctx->get_saved_variables()[0];
    at::Tensor xd = x.detach().requires_grad_(x.requires_grad());
    // The forward already updated the BatchNorm running statistics; the recomputation must not again.
    std::vector<at::Tensor> buffers = stage->buffers(), saved;
    for (const auto& b : buffers) saved.push_back(b.detach().clone());
    at::Tensor out;
    {
      torch::AutoGradMode grad_on(true);
      const at::DeviceType dt = x.device().type();
      std::optional<compat::AutocastGuard> ac;
      if (ctx->saved_data["autocast"].toBool()) {
        ac.emplace(dt, true, static_cast<at::ScalarType>(ctx->saved_data["autocast_dtype"].toInt()));
      }
      out = stage->forward(xd);
    }
    // Re-entrant backward through the recomputed stage: parameter gradients accumulate as usual.
    // (The statistics are put back only after it: BatchNorm's backward checks they are unmodified.)
    torch::autograd::backward({out}, {grad_out[0]});
    {
      torch::NoGradGuard ng;
      for (size_t i = 0; i < buffers.size(); ++i) buffers[i].copy_(saved[i]);
    }
    return {xd.requires_grad() ? xd.grad() : at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor checkpointed_forward(torch::nn::Sequential& stage, const at::Tensor& x) {
  if (!torch::GradMode::is_enabled() || !x.requires_grad()) return stage->forward(x);
  return StageCheckpoint::apply(x, stage.get());
}

double ResNet::macs_per_image(int64_t height, int64_t width) const {
  // Convolutions and fc only (BN/ReLU/add are memory-bound and small in FLOPs).
  auto out = [](int64_t n, int64_t k, int64_t s) { return (n + 2 * (k / 2) - k) / s + 1; };
  double macs = 0;
  int64_t h = height, w = width;
  auto conv_macs = [&](const torch::nn::Conv2d& c, int64_t& hh, int64_t& ww) {
    const auto& co = c->options;
    const int64_t k = co.kernel_size()->at(0), s = co.stride()->at(0);
    hh = out(hh, k, s);
    ww = out(ww, k, s);
    macs += double(co.in_channels()) * co.out_channels() * k * k * hh * ww;
  };
  conv_macs(conv1, h, w);
  if (opts.imagenet_stem) {
    h = out(h, 3, 2);
    w = out(w, 3, 2);
  }
  for (const auto& stage : stages) {
    for (const auto& child : stage->children()) {
      const auto* blk = child->as<ResBlockImpl>();
      int64_t bh = h, bw = w;
      conv_macs(blk->conv1, bh, bw);
      conv_macs(blk->conv2, bh, bw);
      if (blk->bottleneck) conv_macs(blk->conv3, bh, bw);
      if (blk->downsample) {
        int64_t dh = h, dw = w;
        conv_macs(torch::nn::Conv2d(
                      std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(blk->downsample->ptr(0))),
                  dh, dw);
      }
      h = bh;
      w = bw;
    }
  }
  macs += double(fc->options.in_features()) * fc->options.out_features();
  return macs;
}

std::optional<ResNetOptions> resnet_options(const std::string& name) {
  using B = ResNetOptions::Block;
  ResNetOptions o;
  if (name == "resnet18") { o.block = B::kBasic; o.layers = {2, 2, 2, 2}; }
  else if (name == "resnet34") { o.block = B::kBasic; o.layers = {3, 4, 6, 3}; }
  else if (name == "resnet50") { o.block = B::kBottleneck; o.layers = {3, 4, 6, 3}; }
  else if (name == "resnet101") { o.block = B::kBottleneck; o.layers = {3, 4, 23, 3}; }
  else if (name == "resnet152") { o.block = B::kBottleneck; o.layers = {3, 8, 36, 3}; }
  else {
    // CIFAR family: depth = 6n + 2.
    static const std::vector<std::pair<std::string, int64_t>> cifar = {
        {"resnet20", 3}, {"resnet32", 5}, {"resnet44", 7}, {"resnet56", 9}, {"resnet110", 18}};
    for (const auto& [n, blocks] : cifar) {
      if (n == name) {
        o.block = B::kBasic;
        o.layers = {blocks, blocks, blocks};
        o.widths = {16, 32, 64};
        o.imagenet_stem = false;
        return o;
      }
    }
    return std::nullopt;
  }
  return o;
}

}  // namespace keel::models
