// Trainer: optimizer groups, augmentation, and a small convergence run on real Fashion-MNIST.
#include <gtest/gtest.h>

#include "../image_files.h"
#include "../test_util.h"

#include <fstream>
#include <map>
#include <sstream>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "keel/checkpoint/checkpoint.h"
#include "keel/config/config.h"
#include "keel/data/augment.h"
#include "keel/models/registry.h"
#include "keel/models/state_dict.h"
#include "keel/train/optimizer.h"
#include "keel/run/trainer.h"

namespace {
std::string tmp_dir(const std::string& name) { return keel::test::fresh_dir(name); }
}  // namespace

TEST(Optimizer, NoDecayOnBiasesAndNormWeights) {
  auto m = keel::models::create({"resnet20", 1, 10});
  keel::train::OptimizerOptions o;
  o.weight_decay = 0.1;
  auto opt = keel::train::make_optimizer(*m, o);
  ASSERT_EQ(opt->param_groups().size(), 2u);
  auto& decay = opt->param_groups()[0];
  auto& no_decay = opt->param_groups()[1];
  EXPECT_DOUBLE_EQ(static_cast<torch::optim::SGDOptions&>(decay.options()).weight_decay(), 0.1);
  EXPECT_DOUBLE_EQ(static_cast<torch::optim::SGDOptions&>(no_decay.options()).weight_decay(), 0.0);
  for (auto& p : decay.params()) EXPECT_GE(p.dim(), 2);
  for (auto& p : no_decay.params()) EXPECT_LE(p.dim(), 1);
  EXPECT_EQ(decay.params().size() + no_decay.params().size(), m->parameters().size());
  keel::train::set_lr(*opt, 0.5);
  for (auto& g : opt->param_groups()) EXPECT_DOUBLE_EQ(g.options().get_lr(), 0.5);
}

TEST(Optimizer, NoDecayGroupHasItsOwnRateFactor) {
  auto m = keel::models::create({"resnet20", 1, 10});
  keel::train::OptimizerOptions o;
  o.lr = 0.4;
  o.no_decay_lr_factor = 0.25;
  for (const std::string name : {"sgd", "adamw"}) {
    o.name = name;
    auto opt = keel::train::make_optimizer(*m, o);
    EXPECT_DOUBLE_EQ(opt->param_groups()[0].options().get_lr(), 0.4) << name;
    EXPECT_DOUBLE_EQ(opt->param_groups()[1].options().get_lr(), 0.1) << name;
    // What the step runner does each step: the scheduled rate scales every group's base rate.
    keel::train::set_lr(*opt, 0.02, keel::train::group_lr_factors(o));
    EXPECT_DOUBLE_EQ(opt->param_groups()[0].options().get_lr(), 0.02) << name;
    EXPECT_DOUBLE_EQ(opt->param_groups()[1].options().get_lr(), 0.005) << name;
    EXPECT_THROW(keel::train::set_lr(*opt, 0.02, {1.0}), c10::Error) << "one factor per group";
  }
}

