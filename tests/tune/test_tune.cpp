// keel tune: the search's decisions on recorded trial measurements (no training), the tuned-config
// writer, and one real `keel tune` run on a small synthetic problem.
#include <gtest/gtest.h>
#include <gmock/gmock.h>

#include <fstream>
#include <map>

#include "../cli/cli_util.h"
#include "../test_util.h"
#include "keel/config/config.h"
#include "keel/tune/tune.h"

using namespace keel::tune;
using keel::config::kAuto;
using testing::HasSubstr;

namespace {

// A recorded machine: throughput as a function of the settings, with the diagnosis each gives.
struct Recorded {
  std::function<double(const Settings&)> ips;
  std::function<std::vector<std::string>(const Settings&)> rules = [](const Settings&) {
    return std::vector<std::string>{};
  };
  std::function<int64_t(const Settings&)> micro = [](const Settings& s) { return s.micro_batch > 0 ? s.micro_batch : 128; };
  std::vector<std::pair<Settings, std::string>> calls;  // what the search asked for, in order
  double now = 0;
  double trial_seconds = 10;

  TrialFn fn() {
    return [this](const Settings& s, const std::string& group) {
      calls.push_back({s, group});
      now += trial_seconds;
      Trial t;
      t.settings = s;
      t.group = group;
      t.seconds = trial_seconds;
      t.images_per_second = ips(s);
      if (t.images_per_second <= 0) t.error = "out of memory at micro-batch 1";
      t.rules = rules(s);
      t.resolved_micro_batch = micro(s);
      t.data_wait_share = s.workers < 2 ? 0.4 : 0.01;
      return t;
    };
  }
  ClockFn clock() {
    return [this] { return now; };
  }
};

Settings bad_start() {
  Settings s;
  s.workers = 1;
  s.prefetch = 1;
  s.micro_batch = 8;
  s.threads = 2;
  s.precision = "fp32";
  s.channels_last = false;
  return s;
}

SearchOptions options() {
  SearchOptions o;
  o.budget_seconds = 1e9;
  o.cores = 2;
  o.batch_size = 128;
  o.bf16_fast = true;
  return o;
}

}  // namespace

TEST(Tune, InputBoundStartTriesDataSettingsFirstAndKeepsTheFaster) {
  Recorded m;
  m.ips = [](const Settings& s) { return 100.0 * (s.workers >= 2 ? 2.0 : 1.0); };
  m.rules = [](const Settings& s) {
    return s.workers >= 2 ? std::vector<std::string>{"compute-bound"} : std::vector<std::string>{"input-bound"};
  };
  Settings start = bad_start();
  start.micro_batch = 0;  // (a micro-batch below the batch would put the memory group first)
  Search search(options(), m.fn(), m.clock());
  SearchResult r = search.run(start);
  ASSERT_GE(m.calls.size(), 2u);
  EXPECT_EQ(m.calls[0].second, "start");
  EXPECT_EQ(m.calls[1].second, "data") << "input-bound: data settings first";
  EXPECT_EQ(r.best.workers, 2) << "the smallest worker count that was faster";
  EXPECT_NEAR(r.speedup(), 2.0, 1e-9);
  // Re-measured at the end, start and best alternated.
  ASSERT_GE(r.trials.size(), 4u);
  const auto n = r.trials.size();
  EXPECT_EQ(r.trials[n - 4].group, "final");
  EXPECT_EQ(r.trials[n - 4].settings, r.start);
  EXPECT_EQ(r.trials[n - 3].settings, r.best);
  for (const auto& [s, g] : m.calls) EXPECT_EQ(s.precision, "fp32") << "precision changes only with tune.allow";
}

