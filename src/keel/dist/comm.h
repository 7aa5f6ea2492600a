// Comm: one rank's connection to a data-parallel job (c10d store + process group), with a timeout on
// every wait and failures reported with the rank to blame. The only keel interface to c10d: the rest of
// keel never includes a c10d header.
#pragma once
#include <ATen/ATen.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>

#include "keel/dist/env.h"

namespace keel::dist {

// A failed or timed-out rendezvous or collective; what() names this rank, the operation and, when it
// could be told, the rank that died or is stuck.
class DistError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct CommOptions {
  std::string backend = "gloo";   // gloo | nccl
  std::string store = "tcp";      // tcp (MASTER_ADDR:MASTER_PORT, rank 0 serves) | file (store_path)
  std::string store_path;         // file store: a path every rank can reach, fresh for each job
  std::string interface;          // Gloo: network interface (e.g. "eth0"); "" = this host's address
  double timeout_seconds = 120;   // every wait: rendezvous, each collective, the store
  std::string config_text;        // the resolved config; ranks must agree on it
  at::Device device = at::kCPU;   // where tensors live (NCCL: this rank's GPU)
};

// Internal: one c10d process group behind a keel-owned interface (groups.cpp).
struct Group;
struct Pending;

class Comm {
 public:
  // Rendezvous: store, join check (every rank present within the timeout, same world size, same
  // config), process group. Throws DistError naming what is missing or different.
  static std::unique_ptr<Comm> connect(const DistEnv& env, const CommOptions& o);
  ~Comm();
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;

  int64_t rank() const { return env_.rank; }
  int64_t world_size() const { return env_.world_size; }
  const DistEnv& env() const { return env_; }
  double timeout_seconds() const { return o_.timeout_seconds; }

  // In-place sum over ranks, started now; wait() finishes it (what: for error messages).
  std::shared_ptr<Pending> allreduce_async(at::Tensor t, std::string what);
  void wait(Pending& p);
  // When the operation completed (steady clock, seconds since epoch of the clock), or < 0 if not yet.
  static double completed_at(const Pending& p);
  static double started_at(const Pending& p);
  // Blocking: in-place sum over ranks; rank root's values to every rank.
  void allreduce(at::Tensor t, const std::string& what);
  void broadcast(at::Tensor t, int64_t root, const std::string& what);

  // Reports a failure of `what` (cause: the underlying error text): looks at the peers' heartbeats to
  // say which rank died or is stuck (2.5 s) and throws DistError. Later destruction does not wait on the
  // failed group (it is leaked: its threads may be blocked on the dead peer).
  [[noreturn]] void fail(const std::string& what, const std::string& cause);

  static double now_seconds();

 private:
  Comm(DistEnv env, CommOptions o);
  void heartbeat_loop();
  std::string diagnose();

  DistEnv env_;
  CommOptions o_;
  struct StoreHandle;
  std::unique_ptr<StoreHandle> store_;   // rendezvous store (+ a second client for heartbeats)
  std::unique_ptr<Group> group_;
  std::atomic<int64_t> ops_{0};          // collectives issued (in the heartbeat: "how far this rank got")
  std::atomic<bool> stop_{false}, failed_{false};
  std::thread heartbeat_;
};

}  // namespace keel::dist
