// The optimizer step: loss-scaler rule, non-finite guard (skip, locate, roll back, stop),
// injection, micro-batch equivalence, EMA and early stopping.
#include <gtest/gtest.h>
#include <gmock/gmock.h>

#include <torch/torch.h>

#include "keel/memory/cpu_allocator.h"
#include "keel/models/registry.h"
#include "keel/train/early_stopping.h"
#include "keel/train/ema.h"
#include "keel/train/loss_scaler.h"
#include "keel/train/optimizer.h"
#include "keel/train/step.h"

using namespace keel::train;
using testing::HasSubstr;

TEST(LossScaler, FollowsGradScalerRuleTable) {
  // GradScaler's documented rule with init 4, growth 2, backoff 0.5, interval 3.
  LossScalerOptions o;
  o.enabled = true;
  o.init_scale = 4;
  o.growth_factor = 2;
  o.backoff_factor = 0.5;
  o.growth_interval = 3;
  LossScaler s(o);
  const std::vector<int> found_inf = {0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0};
  const std::vector<double> scale = {4, 4, 8, 8, 4, 4, 4, 8, 4, 2, 2, 2, 4};
  const std::vector<int> tracker = {1, 2, 0, 1, 0, 1, 2, 0, 0, 0, 1, 2, 0};
  for (size_t i = 0; i < found_inf.size(); ++i) {
    s.update(at::full({}, static_cast<float>(found_inf[i])));
    EXPECT_EQ(s.scale_value(), scale[i]) << "after update " << i;
    EXPECT_EQ(s.growth_tracker(), tracker[i]) << "after update " << i;
  }
}