TEST(Tune, MemoryBoundStartTriesThePlannerAndCheckpointingFirst) {
  Recorded m;
  m.ips = [](const Settings& s) { return s.micro_batch == kAuto ? (s.checkpoint_stages ? 90.0 : 80.0) : 50.0; };
  m.rules = [](const Settings& s) {
    return s.micro_batch == kAuto ? std::vector<std::string>{} : std::vector<std::string>{"memory-bound"};
  };
  m.micro = [](const Settings& s) -> int64_t { return s.micro_batch == kAuto ? (s.checkpoint_stages ? 64 : 32) : 8; };
  SearchOptions o = options();
  o.has_memory_budget = true;
  Search search(o, m.fn(), m.clock());
  SearchResult r = search.run(bad_start());
  EXPECT_EQ(m.calls[1].second, "memory");
  EXPECT_EQ(m.calls[1].first.micro_batch, kAuto);
  EXPECT_EQ(r.best.micro_batch, kAuto);
  EXPECT_TRUE(r.best.checkpoint_stages) << "checkpointing let the planner pick 64 instead of 32: faster";
  for (const auto& [s, g] : m.calls) {
    EXPECT_TRUE(s.micro_batch == kAuto || s.micro_batch == 0 || 128 % s.micro_batch == 0)
        << "only divisors of the global batch";
  }
}

TEST(Tune, LowUtilisationWithSmallMicroBatchesTriesLargerOnesFirst) {
  Recorded m;
  m.ips = [](const Settings& s) { return s.micro_batch == 0 ? 400.0 : s.micro_batch == 16 ? 150.0 : 100.0; };
  m.rules = [](const Settings& s) {
    return s.micro_batch == 8 ? std::vector<std::string>{"compute-bound", "low-utilisation"}
                              : std::vector<std::string>{"compute-bound"};
  };
  Search search(options(), m.fn(), m.clock());
  SearchResult r = search.run(bad_start());
  EXPECT_EQ(m.calls[1].second, "memory");
  EXPECT_EQ(m.calls[1].first.micro_batch, 0) << "the whole batch first";
  EXPECT_EQ(r.best.micro_batch, 0);
  for (const auto& [s, g] : m.calls) {
    EXPECT_NE(s.micro_batch, 16) << "twice the old micro-batch is not tried once the whole batch has won";
  }
}

TEST(Tune, ComputeBoundTriesPrecisionOnlyWhenAllowed) {
  Recorded m;
  m.ips = [](const Settings& s) { return s.precision == "bf16" ? 170.0 : 100.0; };
  m.rules = [](const Settings&) { return std::vector<std::string>{"compute-bound"}; };
  m.micro = [](const Settings&) -> int64_t { return 128; };
  Settings start = bad_start();
  start.micro_batch = 0;
  {
    Search search(options(), m.fn(), m.clock());
    SearchResult r = search.run(start);
    EXPECT_EQ(r.best.precision, "fp32");
    EXPECT_EQ(m.calls[1].second, "compute") << "compute-bound: compute settings first";
  }
  m.calls.clear();
  SearchOptions o = options();
  o.allow_precision = true;
  Search search(o, m.fn(), m.clock());
  SearchResult r = search.run(start);
  EXPECT_EQ(m.calls[1].first.precision, "bf16") << "allowed and compute-bound: precision is the first trial";
  EXPECT_EQ(r.best.precision, "bf16");
}

TEST(Tune, GainsBelowTheNoiseGuardAndFailedTrialsAreNotTaken) {
  Recorded m;
  // 2 workers: 2% faster (noise); prefetch 8: fails (as an out-of-memory at micro-batch 1 would).
  m.ips = [](const Settings& s) { return s.prefetch == 8 ? 0.0 : s.workers == 2 ? 102.0 : 100.0; };
  Settings start = bad_start();
  start.micro_batch = 0;
  Search search(options(), m.fn(), m.clock());
  SearchResult r = search.run(start);
  EXPECT_EQ(r.best, start);
  EXPECT_NEAR(r.speedup(), 1.0, 1e-12);
  EXPECT_TRUE(r.adopted.empty());
  EXPECT_TRUE(std::any_of(r.trials.begin(), r.trials.end(), [](const Trial& t) { return !t.error.empty(); }));
}

