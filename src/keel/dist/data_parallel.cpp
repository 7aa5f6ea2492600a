// Bucketed, hook-driven gradient all-reduce (see data_parallel.h).
#include "keel/dist/data_parallel.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/torch.h>

#include <algorithm>
#include <fmt/format.h>

#include "keel/dist/group.h"

namespace keel::dist {

// What the hooks reach through: nulled when the DataParallel goes, so a later backward (evaluation,
// another trainer on the same model) finds no dangling pointer.
struct DataParallel::HookState {
  std::mutex mu;
  DataParallel* owner = nullptr;
};

nlohmann::json CommStats::to_json() const {
  return {{"steps", steps},
          {"buckets", buckets},
          {"bytes_per_step", bytes_per_step},
          {"allreduce_seconds", allreduce_seconds},
          {"overlapped_seconds", overlapped_seconds},
          {"exposed_seconds", exposed_seconds},
          {"overlap_share", allreduce_seconds > 0 ? overlapped_seconds / allreduce_seconds : 0.0}};
}

DataParallel::DataParallel(Comm& comm, torch::nn::Module& model, DataParallelOptions o)
    : comm_(comm), o_(o), hook_state_(std::make_shared<HookState>()) {
  {
    // The same starting point on every rank: rank 0's parameters and buffers (BatchNorm statistics).
    torch::NoGradGuard ng;
    int64_t i = 0;
    auto sync = [&](at::Tensor t, const char* kind) {
      at::Tensor c = t.contiguous();
      comm_.broadcast(c, 0, fmt::format("broadcast of {} {} from rank 0", kind, i++));
      if (!c.is_same(t)) t.copy_(c);
    };
    for (auto& p : model.parameters()) sync(p, "parameter");
    for (auto& b : model.buffers()) sync(b, "buffer");
  }
  for (auto& p : model.parameters()) if (p.requires_grad()) params_.push_back(p);
  std::vector<int64_t> bytes;
  std::vector<std::string> keys;
  for (auto& p : params_) {
    bytes.push_back(p.numel() * static_cast<int64_t>(p.element_size()));
    keys.push_back(p.device().str() + "/" + std::string(c10::toString(p.scalar_type())));
  }
  if (o_.bucket_mb <= 0) throw std::invalid_argument("dist.bucket_mb must be > 0");
  const auto cap = std::max<int64_t>(1, static_cast<int64_t>(o_.bucket_mb * 1024 * 1024));
  tracker_ = ReadyTracker(assign_buckets(bytes, keys, cap), params_.size());
  for (const auto& b : tracker_.buckets()) {
    int64_t n = 0;
    std::vector<int64_t> off;
    for (size_t p : b) {
      off.push_back(n);
      n += params_[p].numel();
    }
    offsets_.push_back(off);
    // After the gradients, one flag per parameter (see launch): the same all-reduce counts the ranks
    // that had a gradient for it, so no extra collective is needed to tell the unused ones.
    flag_offset_.push_back(n);
    flat_.push_back(at::empty({n + static_cast<int64_t>(b.size())}, params_[b.front()].options()));
    stats_.bytes_per_step += (n + static_cast<int64_t>(b.size())) * static_cast<int64_t>(params_[b.front()].element_size());
  }
  stats_.buckets = static_cast<int64_t>(flat_.size());
  pending_.resize(flat_.size());
  local_used_.assign(params_.size(), 0);
  hook_state_->owner = this;
  for (size_t i = 0; i < params_.size(); ++i) {
    auto acc = torch::autograd::impl::grad_accumulator(params_[i]);
    TORCH_INTERNAL_ASSERT(acc, "parameter without a gradient accumulator");
    std::weak_ptr<HookState> ws = hook_state_;
    acc->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [ws, i](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
          if (auto s = ws.lock()) {
            std::lock_guard<std::mutex> lk(s->mu);
            if (s->owner) s->owner->on_ready(i);
          }
          return outputs;
        }));
    // The parameter holds its accumulator weakly: keep it (and so the hook) alive.
    accumulators_.push_back(std::shared_ptr<void>(new decltype(acc)(acc), [](void* x) {
      delete static_cast<decltype(acc)*>(x);
    }));
  }
}

DataParallel::~DataParallel() {
  std::lock_guard<std::mutex> lk(hook_state_->mu);
  hook_state_->owner = nullptr;
}

void DataParallel::before_backward(bool reduce) {
  std::lock_guard<std::mutex> lk(mu_);
  if (!reduce) {
    armed_ = false;
    return;
  }
  tracker_.reset();
  std::fill(pending_.begin(), pending_.end(), nullptr);
  open_ = true;
  armed_ = o_.overlap;
}

void DataParallel::on_ready(size_t p) {
  std::lock_guard<std::mutex> lk(mu_);
  if (!armed_) return;
  for (size_t b : tracker_.mark_ready(p)) launch(b, false);
}