// keel's SGD and AdamW take their step with the multi-tensor (_foreach_) operators; on the CPU that must be LibTorch's
// own step bit for bit: every option keel sets (momentum, nesterov, dampening-free, weight decay, two groups with
// their own rates), momentum buffers created on the first step, a parameter without a gradient at one step (AdamW
// then keeps per-parameter step counts), and the state surviving a save/load into LibTorch's optimizer.
TEST(Optimizer, ForeachStepsAreLibTorchsBitForBit) {
  for (const std::string name : {"sgd", "adamw"}) {
    for (const bool nesterov : {true, false}) {
      if (name == "adamw" && !nesterov) continue;
      torch::manual_seed(0);
      torch::nn::Sequential ours(torch::nn::Linear(6, 5), torch::nn::LayerNorm(torch::nn::LayerNormOptions({5})),
                                 torch::nn::Linear(5, 3));
      torch::nn::Sequential ref(torch::nn::Linear(6, 5), torch::nn::LayerNorm(torch::nn::LayerNormOptions({5})),
                                torch::nn::Linear(5, 3));
      {
        torch::NoGradGuard ng;
        for (size_t i = 0; i < ours->parameters().size(); ++i) ref->parameters()[i].copy_(ours->parameters()[i]);
      }
      keel::train::OptimizerOptions o;
      o.name = name;
      o.lr = name == "sgd" ? 0.1 : 1e-2;
      o.weight_decay = 0.05;
      o.nesterov = nesterov;
      o.no_decay_lr_factor = 0.5;
      auto opt = keel::train::make_optimizer(*ours, o);
      // LibTorch's optimizer over the same groups (make_optimizer's rule: decay on >= 2-D parameters).
      std::vector<at::Tensor> decay, no_decay;
      for (auto& p : ref->parameters()) (p.dim() >= 2 ? decay : no_decay).push_back(p);
      std::unique_ptr<torch::optim::Optimizer> lt;
      if (name == "sgd") {
        std::vector<torch::optim::OptimizerParamGroup> g;
        g.emplace_back(decay, std::make_unique<torch::optim::SGDOptions>(
                                  torch::optim::SGDOptions(o.lr).momentum(o.momentum).nesterov(nesterov).weight_decay(0.05)));
        g.emplace_back(no_decay, std::make_unique<torch::optim::SGDOptions>(
                                     torch::optim::SGDOptions(o.lr * 0.5).momentum(o.momentum).nesterov(nesterov)));
        lt = std::make_unique<torch::optim::SGD>(g, torch::optim::SGDOptions(o.lr));
      } else {
        std::vector<torch::optim::OptimizerParamGroup> g;
        g.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(
                                  torch::optim::AdamWOptions(o.lr).betas({o.beta1, o.beta2}).eps(o.eps).weight_decay(0.05)));
        g.emplace_back(no_decay, std::make_unique<torch::optim::AdamWOptions>(
                                     torch::optim::AdamWOptions(o.lr * 0.5).betas({o.beta1, o.beta2}).eps(o.eps).weight_decay(0)));
        lt = std::make_unique<torch::optim::AdamW>(g, torch::optim::AdamWOptions(o.lr));
      }
      for (int step = 0; step < 6; ++step) {
        for (size_t i = 0; i < ours->parameters().size(); ++i) {
          auto p = ours->parameters()[i], q = ref->parameters()[i];
          if (step == 2 && i == 1) {  // the first bias gets no gradient at this step
            p.mutable_grad() = at::Tensor();
            q.mutable_grad() = at::Tensor();
            continue;
          }
          at::Tensor g = torch::randn(p.sizes());
          p.mutable_grad() = g.clone();
          q.mutable_grad() = g.clone();
        }
        opt->step();
        lt->step();
        for (size_t i = 0; i < ours->parameters().size(); ++i) {
          ASSERT_TRUE(torch::equal(ours->parameters()[i], ref->parameters()[i]))
              << name << (nesterov ? " nesterov" : "") << ": parameter " << i << " differs after step " << step + 1;
        }
      }
      // The state is LibTorch's: saved from keel's, loaded into LibTorch's, the next steps still agree.
      std::stringstream buf;
      {
        torch::serialize::OutputArchive ar;
        opt->save(ar);
        ar.save_to(buf);
      }
      torch::serialize::InputArchive in;
      in.load_from(buf);
      lt->load(in);
      for (auto& p : ours->parameters()) p.mutable_grad() = torch::ones(p.sizes());
      for (auto& q : ref->parameters()) q.mutable_grad() = torch::ones(q.sizes());
      opt->step();
      lt->step();
      for (size_t i = 0; i < ours->parameters().size(); ++i) {
        EXPECT_TRUE(torch::equal(ours->parameters()[i], ref->parameters()[i])) << name << " after a state round trip";
      }
    }
  }
}

TEST(Optimizer, LrScalingByGlobalBatch) {
  using keel::train::scaled_lr;
  EXPECT_DOUBLE_EQ(scaled_lr(0.1, "none", 1024, 256), 0.1);
  EXPECT_DOUBLE_EQ(scaled_lr(0.1, "linear", 1024, 256), 0.4);
  EXPECT_DOUBLE_EQ(scaled_lr(0.1, "sqrt", 1024, 256), 0.2);
  EXPECT_DOUBLE_EQ(scaled_lr(0.1, "linear", 64, 256), 0.025);
  EXPECT_DOUBLE_EQ(scaled_lr(0.1, "sqrt", 64, 256), 0.05);
  EXPECT_THROW(scaled_lr(0.1, "cubic", 64, 256), std::invalid_argument);
}

