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
  EXPECT_DOUBLE_EQ(r.lr_scale(), 0.5);
  EXPECT_TRUE(same(good, f.weights()));
  EXPECT_EQ(kinds(r.run(f.x, f.y)), "skip");
  EXPECT_EQ(kinds(r.run(f.x, f.y)), "skip,rollback");
  EXPECT_DOUBLE_EQ(r.lr_scale(), 0.25);
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
