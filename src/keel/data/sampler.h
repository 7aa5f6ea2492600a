// Sampler: the sample order of one epoch as a pure function of (seed, epoch, rank, world_size).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace keel::data {

struct SamplerOptions {
  uint64_t seed = 0;     // same seed + epoch -> same order, on every platform
  bool shuffle = true;   // false: identity order 0..n-1 (evaluation)
  bool pad = true;       // world_size > 1: pad every shard to ceil(n / W) (training: equal steps on every
                         // rank); false: rank r takes only positions r, r+W, ... < n (evaluation: every
                         // sample exactly once over all ranks, shards differ by at most one)
};

// Indices of one rank's share of an epoch. The full order is a Fisher-Yates permutation drawn
// from a private std::mt19937_64 seeded by mixing (seed, epoch) — never global RNG state — so it
// does not depend on threads, call order or standard library. For world_size > 1 the order is
// padded by wrapping around to a multiple of world_size and rank r takes positions r, r+W, ...
// (PyTorch's DistributedSampler), so every rank gets ceil(n / W) indices (without options.pad the
// padding is left out); with world_size 1 it is exactly a permutation of 0..n-1. Throws
// std::invalid_argument unless 0 <= rank < world_size.
std::vector<int64_t> epoch_indices(size_t dataset_size, const SamplerOptions& options,
                                   int64_t epoch, int64_t rank, int64_t world_size);

// How many indices epoch_indices returns per rank, without drawing them (pad = false: for this rank).
size_t samples_per_rank(size_t dataset_size, int64_t world_size, int64_t rank = 0, bool pad = true);

}  // namespace keel::data