TEST(Augment, NormalizeFlipAndCropKeepPixels) {
  keel::data::AugmentOptions o;
  o.mean = {0.5};
  o.std = {0.25};
  keel::data::DeviceAugment plain(o, 1);
  at::Tensor img = at::arange(2 * 1 * 4 * 4, at::kLong).remainder(256).to(at::kByte).view({2, 1, 4, 4});
  at::Tensor e = plain.eval(img);
  EXPECT_TRUE(at::allclose(e, (img.to(at::kFloat) / 255.0 - 0.5) / 0.25, 1e-5, 1e-6));

  o.random_flip = true;
  keel::data::DeviceAugment flip(o, 1), flip2(o, 1);
  at::Tensor f = flip.train(img);
  EXPECT_TRUE(at::equal(f, flip2.train(img))) << "same seed, same augmentation";
  for (int64_t i = 0; i < 2; ++i) {
    const bool same = at::equal(f[i], e[i]), mirrored = at::equal(f[i], e[i].flip({2}));
    EXPECT_TRUE(same || mirrored) << "sample " << i;
  }

  o.random_flip = false;
  o.random_crop_padding = 2;
  keel::data::DeviceAugment crop(o, 3);
  at::Tensor big = at::randint(1, 256, {16, 1, 8, 8}, at::kLong).to(at::kByte);
  at::Tensor c = crop.train(big);
  ASSERT_EQ(c.sizes(), big.sizes());
  // Each crop is the padded image shifted by (dy, dx) in [-2, 2]: find a shift that explains it.
  at::Tensor norm_zero = at::full({}, (0.0 - 0.5) / 0.25);
  for (int64_t i = 0; i < 16; ++i) {
    at::Tensor padded = at::constant_pad_nd(crop.eval(big[i].unsqueeze(0)), {2, 2, 2, 2},
                                            norm_zero.item<double>());
    bool found = false;
    for (int dy = 0; dy <= 4 && !found; ++dy)
      for (int dx = 0; dx <= 4 && !found; ++dx)
        found = at::allclose(padded.slice(2, dy, dy + 8).slice(3, dx, dx + 8), c[i].unsqueeze(0));
    EXPECT_TRUE(found) << "crop " << i << " is not a shifted window of the padded image";
  }
}

// A few hundred steps on a Fashion-MNIST subset must reach accuracy far above chance (10%).
TEST(Convergence, ResNet20LearnsFashionMnistSubset) {
  const std::string dir = tmp_dir("convergence");
  keel::config::Config cfg = keel::config::parse("", "test", {
      "run.dir=\"" + dir + "\"", "run.name=conv", "data.train_limit=6400", "data.test_limit=1000",
      "train.batch_size=32", "train.epochs=1", "optim.lr=0.1", "train.log_every=100"});
  ASSERT_TRUE(std::filesystem::exists(cfg.data.root))
      << cfg.data.root << " missing: run scripts/setup.sh (installs dataset-fashion-mnist)";
  keel::run::Trainer t(cfg);
  keel::run::FitResult r = t.fit();
  EXPECT_EQ(r.steps, 200);
  EXPECT_GT(r.test.top1, 0.65) << "test top-1 after 200 steps";
  EXPECT_EQ(r.test.samples, 1000);
  EXPECT_TRUE(std::filesystem::exists(dir + "/conv/metrics.jsonl"));
  EXPECT_TRUE(std::filesystem::exists(dir + "/conv/config.resolved.toml"));
  ASSERT_TRUE(std::filesystem::exists(r.checkpoint));
  EXPECT_FALSE(std::filesystem::exists(r.checkpoint + ".tmp"));

  // The checkpoint reloads into a fresh model with identical weights.
  auto fresh = keel::models::create({"resnet20", 1, 10});
  keel::models::load_state_dict(*fresh, keel::models::read_state_dict(r.checkpoint));
  auto a = keel::models::state_dict_of(*fresh), b = keel::models::state_dict_of(*t.model());
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i].second, b[i].second.contiguous())) << a[i].first;
}

TEST(Training, TrainsAFewStepsOnATinyImageFolder) {
  // 3 classes x 8 JPEG/PNG training images, 2 per class to evaluate, written by the test itself.
  const std::string dir = tmp_dir("image-folder-train");
  keel::test::write_image_folder(dir + "/data", 3, 8, 2);
  keel::config::Config cfg = keel::config::parse("", "test", {
      "run.dir=\"" + dir + "\"", "run.name=imgs", "data.dataset=image_folder", "data.root=\"" + dir + "/data\"",
      "data.image_size=32", "data.random_crop_padding=0", "data.workers=2", "data.mean=[0.5, 0.5, 0.5]",
      "data.std=[0.25, 0.25, 0.25]", "model.in_channels=3", "model.num_classes=3", "train.batch_size=8",
      "train.eval_batch_size=4", "train.epochs=2", "train.log_every=1", "checkpoint.save_final=false"});
  keel::run::Trainer t(cfg);
  keel::run::FitResult r = t.fit();
  EXPECT_EQ(r.steps, 6);  // 24 images / batch 8 x 2 epochs
  EXPECT_EQ(r.test.samples, 6);
  EXPECT_TRUE(std::isfinite(r.train_loss));
  EXPECT_GE(r.data_wait_share, 0.0);
  EXPECT_LE(r.data_wait_share, 1.0);
  // The per-step metrics still carry the measured data wait, and the epoch the skip counts.
  std::ifstream in(dir + "/imgs/metrics.jsonl");
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_NE(ss.str().find("data_wait"), std::string::npos) << ss.str().substr(0, 400);
  EXPECT_NE(ss.str().find("\"data_skipped_train\":0"), std::string::npos) << ss.str().substr(0, 400);
}

