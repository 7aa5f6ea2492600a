// Synchronised BatchNorm forward and backward (see sync_bn.h).
#include "keel/dist/sync_bn.h"

#include <torch/torch.h>

namespace keel::dist {
namespace {

at::Tensor per_channel(const at::Tensor& v) { return v.view({1, -1, 1, 1}); }

// y = x_hat * w + b with x_hat = (x - mean) * invstd; mean and invstd are global (constants here: their
// dependence on every rank's x is in the backward's all-reduced terms).
struct SyncBatchNormFn : torch::autograd::Function<SyncBatchNormFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& b, const at::Tensor& mean, const at::Tensor& invstd, Comm* comm,
                            double count) {
    // x: (N, C, H, W); w, b, mean, invstd: (C)
    at::Tensor xf = x.to(at::kFloat);
    ctx->save_for_backward({xf, w, mean, invstd});
    ctx->saved_data["comm"] = reinterpret_cast<int64_t>(comm);
    ctx->saved_data["count"] = count;
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    // In LibTorch's CPU kernel's form (batch_norm_cpu_transform_input): y = x * alpha + beta, alpha =
    // invstd * w, beta = b - mean * alpha. The same rounding as one process keeps the outputs (and so the
    // ReLU decisions after them) identical wherever the statistics are.
    at::Tensor alpha = invstd * w, beta = b - mean * alpha;
    at::Tensor y = xf * per_channel(alpha) + per_channel(beta);
    return y.to(x.scalar_type());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &xf = saved[0], &w = saved[1], &mean = saved[2], &invstd = saved[3];
    auto* comm = reinterpret_cast<Comm*>(ctx->saved_data["comm"].toInt());
    const double count = ctx->saved_data["count"].toDouble();
    at::Tensor dy = grad_out[0].to(at::kFloat);
    // LibTorch's CPU kernel's form (batch_norm_cpu_backward): per channel sum(dy) and
    // dotp = sum((x - mean) * dy) accumulated in double; dx = ((dy - sum/N) - (x - mean) * dotp * invstd^2 / N)
    // * invstd * w, with sum and dotp over every rank.
    at::Tensor xc = xf - per_channel(mean);
    at::Tensor sum_dy = dy.sum({0, 2, 3}, false, at::kDouble), dotp = (xc * dy).sum({0, 2, 3}, false, at::kDouble);
    // The parameter gradients stay local (the gradient all-reduce averages them like any other).
    at::Tensor gw = (dotp * invstd).to(w.scalar_type()), gb = sum_dy.to(w.scalar_type());
    at::Tensor both = at::cat({sum_dy, dotp});
    comm->allreduce(both, "all-reduce of synchronised BatchNorm gradient terms");
    const int64_t c = mean.size(0);
    at::Tensor grad_mean = (both.narrow(0, 0, c) / count).to(at::kFloat);
    at::Tensor k = (both.narrow(0, c, c) * invstd * invstd / count).to(at::kFloat);
    at::Tensor dx = ((dy - per_channel(grad_mean)) - xc * per_channel(k)) * per_channel(invstd * w);
    return {dx.to(static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt())), gw, gb, at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor SyncBatchNorm::forward(torch::nn::BatchNorm2dImpl& bn, const at::Tensor& x) {
  // x: (N, C, H, W) -> (N, C, H, W)
  TORCH_CHECK(x.dim() == 4, "synchronised BatchNorm: expected a 4D input (got ", x.dim(), "D)");
  TORCH_CHECK(bn.options.affine(), "synchronised BatchNorm: only affine BatchNorms are supported");
  const int64_t ch = x.size(1);
  at::Tensor mean, var, invstd;
  double count = 0;
  {
    torch::NoGradGuard ng;
    at::Tensor xf = x.detach().to(at::kFloat);
    // Statistics accumulated in double (as LibTorch's CPU kernels do), applied in float.
    const auto dd = xf.options().dtype(at::kDouble);
    at::Tensor sums = at::cat({xf.sum({0, 2, 3}, false, at::kDouble), at::full({1}, static_cast<double>(x.numel() / ch), dd)});
    comm_.allreduce(sums, "all-reduce of synchronised BatchNorm sums");
    count = sums[ch].item<double>();
    TORCH_CHECK(count > 1, "synchronised BatchNorm: ", count, " values per channel over all ranks; need > 1");
    at::Tensor mean_d = sums.narrow(0, 0, ch) / count;
    mean = mean_d.to(at::kFloat);
    at::Tensor sq = (xf.to(at::kDouble) - per_channel(mean_d)).square().sum({0, 2, 3});
    comm_.allreduce(sq, "all-reduce of synchronised BatchNorm variances");
    var = sq / count;  // double
    invstd = (var + bn.options.eps()).rsqrt().to(at::kFloat);
    if (bn.options.track_running_stats()) {
      bn.num_batches_tracked += 1;
      const double m = bn.options.momentum() ? *bn.options.momentum()
                                              : 1.0 / static_cast<double>(bn.num_batches_tracked.item<int64_t>());
      bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.scalar_type()), m);
      bn.running_var.mul_(1 - m).add_((var * (count / (count - 1))).to(bn.running_var.scalar_type()), m);
    }
  }
  return SyncBatchNormFn::apply(x, bn.weight, bn.bias, mean, invstd, &comm_, count);
}

}  // namespace keel::dist
