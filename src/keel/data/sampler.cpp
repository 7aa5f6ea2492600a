// Sampler: seeded, sharded epoch order (see sampler.h).
#include "keel/data/sampler.h"

#include <numeric>
#include <random>
#include <stdexcept>
#include <string>

namespace keel::data {
namespace {

// SplitMix64 finaliser: decorrelates nearby (seed, epoch) pairs before they seed the generator.
uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Uniform integer in [0, bound] by rejection. std::uniform_int_distribution's algorithm is
// implementation-defined, which would make the order differ between standard libraries.
uint64_t uniform_upto(std::mt19937_64& gen, uint64_t bound) {
  if (bound == UINT64_MAX) return gen();
  const uint64_t range = bound + 1;
  const uint64_t limit = UINT64_MAX - (UINT64_MAX % range + 1) % range;  // largest unbiased
  uint64_t x;
  do {
    x = gen();
  } while (x > limit);
  return x % range;
}

void check_shard(int64_t rank, int64_t world_size) {
  if (world_size < 1) {
    throw std::invalid_argument("sampler: world_size must be >= 1, got " +
                                std::to_string(world_size));
  }
  if (rank < 0 || rank >= world_size) {
    throw std::invalid_argument("sampler: rank " + std::to_string(rank) +
                                " out of range, expected 0 <= rank < world_size (" +
                                std::to_string(world_size) + ")");
  }
}

}  // namespace

size_t samples_per_rank(size_t dataset_size, int64_t world_size, int64_t rank, bool pad) {
  check_shard(rank, world_size);
  const size_t w = static_cast<size_t>(world_size), r = static_cast<size_t>(rank);
  if (pad || world_size == 1) return (dataset_size + w - 1) / w;
  return r < dataset_size ? (dataset_size - r + w - 1) / w : 0;
}

std::vector<int64_t> epoch_indices(size_t dataset_size, const SamplerOptions& options,
                                   int64_t epoch, int64_t rank, int64_t world_size) {
  check_shard(rank, world_size);
  std::vector<int64_t> order(dataset_size);
  std::iota(order.begin(), order.end(), int64_t{0});
  if (options.shuffle && dataset_size > 1) {
    std::mt19937_64 gen(mix64(mix64(options.seed) ^ static_cast<uint64_t>(epoch)));
    for (size_t i = dataset_size - 1; i > 0; --i) {
      std::swap(order[i], order[uniform_upto(gen, i)]);
    }
  }
  if (world_size == 1 || dataset_size == 0) return order;

  const size_t w = static_cast<size_t>(world_size);
  const size_t per_rank = samples_per_rank(dataset_size, world_size, rank, options.pad);
  std::vector<int64_t> shard;
  shard.reserve(per_rank);
  // Position p of the padded order is order[p % n]: the padding repeats the start, even when
  // the dataset is smaller than world_size.
  for (size_t k = 0; k < per_rank; ++k) {
    shard.push_back(order[(static_cast<size_t>(rank) + k * w) % dataset_size]);
  }
  return shard;
}

}  // namespace keel::data
