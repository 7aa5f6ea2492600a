// The composition root (run/): one source of defaults. Every options struct a run builds from the config
// defaults, field by field, to what the schema's defaults map to (run/compose.cpp), so that code building an
// options struct by hand (tests, benches, tune) gets the same training a default config gets. The exceptions
// are listed, each with its reason.
#include <gtest/gtest.h>

#include "keel/config/config.h"
#include "keel/run/compose.h"
#include "keel/run/run_state.h"

namespace {

using keel::config::Config;

// Every key at its schema default: an empty config file, as `keel train` reads one.
Config schema_defaults() { return keel::config::parse("", "defaults.toml"); }

TEST(Compose, StepAndGuardDefaultsAreTheSchemas) {
  const keel::train::StepOptions d, c = keel::run::step_options(schema_defaults());
  EXPECT_EQ(d.precision, c.precision);
  EXPECT_EQ(d.micro_batch, c.micro_batch);
  EXPECT_EQ(d.oom_recovery, c.oom_recovery);
  EXPECT_EQ(d.label_smoothing, c.label_smoothing);
  EXPECT_EQ(d.clip_norm, c.clip_norm);
  EXPECT_EQ(d.clip_value, c.clip_value);
  // Not compared: channels_last (a layout, off in the struct so that a caller's tensors are taken as given;
  // the schema turns it on for the CPU's oneDNN path) and group_lr_factors (empty = all 1, which the schema's
  // optim.no_decay_lr_factor = 1 also gives).
  EXPECT_EQ(d.scaler.enabled, c.scaler.enabled);
  EXPECT_EQ(d.scaler.init_scale, c.scaler.init_scale);
  EXPECT_EQ(d.scaler.growth_factor, c.scaler.growth_factor);
  EXPECT_EQ(d.scaler.backoff_factor, c.scaler.backoff_factor);
  EXPECT_EQ(d.scaler.growth_interval, c.scaler.growth_interval);
  EXPECT_EQ(d.guard.enabled, c.guard.enabled);
  EXPECT_EQ(d.guard.max_consecutive_skips, c.guard.max_consecutive_skips);
  EXPECT_EQ(d.guard.max_rollbacks, c.guard.max_rollbacks);
  EXPECT_EQ(d.guard.lr_factor, c.guard.lr_factor);
  EXPECT_EQ(d.guard.snapshot_every, c.guard.snapshot_every);
  EXPECT_EQ(d.guard.locate, c.guard.locate);
  EXPECT_EQ(d.guard.spike_factor, c.guard.spike_factor);
  EXPECT_EQ(d.guard.spike_warmup, c.guard.spike_warmup);
}

TEST(Compose, OptimizerScheduleAndEarlyStopDefaultsAreTheSchemas) {
  const Config cfg = schema_defaults();
  const keel::train::OptimizerOptions d, c = keel::run::optimizer_options(cfg);
  EXPECT_EQ(d.name, c.name);
  EXPECT_EQ(d.lr, c.lr);
  EXPECT_EQ(d.momentum, c.momentum);
  EXPECT_EQ(d.nesterov, c.nesterov);
  EXPECT_EQ(d.weight_decay, c.weight_decay);
  EXPECT_EQ(d.beta1, c.beta1);
  EXPECT_EQ(d.beta2, c.beta2);
  EXPECT_EQ(d.eps, c.eps);
  EXPECT_EQ(d.no_decay_lr_factor, c.no_decay_lr_factor);

  const keel::train::ScheduleOptions ds, cs = keel::run::schedule_options(cfg);
  EXPECT_EQ(ds.name, cs.name);
  EXPECT_EQ(ds.warmup_fraction, cs.warmup_fraction);
  EXPECT_EQ(ds.start_factor, cs.start_factor);
  EXPECT_EQ(ds.final_factor, cs.final_factor);
  EXPECT_EQ(ds.warmup_steps, cs.warmup_steps);
  EXPECT_EQ(ds.interval, cs.interval);
  EXPECT_EQ(ds.step_size, cs.step_size);
  EXPECT_EQ(ds.milestones, cs.milestones);
  EXPECT_EQ(ds.gamma, cs.gamma);
  EXPECT_EQ(ds.plateau.mode, cs.plateau.mode);
  EXPECT_EQ(ds.plateau.factor, cs.plateau.factor);
  EXPECT_EQ(ds.plateau.patience, cs.plateau.patience);
  EXPECT_EQ(ds.plateau.threshold, cs.plateau.threshold);
  EXPECT_EQ(ds.plateau.threshold_mode, cs.plateau.threshold_mode);
  EXPECT_EQ(ds.plateau.cooldown, cs.plateau.cooldown);
  EXPECT_EQ(ds.plateau.min_lr, cs.plateau.min_lr);

  const keel::train::EarlyStoppingOptions de, ce = keel::run::early_stopping_options(cfg);
  EXPECT_EQ(de.mode, ce.mode);
  EXPECT_EQ(de.patience, ce.patience);
  EXPECT_EQ(de.min_delta, ce.min_delta);
}

TEST(Compose, LoaderAndDataParallelDefaultsAreTheSchemas) {
  const Config cfg = schema_defaults();
  const keel::data::LoaderOptions d, c = keel::run::loader_options(cfg, true);
  EXPECT_EQ(d.batch_size(), c.batch_size());
  EXPECT_EQ(d.prefetch(), c.prefetch());
  EXPECT_EQ(d.drop_last(), c.drop_last());
  EXPECT_EQ(d.on_error(), c.on_error());
  EXPECT_EQ(d.sampler().seed, c.sampler().seed);
  EXPECT_EQ(d.sampler().shuffle, c.sampler().shuffle);
  // Not compared: workers (the schema's -1 is resolved from the cores; a Loader takes the resolved number)
  // and pin_memory (resolved from the device).

  const keel::dist::DataParallelOptions dd, cd = keel::run::data_parallel_options(cfg);
  EXPECT_EQ(dd.bucket_mb, cd.bucket_mb);
  EXPECT_EQ(dd.overlap, cd.overlap);
  EXPECT_EQ(dd.sync_bn, cd.sync_bn);
  const keel::dist::CommOptions dc, cc = keel::run::comm_options(cfg);
  EXPECT_EQ(dc.backend, cc.backend);  // on a CPU device (these tests' run.device = auto, no GPU): gloo
  EXPECT_EQ(dc.store, cc.store);
  EXPECT_EQ(dc.store_path, cc.store_path);
  EXPECT_EQ(dc.interface, cc.interface);
  EXPECT_EQ(dc.timeout_seconds, cc.timeout_seconds);
}

// RunState walks its parts in order both ways; a required key missing from a checkpoint is named.
TEST(RunState, SavesAndLoadsEveryPartInOrder) {
  keel::run::RunState s;
  int counter = 7, loaded = 0;
  std::vector<std::string> order;
  s.add_json(
      "counter", [&] { return nlohmann::json(counter); },
      [&](const nlohmann::json& j) {
        loaded = j.get<int>();
        order.push_back("counter");
      });
  s.add_json(
      "optional", [] { return nlohmann::json(); }, [&](const nlohmann::json&) { order.push_back("optional"); },
      /*required=*/false);
  s.add(
      "extra", [](keel::checkpoint::CheckpointContents& c) { c.extra["x"] = {}; },
      [&](const keel::checkpoint::CheckpointContents& c) { order.push_back(c.extra.count("x") ? "extra" : "?"); });
  keel::checkpoint::CheckpointContents c;
  s.save(c);
  EXPECT_EQ(c.state.at("counter"), 7);
  EXPECT_FALSE(c.state.contains("optional")) << "a null state writes nothing";
  s.load(c);
  EXPECT_EQ(loaded, 7);
  EXPECT_EQ(order, (std::vector<std::string>{"counter", "extra"})) << "an absent optional part is not read";

  keel::checkpoint::CheckpointContents old;
  old.dir = "runs/x/checkpoints/step_00000010";
  try {
    s.load(old);
    ADD_FAILURE() << "a checkpoint without a required part loaded";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("runs/x/checkpoints/step_00000010/state.json: no \"counter\""),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(s.add("counter", {}, {}), std::logic_error) << "a part added twice";
}

}  // namespace