TEST(LossScaler, ScaleUnscaleAndDetectNonFinite) {
  LossScalerOptions o;
  o.enabled = true;
  o.init_scale = 8;
  LossScaler s(o);
  EXPECT_FLOAT_EQ(s.scale(at::full({}, 2.0f)).item<float>(), 16.0f);
  std::vector<at::Tensor> g = {at::full({3}, 8.0f), at::full({2}, 16.0f)};
  EXPECT_EQ(s.unscale_(g).item<float>(), 0.0f);
  EXPECT_TRUE(at::allclose(g[0], at::full({3}, 1.0f)));
  EXPECT_TRUE(at::allclose(g[1], at::full({2}, 2.0f)));
  g[1][0] = std::numeric_limits<float>::infinity();
  EXPECT_EQ(s.unscale_(g).item<float>(), 1.0f);
  g[1][0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(s.unscale_(g).item<float>(), 1.0f);
}

TEST(LossScaler, StateRoundTripAndDisabled) {
  LossScalerOptions o;
  o.enabled = true;
  o.growth_interval = 2;
  LossScaler a(o);
  a.update(at::zeros({}));
  a.update(at::ones({}));
  a.update(at::zeros({}));
  LossScaler b(o);
  b.load_state(a.state());
  EXPECT_EQ(b.scale_value(), a.scale_value());
  EXPECT_EQ(b.growth_tracker(), a.growth_tracker());
  o.enabled = false;
  LossScaler off(o);
  EXPECT_EQ(off.scale_value(), 1.0);
  off.update(at::ones({}));
  EXPECT_EQ(off.scale_value(), 1.0);
}

namespace {

struct Fixture {
  keel::models::NetPtr model;
  std::unique_ptr<torch::optim::Optimizer> opt;
  at::Tensor x, y;
  explicit Fixture(uint64_t seed = 0) {
    torch::manual_seed(seed);
    model = keel::models::create({"resnet20", 1, 10});
    OptimizerOptions oo;
    oo.lr = 0.05;
    opt = make_optimizer(*model, oo);
    x = at::randn({8, 1, 12, 12});
    y = at::randint(0, 10, {8}, at::kLong);
  }
  std::vector<at::Tensor> weights() const {
    std::vector<at::Tensor> w;
    for (auto& p : model->parameters()) w.push_back(p.detach().clone());
    return w;
  }
};

bool same(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  for (size_t i = 0; i < a.size(); ++i) if (!at::equal(a[i], b[i])) return false;
  return true;
}

StepOptions injecting(std::vector<int64_t> steps, std::string where) {
  StepOptions o;
  o.inject.steps = std::move(steps);
  o.inject.where = std::move(where);
  return o;
}

// The guard's events of one step, as "skip" or "skip,rollback", and their messages joined.
std::string kinds(const StepResult& r) {
  std::string k;
  for (const auto& g : r.guard) k += (k.empty() ? "" : ",") + g.kind;
  return k;
}
std::string messages(const StepResult& r) {
  std::string m;
  for (const auto& g : r.guard) m += g.message + "\n";
  return m;
}

}  // namespace

TEST(Guard, InjectedNaNInLossIsSkippedAndLocated) {
  Fixture f;
  StepRunner r(*f.model, *f.opt, injecting({2}, "loss"), [](int64_t) { return 0.05; });
  EXPECT_TRUE(r.run(f.x, f.y).applied);
  auto before = f.weights();
  StepResult s = r.run(f.x, f.y);
  EXPECT_FALSE(s.applied);
  EXPECT_EQ(kinds(s), "skip");
  EXPECT_THAT(messages(s), HasSubstr("step 2 (attempt 2) skipped: non-finite loss"));
  EXPECT_THAT(messages(s), HasSubstr("the loss"));
  EXPECT_TRUE(same(before, f.weights())) << "a skipped step must not change the weights";
  EXPECT_EQ(r.steps(), 1) << "the step counter does not advance on a skip";
  EXPECT_TRUE(r.run(f.x, f.y).applied);
  EXPECT_EQ(r.steps(), 2);
  EXPECT_EQ(r.skipped(), 1);
}

TEST(Step, ScheduledRateScalesEveryGroupByItsFactor) {
  Fixture f;
  StepOptions o;
  o.group_lr_factors = {1.0, 0.1};
  StepRunner r(*f.model, *f.opt, o, [](int64_t s) { return 0.05 / static_cast<double>(s + 1); });
  for (int64_t s = 0; s < 3; ++s) {
    StepResult res = r.run(f.x, f.y);
    ASSERT_TRUE(res.applied);
    EXPECT_DOUBLE_EQ(res.lr, 0.05 / static_cast<double>(s + 1));
    EXPECT_DOUBLE_EQ(f.opt->param_groups()[0].options().get_lr(), res.lr);
    EXPECT_DOUBLE_EQ(f.opt->param_groups()[1].options().get_lr(), res.lr * 0.1);
  }
}

TEST(Guard, InjectedNaNInGradientIsLocatedInBackward) {
  Fixture f;
  StepRunner r(*f.model, *f.opt, injecting({1}, "grad"), [](int64_t) { return 0.05; });
  auto before = f.weights();
  StepResult s = r.run(f.x, f.y);
  EXPECT_FALSE(s.applied);
  EXPECT_THAT(messages(s), HasSubstr("non-finite gradient"));
  EXPECT_THAT(messages(s), HasSubstr("backward output of 'conv1'"));
  EXPECT_TRUE(same(before, f.weights()));
}

TEST(Guard, InjectedNaNInModuleOutputIsLocatedByName) {
  Fixture f;
  StepRunner r(*f.model, *f.opt, injecting({1}, "layer2.0.conv1"), [](int64_t) { return 0.05; });
  StepResult s = r.run(f.x, f.y);
  EXPECT_FALSE(s.applied);
  EXPECT_THAT(messages(s), HasSubstr("forward output of 'layer2.0.conv1'"));
  // BatchNorm statistics are restored after the skipped step (and its replay): all finite.
  for (auto& b : f.model->buffers()) EXPECT_TRUE(b.isfinite().all().item<bool>());
  EXPECT_TRUE(r.run(f.x, f.y).applied);
}

TEST(Guard, RollsBackAfterKSkipsAndStopsAfterRRollbacks) {
  Fixture f;
  StepOptions o = injecting({4, 5, 6, 7, 8, 9, 10, 11, 12, 13}, "loss");
  o.guard.max_consecutive_skips = 2;
  o.guard.max_rollbacks = 2;
  o.guard.snapshot_every = 1;
  o.guard.locate = false;
  StepRunner r(*f.model, *f.opt, o, [](int64_t) { return 0.05; });
  EXPECT_TRUE(r.run(f.x, f.y).applied);
  EXPECT_TRUE(r.run(f.x, f.y).applied);
  auto good = f.weights();  // verified by the healthy loss of step 3, so step 3 snapshots it
  EXPECT_TRUE(r.run(f.x, f.y).applied);
  EXPECT_EQ(kinds(r.run(f.x, f.y)), "skip");
  StepResult rb = r.run(f.x, f.y);
  EXPECT_EQ(kinds(rb), "skip,rollback");
  EXPECT_THAT(messages(rb), HasSubstr("restored the state of step 2"));
  EXPECT_DOUBLE_EQ(r.state().at("lr_scale").get<double>(), 0.5);
  EXPECT_TRUE(same(good, f.weights()));
  EXPECT_EQ(kinds(r.run(f.x, f.y)), "skip");
  EXPECT_EQ(kinds(r.run(f.x, f.y)), "skip,rollback");
  EXPECT_DOUBLE_EQ(r.state().at("lr_scale").get<double>(), 0.25);
  EXPECT_EQ(kinds(r.run(f.x, f.y)), "skip");
  try {
    r.run(f.x, f.y);
    FAIL() << "expected TrainingDiverged";
  } catch (const TrainingDiverged& e) {
    EXPECT_THAT(e.what(), HasSubstr("training diverged"));
    EXPECT_THAT(e.what(), HasSubstr("step 4 (attempt 4) skipped"));
  }
}

TEST(Guard, ScalerBacksOffOnNonFiniteStep) {
  Fixture f;
  StepOptions o = injecting({2}, "loss");
  o.scaler.enabled = true;
  o.scaler.init_scale = 1024;
  StepRunner r(*f.model, *f.opt, o, [](int64_t) { return 0.05; });
  EXPECT_TRUE(r.run(f.x, f.y).applied);
  EXPECT_EQ(r.scaler().scale_value(), 1024);
  EXPECT_FALSE(r.run(f.x, f.y).applied);
  EXPECT_EQ(r.scaler().scale_value(), 512);
}

TEST(Step, ScaledStepEqualsUnscaledStep) {
  // With a power-of-two scale, unscaling is exact: the update is the same as without scaling.
  Fixture a(3), b(3);
  StepOptions scaled;
  scaled.scaler.enabled = true;
  scaled.scaler.init_scale = 256;
  StepRunner ra(*a.model, *a.opt, scaled, [](int64_t) { return 0.05; });
  StepRunner rb(*b.model, *b.opt, StepOptions{}, [](int64_t) { return 0.05; });
  for (int i = 0; i < 3; ++i) {
    ra.run(a.x, a.y);
    rb.run(b.x, b.y);
  }
  auto wa = a.weights(), wb = b.weights();
  for (size_t i = 0; i < wa.size(); ++i) EXPECT_TRUE(at::allclose(wa[i], wb[i], 1e-5, 1e-6)) << i;
}

TEST(Step, MicroBatchesEqualOneBatchWithoutBatchStatistics) {
  // In eval mode BatchNorm uses running statistics, so the model has no batch dependence and
  // accumulation over micro-batches must give the full batch's update.
  Fixture a(5), b(5);
  a.model->eval();
  b.model->eval();
  StepOptions micro;
  micro.micro_batch = 3;  // 8 = 3 + 3 + 2: uneven split weighted by size
  StepRunner ra(*a.model, *a.opt, micro, [](int64_t) { return 0.05; });
  StepRunner rb(*b.model, *b.opt, StepOptions{}, [](int64_t) { return 0.05; });
  for (int i = 0; i < 3; ++i) {
    ra.run(a.x, a.y);
    rb.run(b.x, b.y);
  }
  auto wa = a.weights(), wb = b.weights();
  for (size_t i = 0; i < wa.size(); ++i) EXPECT_LT((wa[i] - wb[i]).abs().max().item<double>(), 1e-5) << i;
}

TEST(Step, ClipNormBoundsTheUpdate) {
  Fixture f;
  StepOptions o;
  o.clip_norm = 1e-3;
  auto before = f.weights();
  torch::optim::SGD plain(f.model->parameters(), torch::optim::SGDOptions(1.0));
  StepRunner r(*f.model, plain, o, [](int64_t) { return 1.0; });
  StepResult s = r.run(f.x, f.y);
  ASSERT_TRUE(s.applied);
  EXPECT_GT(s.grad_norm.item<double>(), 1e-3) << "the norm before clipping is reported";
  double sq = 0;
  auto after = f.weights();
  for (size_t i = 0; i < after.size(); ++i) sq += (after[i] - before[i]).pow(2).sum().item<double>();
  EXPECT_NEAR(std::sqrt(sq), 1e-3, 1e-5) << "plain SGD with lr 1: the update is the clipped gradient";
}

TEST(Ema, AveragesParametersAndCopiesBuffers) {
  auto m = keel::models::create({"resnet20", 1, 10});
  auto shadow = keel::models::create({"resnet20", 1, 10});
  Ema ema(shadow, *m, 0.9);
  auto p0 = m->parameters()[0].detach().clone();
  {
    torch::NoGradGuard ng;
    m->parameters()[0].add_(1.0);
    m->buffers()[0].fill_(3.0);
  }
  ema.update(*m);
  EXPECT_TRUE(at::allclose(ema.model().parameters()[0], p0 + 0.1, 1e-5, 1e-6));
  EXPECT_TRUE(at::equal(ema.model().buffers()[0], m->buffers()[0]));
}

TEST(EarlyStopping, StopsAtTheRightEpochOnScriptedMetrics) {
  EarlyStoppingOptions o;
  o.mode = "min";
  o.patience = 3;
  o.min_delta = 0.01;
  EarlyStopping es(o);
  const std::vector<double> losses = {1.0, 0.8, 0.795, 0.9, 0.85, 0.7};
  std::vector<bool> stops;
  for (double l : losses) {
    stops.push_back(es.update(l));
    if (stops.back()) break;
  }
  // 0.795 is not better than 0.8 by more than 0.01: bad epochs at indices 2, 3, 4 -> stop at 4.
  EXPECT_EQ(stops, (std::vector<bool>{false, false, false, false, true}));
  EXPECT_EQ(es.best_index(), 1);
  EXPECT_DOUBLE_EQ(es.best(), 0.8);

  o.mode = "max";
  o.patience = 1;
  o.min_delta = 0;
  EarlyStopping up(o);
  EXPECT_FALSE(up.update(0.5));
  EXPECT_FALSE(up.update(0.6));
  EXPECT_TRUE(up.update(std::nan("")));  // NaN is never an improvement
  EarlyStopping copy(o);
  copy.load_state(up.state());
  EXPECT_EQ(copy.best(), 0.6);
  EXPECT_EQ(copy.best_index(), 1);
}

TEST(OomRecovery, InjectedOomReplaysTheSameSamplesWithHalfTheMicroBatch) {
  // Eval-mode BatchNorm: no batch dependence, so the recovered run must equal a clean one.
  Fixture a(7), b(7);
  a.model->eval();
  b.model->eval();
  StepOptions oom;
  oom.inject.oom_steps = {2};
  StepRunner ra(*a.model, *a.opt, oom, [](int64_t) { return 0.05; });
  StepRunner rb(*b.model, *b.opt, StepOptions{}, [](int64_t) { return 0.05; });
  for (int i = 0; i < 3; ++i) {
    StepResult s = ra.run(a.x, a.y);
    EXPECT_TRUE(s.applied);
    EXPECT_EQ(s.samples, 8);
    if (i == 1) {
      ASSERT_EQ(s.notes.size(), 1u);
      EXPECT_THAT(s.notes[0], HasSubstr("replaying the same 8 samples with micro-batch 4"));
    }
    rb.run(b.x, b.y);
  }
  EXPECT_EQ(ra.micro_batch(), 4) << "the new micro-batch is kept";
  EXPECT_EQ(ra.oom_recoveries(), 1);
  EXPECT_EQ(ra.steps(), 3);
  auto wa = a.weights(), wb = b.weights();
  for (size_t i = 0; i < wa.size(); ++i) EXPECT_LT((wa[i] - wb[i]).abs().max().item<double>(), 1e-5) << i;
}

TEST(OomRecovery, RealBudgetOomShrinksMicroBatchAndLeaksNothing) {
  namespace mem = keel::memory;
  mem::install_cpu_allocator();
  mem::set_cpu_budget(std::nullopt);
  Fixture f(11);
  at::Tensor x = at::randn({64, 1, 28, 28}), y = at::randint(0, 10, {64}, at::kLong);
  auto peak_of = [&](int64_t micro) {
    Fixture g(11);
    StepOptions o;
    o.micro_batch = micro;
    StepRunner r(*g.model, *g.opt, o, [](int64_t) { return 0.01; });
    r.run(x, y);  // optimizer state allocated
    const int64_t base = mem::cpu_stats().current;
    mem::reset_peak();
    r.run(x, y);
    return mem::cpu_stats().peak - base;
  };
  const int64_t p64 = peak_of(64), p8 = peak_of(8);
  ASSERT_GT(p64, p8 * 2) << "activations dominate a step's memory";
  StepOptions o;
  StepRunner r(*f.model, *f.opt, o, [](int64_t) { return 0.01; });
  r.run(x, y);
  const int64_t base = mem::cpu_stats().current;
  mem::set_cpu_budget(base + (p64 + p8) / 2);
  StepResult s = r.run(x, y);
  const int64_t after = mem::cpu_stats().current;
  mem::set_cpu_budget(std::nullopt);
  EXPECT_TRUE(s.applied);
  EXPECT_GE(r.oom_recoveries(), 1);
  EXPECT_LT(r.micro_batch(), 64);
  EXPECT_GE(r.micro_batch(), 8);
  EXPECT_LE(after, base + 4096) << "nothing of the failed attempts stays allocated";
}

TEST(Guard, LossSpikeIsSkippedBeforeItTurnsNonFinite) {
  Fixture f;
  StepOptions o;
  o.guard.spike_factor = 10;
  o.guard.spike_warmup = 2;
  o.guard.snapshot_every = 1;
  o.guard.max_consecutive_skips = 2;
  // The 4th applied step uses a huge learning rate: the next loss explodes (finite).
  StepRunner r(*f.model, *f.opt, o, [](int64_t s) { return s == 3 ? 1e4 : 0.01; });
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(r.run(f.x, f.y).applied) << i;
  StepResult s = r.run(f.x, f.y);
  EXPECT_FALSE(s.applied);
  EXPECT_THAT(messages(s), HasSubstr("loss spike"));
  // Located: the first module whose output grew > 10x between step 3's weights and the current ones.
  EXPECT_THAT(messages(s), testing::ContainsRegex("started at: forward output of '[a-z0-9.]+' grew [0-9.e+]+x over the "
                                                  "last good weights .*compared with the weights of step 3"));
  StepResult rb = r.run(f.x, f.y);
  EXPECT_EQ(kinds(rb), "skip,rollback");
  EXPECT_THAT(messages(rb), HasSubstr("restored the state of step 3")) << "the state before the bad update";
}

TEST(Locator, FirstGrowthNamesTheFirstModuleAboveTheFactorElseTheLargest) {
  auto record = [](std::vector<std::pair<std::string, float>> outs) {
    auto rec = std::make_unique<MagnitudeRecorder>();
    for (auto& [m, v] : outs) rec->on_output(m, at::full({2, 3}, -v));
    return rec;
  };
  auto good = record({{"conv1", 1}, {"layer1.0.conv1", 2}, {"layer1.0.conv2", 4}, {"fc", 8}});
  auto bad = record({{"conv1", 3}, {"layer1.0.conv1", 60}, {"layer1.0.conv2", 4e3}, {"fc", 8e5}});
  auto at10 = first_growth(*good, *bad, 10);
  ASSERT_TRUE(at10);
  EXPECT_EQ(at10->module, "layer1.0.conv1");
  EXPECT_DOUBLE_EQ(at10->growth, 30);
  EXPECT_THAT(at10->str(), HasSubstr("forward output of 'layer1.0.conv1' grew 30x over the last good weights "
                                     "(|x| max 60, was 2)"));
  auto most = first_growth(*good, *bad, 1e6);
  ASSERT_TRUE(most);
  EXPECT_EQ(most->module, "fc") << "none above the factor: the one that grew most";
  EXPECT_FALSE(first_growth(MagnitudeRecorder{}, *bad, 10));
}

// ---- Issue 20: loss-scale overflows, rollback state, clipping order, out-of-memory in the replay ----

namespace {

StepOptions scaled_injecting(std::vector<int64_t> steps, std::string where, double init_scale) {
  StepOptions o = injecting(std::move(steps), std::move(where));
  o.scaler.enabled = true;
  o.scaler.init_scale = init_scale;
  return o;
}

std::vector<int64_t> attempts_range(int64_t first, int64_t last) {
  std::vector<int64_t> v;
  for (int64_t a = first; a <= last; ++a) v.push_back(a);
  return v;
}

std::vector<at::Tensor> clones(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> c;
  for (const auto& t : ts) c.push_back(t.detach().clone());
  return c;
}

// SGD's momentum buffers, in parameter order (undefined where a parameter has no state yet).
std::vector<at::Tensor> momenta(torch::optim::Optimizer& opt, keel::models::Net& m) {
  std::vector<at::Tensor> out;
  for (auto& p : m.parameters()) {
    auto it = opt.state().find(p.unsafeGetTensorImpl());
    out.push_back(it == opt.state().end()
                      ? at::Tensor()
                      : static_cast<torch::optim::SGDParamState&>(*it->second).momentum_buffer().clone());
  }
  return out;
}

bool same_defined(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].defined() != b[i].defined()) return false;
    if (a[i].defined() && !at::equal(a[i], b[i])) return false;
  }
  return true;
}

}  // namespace

