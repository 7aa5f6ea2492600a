// Tests for epoch_indices: determinism, permutation, sharding like DistributedSampler.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <stdexcept>

#include "keel/data/sampler.h"

namespace keel::data {
namespace {

std::vector<int64_t> iota(size_t n) {
  std::vector<int64_t> v(n);
  std::iota(v.begin(), v.end(), int64_t{0});
  return v;
}

TEST(Sampler, SameArgumentsSameOrder) {
  SamplerOptions o;
  o.seed = 42;
  EXPECT_EQ(epoch_indices(1000, o, 3, 0, 1), epoch_indices(1000, o, 3, 0, 1));
  EXPECT_NE(epoch_indices(1000, o, 3, 0, 1), epoch_indices(1000, o, 4, 0, 1));
  SamplerOptions other = o;
  other.seed = 43;
  EXPECT_NE(epoch_indices(1000, o, 3, 0, 1), epoch_indices(1000, other, 3, 0, 1));
  EXPECT_NE(epoch_indices(1000, o, 0, 0, 1), iota(1000));
}

// The order is part of resumability: a checkpoint taken on one build resumes on another, so a
// change of generator, seeding or shuffle must be deliberate. (Value recorded from this code.)
TEST(Sampler, OrderIsPinned) {
  const std::vector<int64_t> pinned = {6, 1, 2, 4, 7, 5, 3, 0, 9, 8};
  EXPECT_EQ(epoch_indices(10, SamplerOptions{}, 0, 0, 1), pinned);
}

TEST(Sampler, PermutationForEverySize) {
  for (size_t n : {0, 1, 2, 3, 17, 1000}) {
    for (int64_t epoch = 0; epoch < 3; ++epoch) {
      auto order = epoch_indices(n, SamplerOptions{}, epoch, 0, 1);
      std::sort(order.begin(), order.end());
      EXPECT_EQ(order, iota(n)) << "n=" << n << " epoch=" << epoch;
    }
  }
}

TEST(Sampler, NoShuffleIsIdentity) {
  SamplerOptions o;
  o.shuffle = false;
  EXPECT_EQ(epoch_indices(7, o, 5, 0, 1), iota(7));
  EXPECT_EQ(epoch_indices(7, o, 5, 1, 3), (std::vector<int64_t>{1, 4, 0}));  // padded with 0
}

TEST(Sampler, ShardsCoverEverySampleAndPadByWrapping) {
  SamplerOptions o;
  o.seed = 7;
  for (size_t n : {1, 2, 9, 10, 11, 100}) {
    for (int64_t world : {1, 2, 3, 4}) {
      const auto full = epoch_indices(n, o, 2, 0, 1);
      const size_t per_rank = (n + world - 1) / world;
      EXPECT_EQ(samples_per_rank(n, world), per_rank);
      std::map<int64_t, int> seen;
      std::vector<int64_t> interleaved(per_rank * world);
      for (int64_t r = 0; r < world; ++r) {
        const auto shard = epoch_indices(n, o, 2, r, world);
        ASSERT_EQ(shard.size(), per_rank) << "n=" << n << " world=" << world << " rank=" << r;
        for (size_t k = 0; k < shard.size(); ++k) {
          ++seen[shard[k]];
          interleaved[r + k * world] = shard[k];
        }
      }
      EXPECT_EQ(seen.size(), n) << "n=" << n << " world=" << world;  // no sample lost
      // Rank r takes every world-th position of the full order, padded from its start.
      for (size_t p = 0; p < interleaved.size(); ++p) {
        EXPECT_EQ(interleaved[p], full[p % n]) << "position " << p;
      }
    }
  }
}

// Without padding (evaluation under data parallelism) every sample is in exactly one shard, once.
TEST(Sampler, UnpaddedShardsCoverEachSampleOnce) {
  SamplerOptions o;
  o.seed = 3;
  o.pad = false;
  for (size_t n : {0, 1, 2, 5, 7, 10}) {
    for (int64_t world : {1, 2, 3}) {
      std::map<int64_t, int> seen;
      for (int64_t r = 0; r < world; ++r) {
        const auto shard = epoch_indices(n, o, 1, r, world);
        EXPECT_EQ(shard.size(), samples_per_rank(n, world, r, false)) << n << " " << world << " " << r;
        for (auto i : shard) ++seen[i];
      }
      EXPECT_EQ(seen.size(), n) << n << " " << world;
      for (auto& [i, c] : seen) EXPECT_EQ(c, 1) << "sample " << i << " n " << n << " world " << world;
    }
  }
}

TEST(Sampler, RejectsBadShard) {
  EXPECT_THROW(epoch_indices(10, SamplerOptions{}, 0, 2, 2), std::invalid_argument);
  EXPECT_THROW(epoch_indices(10, SamplerOptions{}, 0, -1, 2), std::invalid_argument);
  EXPECT_THROW(epoch_indices(10, SamplerOptions{}, 0, 0, 0), std::invalid_argument);
}

}  // namespace
}  // namespace keel::data
