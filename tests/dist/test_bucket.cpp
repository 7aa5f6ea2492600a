// Unit tests of the data-parallel bookkeeping: bucket assignment, bucket readiness order, and the
// launcher environment (RANK, WORLD_SIZE, ... and SLURM's) with its errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>

#include "keel/dist/bucket.h"
#include "keel/dist/env.h"

using keel::dist::assign_buckets;
using keel::dist::ReadyTracker;
using testing::HasSubstr;

TEST(Buckets, ReverseOrderAndCapRespected) {
  // Parameters 0..4 of 40, 40, 100, 30, 30 bytes, cap 100: filled from the last one backwards.
  auto b = assign_buckets({40, 40, 100, 30, 30}, {"f", "f", "f", "f", "f"}, 100);
  ASSERT_EQ(b.size(), 3u);
  EXPECT_EQ(b[0], (std::vector<size_t>{4, 3}));  // 60 bytes; +100 would exceed the cap
  EXPECT_EQ(b[1], (std::vector<size_t>{2}));     // exactly the cap
  EXPECT_EQ(b[2], (std::vector<size_t>{1, 0}));
}

TEST(Buckets, OversizedParameterAloneAndKeysSeparate) {
  auto b = assign_buckets({10, 500, 10, 10}, {"f", "f", "h", "h"}, 64);
  ASSERT_EQ(b.size(), 3u);
  EXPECT_EQ(b[0], (std::vector<size_t>{3, 2}));  // key "h"
  EXPECT_EQ(b[1], (std::vector<size_t>{1}));     // larger than the cap: its own bucket
  EXPECT_EQ(b[2], (std::vector<size_t>{0}));     // key "f" again, but after a full bucket
  // Every parameter exactly once.
  std::map<size_t, int> seen;
  for (auto& bucket : b) for (size_t p : bucket) ++seen[p];
  EXPECT_EQ(seen.size(), 4u);
  for (auto& [p, n] : seen) EXPECT_EQ(n, 1) << p;
  EXPECT_THROW(assign_buckets({1}, {"f"}, 0), std::invalid_argument);
  EXPECT_THROW(assign_buckets({1, 2}, {"f"}, 10), std::invalid_argument);
}

TEST(Buckets, LaunchStrictlyInOrder) {
  ReadyTracker t({{4, 3}, {2}, {1, 0}}, 5);
  // Bucket 1 complete before bucket 0: it waits (every rank sends buckets in the same order).
  EXPECT_TRUE(t.mark_ready(2).empty());
  EXPECT_TRUE(t.mark_ready(4).empty());
  EXPECT_EQ(t.mark_ready(3), (std::vector<size_t>{0, 1}));
  EXPECT_TRUE(t.mark_ready(0).empty());
  EXPECT_EQ(t.launched(), 2u);
  // Parameter 1 never got a gradient: the end of backward sends the rest.
  EXPECT_EQ(t.launch_rest(), (std::vector<size_t>{2}));
  EXPECT_TRUE(t.launch_rest().empty());
  // A gradient produced twice in one pass is an error, not a silently early bucket.
  EXPECT_THROW(t.mark_ready(0), std::logic_error);
  t.reset();
  EXPECT_EQ(t.launched(), 0u);
  EXPECT_TRUE(t.mark_ready(3).empty());
  EXPECT_EQ(t.mark_ready(4), (std::vector<size_t>{0}));
}

namespace {
std::function<std::optional<std::string>(const std::string&)> env_of(std::map<std::string, std::string> m) {
  return [m](const std::string& k) -> std::optional<std::string> {
    auto it = m.find(k);
    return it == m.end() ? std::nullopt : std::optional<std::string>(it->second);
  };
}
std::string env_error(std::map<std::string, std::string> m, bool master = true) {
  try {
    keel::dist::read_env(master, env_of(std::move(m)));
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "no error";
}
}  // namespace

TEST(DistEnv, TorchrunAndSlurmConventions) {
  auto none = keel::dist::read_env(true, env_of({}));
  EXPECT_FALSE(none.active());
  auto t = keel::dist::read_env(true, env_of({{"RANK", "3"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "1"},
                                              {"MASTER_ADDR", "node0"}, {"MASTER_PORT", "29500"}}));
  EXPECT_EQ(t.rank, 3);
  EXPECT_EQ(t.world_size, 4);
  EXPECT_EQ(t.local_rank, 1);
  EXPECT_EQ(t.master_addr, "node0");
  EXPECT_EQ(t.master_port, 29500);
  auto s = keel::dist::read_env(true, env_of({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"},
                                              {"MASTER_ADDR", "n1"}, {"MASTER_PORT", "1234"}}));
  EXPECT_EQ(s.rank, 5);
  EXPECT_EQ(s.world_size, 8);
  EXPECT_EQ(s.local_rank, 1);
  EXPECT_THAT(s.source, HasSubstr("slurm"));
  // The file store needs no master address.
  EXPECT_EQ(keel::dist::read_env(false, env_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}})).world_size, 2);
}

TEST(DistEnv, BadValuesNamed) {
  EXPECT_THAT(env_error({{"RANK", "2"}, {"WORLD_SIZE", "2"}}), HasSubstr("RANK=2 is out of range for WORLD_SIZE=2"));
  EXPECT_THAT(env_error({{"RANK", "x"}, {"WORLD_SIZE", "2"}}), HasSubstr("RANK=\"x\" is not an integer"));
  EXPECT_THAT(env_error({{"RANK", "0"}}), HasSubstr("RANK is set but WORLD_SIZE is not"));
  EXPECT_THAT(env_error({{"RANK", "0"}, {"WORLD_SIZE", "2"}}), HasSubstr("needs MASTER_ADDR and MASTER_PORT"));
  EXPECT_THAT(env_error({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "70000"}}),
              HasSubstr("MASTER_PORT=70000 is not a TCP port"));
  EXPECT_THAT(env_error({{"RANK", "0"}, {"WORLD_SIZE", "0"}}), HasSubstr("WORLD_SIZE=0 must be >= 1"));
}