TEST(Guard, ScalerOverflowsBackOffWithoutGuardSkipsOrRollbacks) {
  // 17 consecutive gradient overflows under a finite loss (what fp16 does at 65536, 32768, ...): the scaler's
  // business. Before the fix each one was a guard skip with a locator replay, and every 3 a rollback.
  Fixture f;
  StepOptions o = scaled_injecting(attempts_range(2, 18), "grad", 65536);
  StepRunner r(*f.model, *f.opt, o, [](int64_t) { return 0.05; });
  ASSERT_TRUE(r.run(f.x, f.y).applied);
  for (int64_t a = 2; a <= 18; ++a) {
    auto before = f.weights();
    StepResult s = r.run(f.x, f.y);
    EXPECT_FALSE(s.applied) << a;
    EXPECT_TRUE(s.overflow) << a;
    EXPECT_TRUE(s.guard.empty()) << "attempt " << a << ": " << messages(s);
    EXPECT_TRUE(same(before, f.weights())) << "an overflowed step changes no weight (attempt " << a << ")";
  }
  EXPECT_EQ(r.overflows(), 17);
  EXPECT_EQ(r.skipped(), 0) << "overflows are not guard skips";
  EXPECT_EQ(r.rollbacks(), 0);
  EXPECT_DOUBLE_EQ(r.state().at("lr_scale").get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(r.scaler().scale_value(), 65536.0 / 131072.0) << "backed off 17 times: 2^16 x 2^-17";
  EXPECT_TRUE(r.events().empty());
  StepResult next = r.run(f.x, f.y);
  EXPECT_TRUE(next.applied);
  EXPECT_EQ(r.steps(), 2);
}

TEST(Guard, ScalerOverflowIsNotFatalWithTheGuardOff) {
  Fixture f;
  StepOptions o = scaled_injecting({1}, "grad", 1024);
  o.guard.enabled = false;
  StepRunner r(*f.model, *f.opt, o, [](int64_t) { return 0.05; });
  StepResult s = r.run(f.x, f.y);
  EXPECT_FALSE(s.applied);
  EXPECT_TRUE(s.overflow);
  EXPECT_EQ(r.scaler().scale_value(), 512);
  EXPECT_TRUE(r.run(f.x, f.y).applied);
  // A non-finite loss is still fatal with the guard off.
  StepOptions lo = scaled_injecting({1}, "loss", 1024);
  lo.guard.enabled = false;
  Fixture g;
  StepRunner rl(*g.model, *g.opt, lo, [](int64_t) { return 0.05; });
  EXPECT_THROW(rl.run(g.x, g.y), TrainingDiverged);
}

TEST(Guard, CollapsedLossScaleStopsAndNamesDivergence) {
  // From scale 1, the 15th backoff takes it to 2^-15 < the floor (LossScalerOptions::min_scale, 2^-14): divergence, not fp16 range.
  Fixture f;
  StepOptions o = scaled_injecting(attempts_range(1, 40), "grad", 1.0);
  StepRunner r(*f.model, *f.opt, o, [](int64_t) { return 0.05; });
  for (int i = 0; i < 14; ++i) {
    StepResult s = r.run(f.x, f.y);
    ASSERT_TRUE(s.overflow) << i;
  }
  EXPECT_DOUBLE_EQ(r.scaler().scale_value(), 1.0 / 16384.0);
  try {
    r.run(f.x, f.y);
    FAIL() << "expected TrainingDiverged";
  } catch (const TrainingDiverged& e) {
    EXPECT_THAT(e.what(), HasSubstr("loss scale collapsed"));
    EXPECT_THAT(e.what(), HasSubstr("15 gradient overflows in a row"));
    EXPECT_THAT(e.what(), HasSubstr("backward output of 'conv1'")) << "located once, at the stop";
  }
}

TEST(Guard, RollbackKeepsTheBackedOffScale) {
  Fixture f;
  StepOptions o = scaled_injecting({3, 4}, "loss", 1024);
  o.guard.max_consecutive_skips = 2;
  o.guard.snapshot_every = 1;
  o.guard.locate = false;
  StepRunner r(*f.model, *f.opt, o, [](int64_t) { return 0.05; });
  ASSERT_TRUE(r.run(f.x, f.y).applied);
  ASSERT_TRUE(r.run(f.x, f.y).applied);
  EXPECT_EQ(kinds(r.run(f.x, f.y)), "skip");
  StepResult rb = r.run(f.x, f.y);
  EXPECT_EQ(kinds(rb), "skip,rollback");
  EXPECT_EQ(r.scaler().scale_value(), 256) << "two backoffs from 1024, kept by the rollback (not the snapshot's)";
}

TEST(Guard, RollbackRestoresCounterScheduleEmaOptimizerAndBuffersBitForBit) {
  Fixture f;
  auto shadow = keel::models::create({"resnet20", 1, 10});
  Ema ema(shadow, *f.model, 0.9);
  StepOptions o = injecting({6, 7}, "loss");
  o.guard.max_consecutive_skips = 2;
  o.guard.snapshot_every = 2;
  o.guard.locate = false;
  auto lr_at = [](int64_t s) { return 0.05 / static_cast<double>(s + 1); };
  StepRunner r(*f.model, *f.opt, o, lr_at, &ema);
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(r.run(f.x, f.y).applied) << i;
  // The state after 4 applied steps: attempt 5 (healthy, steps_ = 4) snapshots it.
  const auto params = f.weights(), buffers = clones(f.model->buffers());
  const auto ema_params = clones(ema.model().parameters()), ema_buffers = clones(ema.model().buffers());
  const auto mom = momenta(*f.opt, *f.model);
  ASSERT_TRUE(r.run(f.x, f.y).applied);
  EXPECT_EQ(r.steps(), 5);
  EXPECT_EQ(kinds(r.run(f.x, f.y)), "skip");
  StepResult rb = r.run(f.x, f.y);
  ASSERT_EQ(kinds(rb), "skip,rollback");
  EXPECT_THAT(messages(rb), HasSubstr("restored the state of step 4"));
  EXPECT_EQ(r.steps(), 4) << "the undone step is undone for the counter (and the schedule that reads it)";
  EXPECT_TRUE(same(params, f.weights()));
  EXPECT_TRUE(same(buffers, f.model->buffers()));
  EXPECT_TRUE(same(ema_params, ema.model().parameters())) << "the EMA forgets the undone step";
  EXPECT_TRUE(same(ema_buffers, ema.model().buffers()));
  EXPECT_TRUE(same_defined(mom, momenta(*f.opt, *f.model))) << "momentum as it was after step 4";
  StepResult next = r.run(f.x, f.y);
  ASSERT_TRUE(next.applied);
  EXPECT_DOUBLE_EQ(next.lr, lr_at(4) * 0.5) << "the schedule resumes at step 5's rate, x the rollback factor";
}

TEST(Guard, OutOfMemoryInTheLocatorReplayLosesTheLocationNotTheRun) {
  Fixture f;
  StepOptions o = injecting({2}, "loss");
  o.inject.oom_replay_steps = {2};
  StepRunner r(*f.model, *f.opt, o, [](int64_t) { return 0.05; });
  ASSERT_TRUE(r.run(f.x, f.y).applied);
  const auto w = f.weights(), b = clones(f.model->buffers());
  StepResult s;
  ASSERT_NO_THROW(s = r.run(f.x, f.y));
  EXPECT_FALSE(s.applied);
  EXPECT_THAT(messages(s), HasSubstr("not located (out of memory during the diagnostic replay"));
  EXPECT_TRUE(same(w, f.weights()));
  EXPECT_TRUE(same(b, f.model->buffers())) << "BatchNorm statistics as before the failed step";
  EXPECT_TRUE(r.run(f.x, f.y).applied);
}

TEST(Guard, OutOfMemoryInTheSpikeReplayLosesTheLocationNotTheRun) {
  Fixture f;
  StepOptions o;
  o.guard.spike_factor = 10;
  o.guard.spike_warmup = 2;
  o.guard.snapshot_every = 1;
  o.inject.oom_replay_steps = {5};
  StepRunner r(*f.model, *f.opt, o, [](int64_t s) { return s == 3 ? 1e4 : 0.01; });
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(r.run(f.x, f.y).applied) << i;
  const auto w = f.weights(), b = clones(f.model->buffers());
  StepResult s;
  ASSERT_NO_THROW(s = r.run(f.x, f.y));
  EXPECT_THAT(messages(s), HasSubstr("loss spike"));
  EXPECT_THAT(messages(s), HasSubstr("not located (out of memory during the diagnostic replay"));
  EXPECT_TRUE(same(w, f.weights())) << "the replay put the current weights back";
  EXPECT_TRUE(same(b, f.model->buffers()));
}

// Golden values: scripts/golden_clip.py (/usr/bin/python3, torch 1.13's clip_grad_value_ / clip_grad_norm_).
namespace {
std::vector<at::Tensor> clip_input() {
  return {at::linspace(-3.0, 5.0, 12).reshape({3, 4}), at::tensor({0.5f, -7.0f, 2.0f, 0.25f})};
}
void expect_golden(const std::vector<at::Tensor>& g, const std::vector<float>& want) {
  const at::Tensor got = at::cat({g[0].flatten(), g[1].flatten()});
  ASSERT_EQ(got.numel(), static_cast<int64_t>(want.size()));
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i].item<float>(), want[i], 1e-6) << i;
}
}  // namespace