TEST(Tune, AGainThatDoesNotHoldWhenReMeasuredIsNotKept) {
  Recorded m;
  // 2 workers look 10% faster in the search, but not in the final alternated re-measurement.
  int finals = 0;
  m.ips = [&](const Settings& s) {
    const bool final_phase = !m.calls.empty() && m.calls.back().second == "final";
    if (final_phase) ++finals;
    return s.workers == 2 && !final_phase ? 110.0 : 100.0;
  };
  Settings start = bad_start();
  start.micro_batch = 0;
  Search search(options(), m.fn(), m.clock());
  SearchResult r = search.run(start);
  EXPECT_GT(finals, 0) << "it was re-measured";
  EXPECT_EQ(r.best, start);
  EXPECT_TRUE(r.adopted.empty());
  EXPECT_NEAR(r.speedup(), 1.0, 1e-12);
  EXPECT_THAT(r.note, HasSubstr("did not hold"));
  EXPECT_TRUE(tuned_changes(r).empty());
}

TEST(Tune, StopsWithinTheTimeBudgetLeavingRoomToReMeasure) {
  Recorded m;
  m.ips = [](const Settings& s) { return 100.0 + 10.0 * static_cast<double>(s.workers + s.prefetch + s.threads); };
  SearchOptions o = options();
  o.budget_seconds = 100;  // 10 s trials: the start, then room for 5 (with 4 re-measurements reserved)
  Search search(o, m.fn(), m.clock());
  SearchResult r = search.run(bad_start());
  EXPECT_LE(m.now, o.budget_seconds);
  EXPECT_EQ(r.trials.back().group, "final");
  EXPECT_EQ(std::count_if(r.trials.begin(), r.trials.end(), [](const Trial& t) { return t.group == "final"; }), 4);
}

TEST(Tune, StartThatFailsIsAnError) {
  Recorded m;
  m.ips = [](const Settings&) { return 0.0; };
  Search search(options(), m.fn(), m.clock());
  try {
    search.run(bad_start());
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("starting settings fail"));
    EXPECT_THAT(e.what(), HasSubstr("out of memory at micro-batch 1"));
  }
}

TEST(Tune, ChangesNameTheTrialThatMadeThem) {
  SearchResult r;
  r.start = bad_start();
  Trial t0, t1, t2;
  t0.settings = r.start;
  t0.images_per_second = 100;
  t1.settings = r.start;
  t1.settings.workers = 2;
  t1.group = "data";
  t1.images_per_second = 150;
  t2.settings = t1.settings;
  t2.settings.micro_batch = 0;
  t2.group = "memory";
  t2.images_per_second = 300;
  r.trials = {t0, t1, t2};
  r.adopted = {1, 2};
  r.best = t2.settings;
  auto ch = tuned_changes(r);
  ASSERT_EQ(ch.size(), 2u);
  EXPECT_EQ(ch[0].key, "data.workers");
  EXPECT_EQ(ch[0].value, "2");
  EXPECT_THAT(ch[0].comment, HasSubstr("was 1; trial 2 (data): 100.0 -> 150.0 img/s"));
  EXPECT_EQ(ch[1].key, "train.micro_batch");
  EXPECT_EQ(ch[1].value, "0");
  EXPECT_THAT(ch[1].comment, HasSubstr("was 8; trial 3 (memory): 150.0 -> 300.0 img/s"));
}

