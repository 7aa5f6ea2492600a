// Rendezvous, collectives with timeouts, heartbeats and failure diagnosis (see comm.h).
#include "keel/dist/comm.h"

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <fmt/format.h>

#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <vector>

#include "keel/dist/group.h"

namespace keel::dist {
namespace {

using ms = std::chrono::milliseconds;
constexpr double kHeartbeatSeconds = 0.5;
constexpr double kDeadAfterSeconds = 2.5;  // no new heartbeat for this long: the rank is dead

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

std::string to_string(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }
std::vector<uint8_t> to_bytes(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }

// The first line where two config texts differ, for "ranks disagree" errors.
std::string first_difference(const std::string& a, const std::string& b) {
  std::istringstream sa(a), sb(b);
  std::string la, lb;
  for (int line = 1;; ++line) {
    const bool ga = static_cast<bool>(std::getline(sa, la)), gb = static_cast<bool>(std::getline(sb, lb));
    if (!ga && !gb) return "no line differs";
    if (!ga || !gb || la != lb) {
      return fmt::format("line {}: here `{}`, there `{}`", line, ga ? la : "<end>", gb ? lb : "<end>");
    }
  }
}

}  // namespace

struct Comm::StoreHandle {
  c10::intrusive_ptr<c10d::Store> main;       // rendezvous + the process group (under a prefix)
  c10::intrusive_ptr<c10d::Store> heartbeat;  // its own client: the heartbeat thread never shares a socket
  std::string where;                          // "TCPStore 127.0.0.1:29500 (served by rank 0)" / "FileStore PATH"
};

double Comm::now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

Comm::Comm(DistEnv env, CommOptions o) : env_(std::move(env)), o_(std::move(o)) {}

std::unique_ptr<Comm> Comm::connect(const DistEnv& env, const CommOptions& o) {
  std::unique_ptr<Comm> c(new Comm(env, o));
  const int64_t r = env.rank, w = env.world_size;
  const auto timeout = ms(static_cast<int64_t>(o.timeout_seconds * 1000));
  const std::string me = fmt::format("dist: rank {} of {}", r, w);
  c->store_ = std::make_unique<StoreHandle>();
  auto& s = *c->store_;
  try {
    if (o.store == "file") {
      if (o.store_path.empty()) throw DistError(me + ": dist.store = \"file\" needs dist.store_path");
      s.where = "FileStore " + o.store_path;
      // Two instances per rank (rendezvous + heartbeat): the file is removed when all 2W are closed.
      s.main = c10::make_intrusive<c10d::FileStore>(o.store_path, static_cast<int>(2 * w));
      s.heartbeat = c10::make_intrusive<c10d::FileStore>(o.store_path, static_cast<int>(2 * w));
    } else {
      s.where = fmt::format("TCPStore {}:{} (served by rank 0)", env.master_addr, env.master_port);
      c10d::TCPStoreOptions so;
      so.port = static_cast<uint16_t>(env.master_port);
      so.isServer = r == 0;
      so.numWorkers = static_cast<size_t>(w);
      so.waitWorkers = false;  // keel's own join check below says who is missing
      so.timeout = timeout;
      s.main = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
      so.isServer = false;
      s.heartbeat = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
    }
    s.main->setTimeout(timeout);
    s.heartbeat->setTimeout(ms(3000));
  } catch (const DistError&) {
    throw;
  } catch (const std::exception& e) {
    if (o.store == "file") throw DistError(fmt::format("{}: cannot open {}: {}", me, s.where, first_line(e.what())));
    throw DistError(fmt::format(
        "{}: {} the TCP store at MASTER_ADDR={} MASTER_PORT={} within dist.timeout = {} s: {}", me,
        r == 0 ? "could not start (listen on)" : "could not reach", env.master_addr, env.master_port,
        o.timeout_seconds, first_line(e.what())));
  }

  // Join check: every rank publishes its world size and a fingerprint of its resolved config, then waits
  // (polling, to say who is missing) until all have; a disagreement is reported by every rank at once.
  const std::string cfg_hash = std::to_string(std::hash<std::string>()(o.config_text));
  s.main->set(fmt::format("keel/config/{}", r), to_bytes(o.config_text));
  s.main->set(fmt::format("keel/meta/{}", r), to_bytes(fmt::format("{} {}", w, cfg_hash)));
  const double deadline = now_seconds() + o.timeout_seconds;
  // Rank 0 serves the TCP store: on a disagreement it keeps it up a moment longer, so that the other ranks
  // can still read why and report it themselves.
  auto disagree = [&](const std::string& msg) {
    if (r == 0 && o.store == "tcp") std::this_thread::sleep_for(ms(1500));
    return DistError(msg);
  };
  for (;;) {
    std::vector<int64_t> missing;
    for (int64_t k = 0; k < w; ++k) {
      const std::string key = fmt::format("keel/meta/{}", k);
      if (!s.main->check({key})) {
        missing.push_back(k);
        continue;
      }
      std::istringstream meta(to_string(s.main->get(key)));
      int64_t their_w = 0;
      std::string their_hash;
      meta >> their_w >> their_hash;
      if (their_w != w) {
        throw disagree(fmt::format("{}: world size mismatch: rank {} was started with world size {}, this rank "
                                    "with {} (WORLD_SIZE / --nproc must be the same for every rank)",
                                    me, k, their_w, w));
      }
      if (their_hash != cfg_hash) {
        const std::string theirs = to_string(s.main->get(fmt::format("keel/config/{}", k)));
        throw disagree(fmt::format("{}: rank {} runs a different resolved config ({}); every rank must get the "
                                    "same config file and --set overrides",
                                    me, k, first_difference(o.config_text, theirs)));
      }
    }
    if (missing.empty()) break;
    if (now_seconds() > deadline) {
      std::string list;
      for (auto k : missing) list += (list.empty() ? "" : ", ") + std::to_string(k);
      throw DistError(fmt::format("{}: rendezvous timed out after dist.timeout = {} s at {}: rank(s) {} never "
                                  "joined (not started, crashed, or started with another MASTER_ADDR/MASTER_PORT)",
                                  me, o.timeout_seconds, s.where, list));
    }
    std::this_thread::sleep_for(ms(50));
  }

  try {
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("keel/pg", s.main);
    c->group_ = o.backend == "nccl" ? make_nccl_group(prefixed, static_cast<int>(r), static_cast<int>(w), o)
                                    : make_gloo_group(prefixed, static_cast<int>(r), static_cast<int>(w), o);
  } catch (const DistError&) {
    throw;
  } catch (const std::exception& e) {
    throw DistError(fmt::format("{}: creating the {} process group failed: {}", me, o.backend, first_line(e.what())));
  }
  c->heartbeat_ = std::thread([p = c.get()] { p->heartbeat_loop(); });
  return c;
}

Comm::~Comm() {
  stop_ = true;
  if (heartbeat_.joinable()) heartbeat_.join();
  if (failed_ && group_) group_->leak();
}

void Comm::heartbeat_loop() {
  int64_t beat = 0;
  const std::string key = fmt::format("keel/hb/{}", env_.rank);
  while (!stop_) {
    try {
      store_->heartbeat->set(key, to_bytes(fmt::format("{} {}", ++beat, ops_.load())));
    } catch (const std::exception&) {
      // The store is gone (rank 0 died): the next collective fails and diagnose() says so.
    }
    for (int i = 0; i < 10 && !stop_; ++i) std::this_thread::sleep_for(ms(static_cast<int64_t>(kHeartbeatSeconds * 100)));
  }
}

std::string Comm::diagnose() {
  auto read = [&](std::map<int64_t, std::pair<int64_t, int64_t>>& out) {
    for (int64_t k = 0; k < env_.world_size; ++k) {
      if (k == env_.rank) continue;
      const std::string key = fmt::format("keel/hb/{}", k);
      if (!store_->heartbeat->check({key})) continue;
      std::istringstream v(to_string(store_->heartbeat->get(key)));
      int64_t beat = 0, ops = 0;
      v >> beat >> ops;
      out[k] = {beat, ops};
    }
  };
  std::map<int64_t, std::pair<int64_t, int64_t>> a, b;
  try {
    read(a);
    std::this_thread::sleep_for(ms(static_cast<int64_t>(kDeadAfterSeconds * 1000)));
    read(b);
  } catch (const std::exception& e) {
    if (o_.store == "tcp" && env_.rank != 0) {
      return fmt::format("rank 0 is dead or unreachable (its {} no longer answers: {})", store_->where,
                         first_line(e.what()));
    }
    return fmt::format("the peers could not be checked ({}: {})", store_->where, first_line(e.what()));
  }
  std::vector<std::string> dead, behind;
  for (int64_t k = 0; k < env_.world_size; ++k) {
    if (k == env_.rank) continue;
    if (!b.count(k)) {
      dead.push_back(fmt::format("rank {} (never sent a heartbeat)", k));
    } else if (a.count(k) && a[k].first == b[k].first) {
      dead.push_back(fmt::format("rank {} (no heartbeat for {:.1f} s: dead, killed or frozen)", k, kDeadAfterSeconds));
    } else if (b[k].second < ops_.load()) {
      behind.push_back(fmt::format("rank {} (alive but stuck: {} collectives issued, this rank {})", k,
                                   b[k].second, ops_.load()));
    }
  }
  std::string out;
  for (auto& d : dead) out += (out.empty() ? "" : "; ") + d;
  for (auto& d : behind) out += (out.empty() ? "" : "; ") + d;
  return out.empty() ? "every peer is alive and as far as this rank (a network or backend error?)" : out;
}

void Comm::fail(const std::string& what, const std::string& cause) {
  failed_ = true;
  const std::string msg = fmt::format("dist: rank {} of {}: {} failed: {} [{}]", env_.rank, env_.world_size, what,
                                      diagnose(), first_line(cause));
  throw DistError(msg);
}

std::shared_ptr<Pending> Comm::allreduce_async(at::Tensor t, std::string what) {
  auto p = std::make_shared<Pending>();
  p->what = std::move(what);
  p->started = now_seconds();
  ++ops_;
  try {
    std::vector<at::Tensor> v{std::move(t)};
    p->work = group_->allreduce(v);
    auto done = p->done;
    p->work->getFuture()->addCallback([done](c10::ivalue::Future&) { done->store(now_seconds()); });
  } catch (const DistError&) {
    throw;
  } catch (const std::exception& e) {
    fail(p->what, e.what());
  }
  return p;
}

void Comm::wait(Pending& p) {
  if (p.waited) return;
  p.waited = true;
  bool ok = false;
  std::string cause = fmt::format("no result within dist.timeout = {} s", o_.timeout_seconds);
  try {
    ok = p.work->wait(ms(static_cast<int64_t>(o_.timeout_seconds * 1000)));
  } catch (const std::exception& e) {
    cause = e.what();
  }
  if (!ok) fail(p.what, cause);
  if (p.done->load() < 0) p.done->store(now_seconds());
}

double Comm::completed_at(const Pending& p) { return p.done->load(); }
double Comm::started_at(const Pending& p) { return p.started; }

void Comm::allreduce(at::Tensor t, const std::string& what) {
  auto p = allreduce_async(std::move(t), what);
  wait(*p);
}

void Comm::broadcast(at::Tensor t, int64_t root, const std::string& what) {
  Pending p;
  p.what = what;
  p.started = now_seconds();
  ++ops_;
  try {
    std::vector<at::Tensor> v{std::move(t)};
    p.work = group_->broadcast(v, root);
  } catch (const std::exception& e) {
    fail(what, e.what());
  }
  wait(p);
}

}  // namespace keel::dist
