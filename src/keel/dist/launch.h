// `keel train --nproc N`: starts N local ranks of this executable (a one-machine torchrun), watches them,
// and stops the rest when one fails.
#pragma once
#include <string>
#include <vector>

namespace keel::dist {

struct LaunchOptions {
  int nproc = 2;
  std::vector<std::string> args;  // the ranks' command line after the executable ("train", CONFIG, ...)
  std::string log_dir;            // ranks > 0 write their stdout to <log_dir>/rank<R>.log (stderr stays)
  double timeout_seconds = 120;   // dist.timeout_seconds: how long the others get to stop on their own
};

// Runs the ranks with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT. Returns
// 0 when every rank exits 0, 130 when they stopped on Ctrl-C (exit code 130, after a checkpoint); otherwise prints which rank failed first (exit code or signal), gives the
// others timeout + 15 s to stop on their own (they notice within dist.timeout_seconds), kills those still
// running (and says so), and returns the failed rank's exit code (1 when it was killed by a signal).
// Throws std::runtime_error when RANK or WORLD_SIZE is already set (a launcher inside a launcher).
int launch_local(const LaunchOptions& o);

}  // namespace keel::dist