TEST(Training, DeviceAugmentationWithSoftTargetsAndLoaderRateInTheMetrics) {
  // Random-resized crop, Mixup and CutMix on the training device (soft targets through the step's
  // cross-entropy), on a synthetic dataset; every epoch record carries the loader-only rate.
  const std::string dir = tmp_dir("device-augment-train");
  keel::config::Config cfg = keel::config::parse("", "test", {
      "run.dir=\"" + dir + "\"", "run.name=mix", "data.dataset=synthetic", "data.image_size=16",
      "data.synthetic_samples=64", "data.workers=2", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]",
      "model.in_channels=3", "model.num_classes=10", "train.batch_size=16", "train.eval_batch_size=16",
      "train.epochs=2", "train.log_every=1", "checkpoint.save_final=false", "augment.random_resized_crop=true",
      "augment.mixup_alpha=0.2", "augment.cutmix_alpha=1.0", "train.label_smoothing=0.1"});
  keel::run::Trainer t(cfg);
  keel::run::FitResult r = t.fit();
  EXPECT_EQ(r.steps, 8);  // 64 samples / batch 16 x 2 epochs
  EXPECT_TRUE(std::isfinite(r.train_loss));
  EXPECT_GE(r.train_top1, 0.0);
  EXPECT_LE(r.train_top1, 1.0);
  std::ifstream in(dir + "/mix/metrics.jsonl");
  std::string line;
  int epochs = 0;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    if (j.value("event", "") != "epoch") continue;
    ++epochs;
    ASSERT_TRUE(j.contains("loader_images_per_second")) << line.substr(0, 400);
    EXPECT_GT(j["loader_images_per_second"].get<double>(), 0.0);
  }
  EXPECT_EQ(epochs, 2);
}

TEST(EarlyStop, StopsAtTheRightEpochAndRestoresTheBestEpochsWeightsBitForBit) {
  // min_delta 100: only the first epoch can count as an improvement, so with patience 2 the run stops after
  // epoch 3 and must end with epoch 1's weights. Every epoch end writes a checkpoint (every_steps = the epoch's
  // 4 steps): epoch 1's is the reference.
  const std::string dir = tmp_dir("early-stop-restore");
  keel::config::Config cfg = keel::config::parse("", "test", {
      "run.dir=\"" + dir + "\"", "run.name=es", "data.dataset=synthetic", "data.image_size=16",
      "data.synthetic_samples=64", "data.workers=1", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]",
      "model.in_channels=3", "model.num_classes=10", "train.batch_size=16", "train.eval_batch_size=16",
      "train.epochs=8", "train.log_every=1", "early_stop.enabled=true", "early_stop.monitor=\"test_loss\"",
      "early_stop.patience=2", "early_stop.min_delta=100.0", "early_stop.restore_best=true",
      "checkpoint.every_steps=4", "checkpoint.keep_last=10"});
  keel::run::Trainer t(cfg);
  keel::run::FitResult r = t.fit();
  EXPECT_TRUE(r.early_stopped);
  EXPECT_EQ(r.epochs, 3) << "stopped after patience (2) epochs without improvement";
  EXPECT_EQ(r.steps, 12);
  EXPECT_EQ(r.best_epoch, 1);
  // Epoch test losses from the log: the restored model evaluates to epoch 1's exactly.
  std::vector<double> test_loss;
  std::ifstream in(dir + "/es/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    if (j.value("event", "") == "epoch") test_loss.push_back(j.at("test").at("loss").get<double>());
  }
  ASSERT_EQ(test_loss.size(), 3u);
  EXPECT_DOUBLE_EQ(r.test.loss, test_loss[0]);
  const auto best = keel::models::read_state_dict(dir + "/es/checkpoints/" + keel::checkpoint::dir_name_for_step(4) +
                                                  "/model.pt");
  const auto last = keel::models::read_state_dict(dir + "/es/checkpoints/" + keel::checkpoint::dir_name_for_step(12) +
                                                  "/model.pt");
  ASSERT_TRUE(std::filesystem::exists(r.checkpoint));
  const auto final_file = keel::models::read_state_dict(r.checkpoint);
  const auto in_memory = keel::models::state_dict_of(*t.model());
  ASSERT_EQ(best.size(), final_file.size());
  ASSERT_EQ(best.size(), in_memory.size());
  bool differs_from_last = false;
  for (size_t i = 0; i < best.size(); ++i) {
    EXPECT_EQ(best[i].first, final_file[i].first);
    EXPECT_TRUE(at::equal(best[i].second, final_file[i].second)) << best[i].first << " (final.pt)";
    EXPECT_TRUE(at::equal(best[i].second, in_memory[i].second.contiguous())) << best[i].first << " (in memory)";
    if (!at::equal(last[i].second, best[i].second)) differs_from_last = true;
  }
  EXPECT_TRUE(differs_from_last) << "epochs 2-3 trained: the last epoch's weights are not the best's";
}