TEST(Clip, ValueAloneMatchesClipGradValue) {
  auto g = clip_input();
  clip_gradients(g, 1.5, 0.0);
  expect_golden(g, {-1.5f, -1.5f, -1.5f, -0.8181817531585693f, -0.09090900421142578f, 0.6363637447357178f,
                    1.3636362552642822f, 1.5f, 1.5f, 1.5f, 1.5f, 1.5f, 0.5f, -1.5f, 1.5f, 0.25f});
}

TEST(Clip, NormAloneMatchesClipGradNorm) {
  auto g = clip_input();
  clip_gradients(g, 0.0, 4.0);
  expect_golden(g, {-1.010765552520752f, -0.7657314538955688f, -0.5206973552703857f, -0.2756633162498474f,
                    -0.030629228800535202f, 0.2144048511981964f, 0.45943883061408997f, 0.7044728994369507f,
                    0.9495069980621338f, 1.194541096687317f, 1.4395750761032104f, 1.6846091747283936f,
                    0.1684609204530716f, -2.358452796936035f, 0.6738436818122864f, 0.0842304602265358f});
}

TEST(Clip, ValueThenNormOfTheClampedGradientsMatchesPyTorch) {
  auto g = clip_input();
  clip_gradients(g, 1.5, 2.0);
  expect_golden(g, {-0.5911440849304199f, -0.5911440849304199f, -0.5911440849304199f, -0.3224422037601471f,
                    -0.03582688048481941f, 0.25078845024108887f, 0.5374036431312561f, 0.5911440849304199f,
                    0.5911440849304199f, 0.5911440849304199f, 0.5911440849304199f, 0.5911440849304199f,
                    0.19704802334308624f, -0.5911440849304199f, 0.5911440849304199f, 0.09852401167154312f});
}