TEST(Tune, PatchTomlEditsKeysInPlaceAddsMissingOnesAndParsesBack) {
  const std::string in =
      "# my recipe\n[data]\ndataset = \"synthetic\"\nworkers = 1   # old comment\n\n[train]\nbatch_size = 64\n"
      "\n[model]\nname = \"resnet20\"\n";
  const std::string out = patch_toml(in, {{"data.workers", "2", "keel tune: was 1"},
                                          {"data.prefetch", "4", "keel tune: was 2"},
                                          {"train.precision", "\"bf16\"", "keel tune: was fp32"},
                                          {"run.threads", "1", "keel tune: was 2"}});
  EXPECT_THAT(out, HasSubstr("workers = 2  # keel tune: was 1\n"));
  EXPECT_THAT(out, testing::Not(HasSubstr("old comment")));
  EXPECT_THAT(out, HasSubstr("workers = 2  # keel tune: was 1\nprefetch = 4  # keel tune: was 2\n"))
      << "a missing key goes after its section's last key";
  EXPECT_THAT(out, HasSubstr("batch_size = 64\nprecision = \"bf16\"  # keel tune: was fp32\n"));
  EXPECT_THAT(out, HasSubstr("\n[run]\nthreads = 1  # keel tune: was 2\n")) << "a missing section is added";
  EXPECT_THAT(out, HasSubstr("# my recipe\n"));
  const auto c = keel::config::parse(out, "tuned.toml");
  EXPECT_EQ(c.data.workers, 2);
  EXPECT_EQ(c.data.prefetch, 4);
  EXPECT_EQ(c.train.precision, "bf16");
  EXPECT_EQ(c.run.threads, 1);
  EXPECT_EQ(c.train.batch_size, 64);
}

TEST(Tune, TuneAllowIsCheckedAndRoundTrips) {
  const auto c = keel::config::parse("[tune]\nallow = [\"precision\"]\n", "t.toml");
  ASSERT_EQ(c.tune.allow.size(), 1u);
  EXPECT_EQ(c.tune.allow[0], "precision");
  EXPECT_THAT(keel::config::to_toml(c), HasSubstr("allow = ['precision']"));
  try {
    keel::config::parse("[tune]\nallow = [\"batch_size\"]\n", "t.toml");
    FAIL() << "expected a config error";
  } catch (const keel::config::ConfigError& e) {
    EXPECT_THAT(e.what(), HasSubstr("tune.allow"));
    EXPECT_THAT(e.what(), HasSubstr("t.toml:2"));
  }
}

// The real thing on a small problem: a deliberately bad start (micro-batch 2 of 32, prefetch 1)
// must come out faster, and the tuned file must hold what was measured.
TEST(Tune, KeelTuneRecoversFromABadConfigAndWritesTheTunedFile) {
  const std::string dir = keel::test::fresh_dir("tune_cli");
  const std::string cfg = dir + "/bad.toml";
  {
    std::ofstream f(cfg);
    f << "[run]\nname = \"bad\"\ndir = \"" << dir << "/runs\"\n"
      << "[data]\ndataset = \"synthetic\"\nsynthetic_samples = 1024\nimage_size = 12\nworkers = 1\nprefetch = 1\n"
      << "mean = [0.5]\nstd = [0.25]\n"
      << "[model]\nname = \"resnet20\"\nin_channels = 1\nnum_classes = 10\n"
      << "[train]\nbatch_size = 32\neval_batch_size = 32\nmicro_batch = 2\n"
      << "[tune]\nwarmup_steps = 2\nmeasure_steps = 2\n";
  }
  auto r = keel::test::run_keel("tune " + cfg + " --max-trials 2 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_THAT(r.out, HasSubstr("trial  1 [start]"));
  const auto j = nlohmann::json::parse(keel::test::last_line(r.out));
  EXPECT_GT(j.at("speedup").get<double>(), 1.5) << r.out;
  EXPECT_NE(j.at("best").at("micro_batch"), 2) << "micro-batch 2 of 32 is what makes this config slow";
  const std::string tuned = dir + "/bad.tuned.toml";
  std::ifstream in(tuned);
  ASSERT_TRUE(in) << tuned;
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_THAT(ss.str(), HasSubstr("# keel tune: was 2; trial"));
  const auto c = keel::config::load(tuned);
  EXPECT_EQ(c.train.batch_size, 32) << "the global batch is never changed";
  EXPECT_EQ(c.train.precision, "fp32");
  std::ifstream tj(dir + "/runs/bad/tune/tune.json");
  EXPECT_TRUE(tj) << "tune.json for keel report";
}