namespace {
// --set overrides of a two-epoch run of 4 steps each on 64 synthetic 16x16 RGB images, no final checkpoint.
std::vector<std::string> tiny_synthetic_run(const std::string& dir, const std::string& name) {
  return {"run.dir=\"" + dir + "\"", "run.name=" + name, "data.dataset=synthetic", "data.image_size=16",
      "data.synthetic_samples=64", "data.workers=1", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]",
      "model.in_channels=3", "model.num_classes=10", "train.batch_size=16", "train.eval_batch_size=16",
      "train.epochs=2", "train.log_every=1", "checkpoint.save_final=false"};
}

// The console's advice lines, their figures masked (#), with how often each was printed.
std::map<std::string, int> advice_lines(const std::string& out) {
  std::map<std::string, int> seen;
  std::istringstream lines(out);
  std::string line;
  while (std::getline(lines, line)) {
    const auto at = line.find("advice: ");
    if (at == std::string::npos) continue;
    std::string masked = line.substr(at);
    for (auto& ch : masked) if (std::isdigit(static_cast<unsigned char>(ch))) ch = '#';
    ++seen[masked];
  }
  return seen;
}
}  // namespace

TEST(Training, EachPieceOfAdviceIsPrintedOnce) {
  // Every epoch end and the run's end diagnose the bottleneck; the same advice (its text with the figures
  // masked) must reach the console once, not once per epoch plus once more in the final summary.
  const std::string dir = tmp_dir("advice-once");
  keel::run::Trainer t(keel::config::parse("", "test", tiny_synthetic_run(dir, "adv")));
  testing::internal::CaptureStdout();
  keel::run::FitResult r = t.fit();
  const std::map<std::string, int> seen = advice_lines(testing::internal::GetCapturedStdout());
  if (seen.empty()) GTEST_SKIP() << "no bottleneck advice fired on this machine; nothing to count";
  for (const auto& [text, n] : seen) EXPECT_EQ(n, 1) << text;
  EXPECT_FALSE(r.advice.empty()) << "the run's advice is still in the summary (FitResult / metrics)";
}

// The advice printed once per run holds across a resume: the rules already printed ride in the checkpoint
// (state.json "advised"), so the resumed run does not print them again.
TEST(Training, AdvicePrintedBeforeAResumeIsNotPrintedAgain) {
  const std::string dir = tmp_dir("advice-resume");
  std::vector<std::string> sets = tiny_synthetic_run(dir, "adv");
  sets.push_back("checkpoint.every_steps=4");
  std::vector<std::string> first_sets = sets;
  first_sets.push_back("debug.stop_after_steps=5");  // after epoch 1's end (step 4) and its checkpoint
  keel::run::Trainer first(keel::config::parse("", "test", first_sets));
  testing::internal::CaptureStdout();
  first.fit();
  const std::map<std::string, int> before = advice_lines(testing::internal::GetCapturedStdout());
  const nlohmann::json state =
      nlohmann::json::parse(std::ifstream(dir + "/adv/checkpoints/" + keel::checkpoint::dir_name_for_step(4) + "/state.json"));
  ASSERT_TRUE(state.contains("advised")) << state.dump();
  EXPECT_EQ(state.at("advised").size(), before.size()) << "one rule per piece of advice printed";
  if (before.empty()) GTEST_SKIP() << "no bottleneck advice fired in epoch 1 on this machine; nothing to repeat";
  keel::run::Trainer second(keel::config::parse("", "test", sets));
  testing::internal::CaptureStdout();
  second.fit("auto");
  for (const auto& [text, n] : advice_lines(testing::internal::GetCapturedStdout())) {
    EXPECT_EQ(before.count(text), 0u) << "printed before the resume and again after it: " << text;
  }
}
