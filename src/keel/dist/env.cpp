// DistEnv from the environment (see env.h).
#include "keel/dist/env.h"

#include <cstdlib>
#include <stdexcept>

#include <fmt/format.h>

namespace keel::dist {
namespace {

int64_t parse_int(const std::string& var, const std::string& v) {
  size_t used = 0;
  int64_t x = 0;
  try {
    x = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (v.empty() || used != v.size()) {
    throw std::invalid_argument(fmt::format("environment variable {}=\"{}\" is not an integer", var, v));
  }
  return x;
}

}  // namespace

std::string DistEnv::str() const {
  return fmt::format("rank {} of {} (local {}){}{}", rank, world_size, local_rank,
                     master_addr.empty() ? "" : fmt::format(", master {}:{}", master_addr, master_port),
                     source.empty() ? "" : ", from " + source);
}

DistEnv read_env(bool require_master, const std::function<std::optional<std::string>(const std::string&)>& getenv) {
  auto get = [&](const std::string& k) -> std::optional<std::string> {
    if (getenv) return getenv(k);
    const char* v = std::getenv(k.c_str());
    return v ? std::optional<std::string>(v) : std::nullopt;
  };
  DistEnv e;
  std::string rank_var = "RANK", world_var = "WORLD_SIZE", local_var = "LOCAL_RANK";
  auto rank = get("RANK"), world = get("WORLD_SIZE");
  if (!rank && !world) {
    rank = get("SLURM_PROCID");
    world = get("SLURM_NTASKS");
    rank_var = "SLURM_PROCID";
    world_var = "SLURM_NTASKS";
    local_var = "SLURM_LOCALID";
    if (!rank && !world) return e;  // a single process
    e.source = "slurm (SLURM_PROCID/SLURM_NTASKS)";
  } else {
    e.source = "torchrun (RANK/WORLD_SIZE)";
  }
  if (!rank || !world) {
    throw std::invalid_argument(fmt::format("{} is set but {} is not: a data-parallel launch sets both",
                                            rank ? rank_var : world_var, rank ? world_var : rank_var));
  }
  e.rank = parse_int(rank_var, *rank);
  e.world_size = parse_int(world_var, *world);
  if (e.world_size < 1) throw std::invalid_argument(fmt::format("{}={} must be >= 1", world_var, e.world_size));
  if (e.rank < 0 || e.rank >= e.world_size) {
    throw std::invalid_argument(fmt::format("{}={} is out of range for {}={} (expected 0 <= rank < world size)",
                                            rank_var, e.rank, world_var, e.world_size));
  }
  if (auto l = get(local_var)) {
    e.local_rank = parse_int(local_var, *l);
    if (e.local_rank < 0) throw std::invalid_argument(fmt::format("{}={} must be >= 0", local_var, e.local_rank));
  } else {
    e.local_rank = e.rank;
  }
  auto addr = get("MASTER_ADDR"), port = get("MASTER_PORT");
  if (addr) e.master_addr = *addr;
  if (port) {
    e.master_port = parse_int("MASTER_PORT", *port);
    if (e.master_port < 1 || e.master_port > 65535) {
      throw std::invalid_argument(fmt::format("MASTER_PORT={} is not a TCP port (1..65535)", e.master_port));
    }
  }
  if (require_master && e.world_size > 1 && (e.master_addr.empty() || !port)) {
    throw std::invalid_argument(fmt::format(
        "{}={} {}={}: the TCP store (dist.store = \"tcp\") needs MASTER_ADDR and MASTER_PORT (rank 0's host and a "
        "free port); {} missing. torchrun sets them; under SLURM export them in the batch script "
        "(docs/distributed.md), or use dist.store = \"file\" on a shared filesystem",
        rank_var, e.rank, world_var, e.world_size,
        e.master_addr.empty() && !port ? "both are" : e.master_addr.empty() ? "MASTER_ADDR is" : "MASTER_PORT is"));
  }
  return e;
}

}  // namespace keel::dist
