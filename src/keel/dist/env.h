// Rendezvous settings of one rank, read from the launcher's environment (torchrun / SLURM conventions).
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

namespace keel::dist {

// Where this process sits in a data-parallel job. world_size 1 = a single process (no rendezvous).
struct DistEnv {
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t local_rank = 0;       // rank on this machine (selects the CUDA device under NCCL)
  std::string master_addr;      // TCPStore host (rank 0's machine)
  int64_t master_port = 0;      // TCPStore port
  std::string source;           // "torchrun" (RANK/WORLD_SIZE), "slurm" (SLURM_PROCID/SLURM_NTASKS) or "" (none)
  bool active() const { return world_size > 1; }
  std::string str() const;      // "rank 1 of 2 (local 1), master 127.0.0.1:29500, from RANK/WORLD_SIZE"
};

// Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (torchrun), falling back to SLURM's
// SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID when RANK/WORLD_SIZE are absent (an srun launch; MASTER_ADDR and
// MASTER_PORT must then be exported by the batch script). `getenv` is injectable for tests. Neither set:
// world_size 1. Throws std::invalid_argument naming the variable and its value when a value is not an
// integer, out of range (0 <= RANK < WORLD_SIZE), or when one of a pair is set without the other.
// MASTER_ADDR/MASTER_PORT are only required for the TCP store (require_master).
DistEnv read_env(bool require_master,
                 const std::function<std::optional<std::string>(const std::string&)>& getenv = {});

}  // namespace keel::dist