TEST(Clip, TheStepClipsByValueThenByTheNormOfTheClampedGradients) {
  // Plain SGD with lr 1: the update is the clipped gradient. Expected: the raw gradient of an identical model,
  // clamped, then scaled by clip_norm / norm(clamped) (PyTorch's order). Before the fix the step used the norm
  // of the unclamped gradients.
  for (const auto& [value, norm] : std::vector<std::pair<double, double>>{{2e-3, 0.0}, {2e-3, 1e-2}}) {
    Fixture a(11), b(11);
    std::vector<at::Tensor> raw;
    {
      at::Tensor logits = forward_logits(*b.model, b.x, keel::train::Precision::kFp32);
      at::cross_entropy_loss(logits, b.y).backward();
      for (auto& p : b.model->parameters()) raw.push_back(p.grad().clone());
    }
    for (auto& g : raw) g.clamp_(-value, value);
    if (norm > 0) {
      double sq = 0;
      for (auto& g : raw) sq += g.pow(2).sum().item<double>();
      const double coef = std::min(1.0, norm / (std::sqrt(sq) + 1e-6));
      ASSERT_LT(coef, 1.0) << "the norm clip must bind for the test to mean anything";
      for (auto& g : raw) g.mul_(coef);
    }
    StepOptions o;
    o.clip_value = value;
    o.clip_norm = norm;
    const auto before = a.weights();
    torch::optim::SGD plain(a.model->parameters(), torch::optim::SGDOptions(1.0));
    StepRunner r(*a.model, plain, o, [](int64_t) { return 1.0; });
    ASSERT_TRUE(r.run(a.x, a.y).applied);
    const auto after = a.weights();
    for (size_t i = 0; i < after.size(); ++i) {
      EXPECT_LT((before[i] - after[i] - raw[i]).abs().max().item<double>(), 1e-7)
          << "parameter " << i << " (clip_value " << value << ", clip_norm " << norm << ")";
    }
  }
}