void DataParallel::launch(size_t b, bool zeros) {
  torch::NoGradGuard ng;
  const auto& bucket = tracker_.buckets()[b];
  at::Tensor& flat = flat_[b];
  // A parameter whose .grad is undefined now got no gradient on this rank in any micro-batch of the step
  // (its hook may still have fired, with an undefined gradient): it sends zeros and flag 0.
  at::Tensor flags = flat.narrow(0, flag_offset_[b], static_cast<int64_t>(bucket.size()));
  flags.fill_(1);  // one fill, then a zero for each unused parameter (usually none)
  for (size_t k = 0; k < bucket.size(); ++k) {
    const at::Tensor& p = params_[bucket[k]];
    at::Tensor slice = flat.narrow(0, offsets_[b][k], p.numel()).view(p.sizes());
    const at::Tensor& g = p.grad();
    const bool used = !zeros && g.defined();
    local_used_[bucket[k]] = used ? 1 : 0;
    if (used) {
      slice.copy_(g);
    } else {
      slice.zero_();
      flags[static_cast<int64_t>(k)].fill_(0);
    }
  }
  pending_[b] = comm_.allreduce_async(flat, fmt::format("all-reduce of gradient bucket {} of {}", b + 1, flat_.size()));
}

void DataParallel::wait_all() {
  for (auto& p : pending_) if (p) comm_.wait(*p);
}

void DataParallel::finish_gradients() {
  std::vector<std::shared_ptr<Pending>> sent;
  {
    std::lock_guard<std::mutex> lk(mu_);
    armed_ = false;
    if (!open_) {  // no before_backward(true): nothing sent yet this step
      tracker_.reset();
      std::fill(pending_.begin(), pending_.end(), nullptr);
    }
    backward_end_ = Comm::now_seconds();
    for (size_t b : tracker_.launch_rest()) launch(b, false);
    open_ = false;
    sent = pending_;
  }
  wait_all();
  const double done = Comm::now_seconds();
  torch::NoGradGuard ng;
  const double inv = 1.0 / static_cast<double>(comm_.world_size());
  const auto& buckets = tracker_.buckets();
  // Which parameters some rank had a gradient for. A parameter this rank used is used; the flags are read
  // back (one small device-to-host copy for all buckets) only in a step where this rank had a parameter
  // without a gradient, so the usual step, where every parameter is used, adds no host sync.
  std::vector<float> ranks_used;  // per bucket, per parameter (flattened in bucket order): sum of the flags
  if (std::find(local_used_.begin(), local_used_.end(), 0) != local_used_.end()) {
    std::vector<at::Tensor> f;
    for (size_t b = 0; b < buckets.size(); ++b) {
      f.push_back(flat_[b].narrow(0, flag_offset_[b], static_cast<int64_t>(buckets[b].size())).to(at::kFloat));
    }
    at::Tensor all = at::cat(f).to(at::kCPU).contiguous();
    ranks_used.assign(all.data_ptr<float>(), all.data_ptr<float>() + all.numel());
  }
  size_t flag = 0;
  for (size_t b = 0; b < buckets.size(); ++b) {
    flat_[b].mul_(inv);
    for (size_t k = 0; k < buckets[b].size(); ++k, ++flag) {
      at::Tensor& p = params_[buckets[b][k]];
      // Unused on every rank: .grad stays undefined, so the optimizer skips the parameter (no weight decay,
      // no momentum), as one process would. Unused here only: the average with this rank's zeros (DDP).
      if (!local_used_[buckets[b][k]] && !(ranks_used[flag] > 0)) continue;
      at::Tensor slice = flat_[b].narrow(0, offsets_[b][k], p.numel()).view(p.sizes());
      if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
      p.mutable_grad().copy_(slice);
    }
  }
  // Communication time: the union of the buckets' [launch, completion] intervals, and its part before
  // backward ended.
  std::vector<std::pair<double, double>> iv;
  for (auto& p : sent) {
    if (!p) continue;
    const double end = Comm::completed_at(*p) > 0 ? Comm::completed_at(*p) : done;
    iv.emplace_back(Comm::started_at(*p), end);
  }
  std::sort(iv.begin(), iv.end());
  double busy = 0, hidden = 0, cur_a = -1, cur_b = -1;
  auto close = [&] {
    if (cur_b <= cur_a) return;
    busy += cur_b - cur_a;
    hidden += std::max(0.0, std::min(cur_b, backward_end_) - cur_a);
  };
  for (auto& [a, e] : iv) {
    if (a > cur_b) {
      close();
      cur_a = a;
      cur_b = e;
    } else {
      cur_b = std::max(cur_b, e);
    }
  }
  close();
  stats_.steps += 1;
  stats_.allreduce_seconds += busy;
  stats_.overlapped_seconds += hidden;
  stats_.exposed_seconds += done - backward_end_;
}

void DataParallel::abandon_gradients() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    armed_ = false;
    if (!open_) {  // failed before its last backward: no bucket sent yet this step
      tracker_.reset();
      std::fill(pending_.begin(), pending_.end(), nullptr);
    }
    for (size_t b : tracker_.launch_rest()) launch(b, true);
    open_ = false;
  }
  wait_all();
}

void DataParallel::sum(at::Tensor& t, const char* what) {
  at::Tensor c = t.contiguous();
  comm_.allreduce(c, what);
  if (!c.is_same(t)) t.copy_(c);
}

}  // namespace keel::dist
