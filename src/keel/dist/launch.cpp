// Local multi-process launcher (see launch.h).
#include "keel/dist/launch.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>

#include <fmt/format.h>

extern char** environ;

namespace keel::dist {
namespace {

// A TCP port on the loopback interface nobody listens on now (the kernel's choice).
int free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error(std::string("--nproc: socket(): ") + std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof(a);
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    const std::string err = std::strerror(errno);
    close(fd);
    throw std::runtime_error("--nproc: no free TCP port on 127.0.0.1: " + err);
  }
  close(fd);
  return ntohs(a.sin_port);
}

std::string describe(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with code {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return fmt::format("was killed by signal {} ({})", WTERMSIG(status), strsignal(WTERMSIG(status)));
  return "stopped";
}

}  // namespace

int launch_local(const LaunchOptions& o) {
  for (const char* v : {"RANK", "WORLD_SIZE"}) {
    if (std::getenv(v)) {
      throw std::runtime_error(fmt::format("--nproc {} starts the ranks itself, but {}={} is already set (this "
                                           "process was started by a launcher): drop --nproc, or unset {}",
                                           o.nproc, v, std::getenv(v), v));
    }
  }
  const int port = free_port();
  // Everything the children need is built before fork(): between fork and exec only async-signal-safe calls.
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) throw std::runtime_error("--nproc: cannot find this executable (/proc/self/exe)");
  exe[n] = 0;
  std::vector<std::string> inherited;
  for (char** e = environ; *e; ++e) {
    const std::string kv = *e;
    const std::string k = kv.substr(0, kv.find('='));
    if (k != "LOCAL_RANK" && k != "MASTER_ADDR" && k != "MASTER_PORT") inherited.push_back(kv);
  }
  struct Child {
    pid_t pid = -1;
    int status = 0;
    bool done = false;
  };
  std::vector<Child> kids(static_cast<size_t>(o.nproc));
  std::vector<char*> argv = {exe};
  for (const auto& a : o.args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::fflush(stdout);
  std::fflush(stderr);
  for (int r = 0; r < o.nproc; ++r) {
    std::vector<std::string> env = inherited;
    env.push_back(fmt::format("RANK={}", r));
    env.push_back(fmt::format("WORLD_SIZE={}", o.nproc));
    env.push_back(fmt::format("LOCAL_RANK={}", r));
    env.push_back("MASTER_ADDR=127.0.0.1");
    env.push_back(fmt::format("MASTER_PORT={}", port));
    std::vector<char*> envp;
    for (auto& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    int out = -1;
    if (r > 0) {
      const std::string path = fmt::format("{}/rank{}.log", o.log_dir, r);
      out = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (out < 0) throw std::runtime_error(fmt::format("--nproc: cannot write {}: {}", path, std::strerror(errno)));
    }
    const pid_t pid = fork();
    if (pid == 0) {
      if (out >= 0) dup2(out, 1);
      execve(exe, argv.data(), envp.data());
      _exit(127);
    }
    if (out >= 0) close(out);
    if (pid < 0) throw std::runtime_error(std::string("--nproc: fork(): ") + std::strerror(errno));
    kids[static_cast<size_t>(r)].pid = pid;
  }
  std::string started;
  for (int r = 0; r < o.nproc; ++r) started += fmt::format("{}rank {} (pid {})", r ? ", " : "", r, kids[static_cast<size_t>(r)].pid);
  fmt::print("keel: launched {} ranks on 127.0.0.1:{}: {}; ranks > 0 log to {}/rank<R>.log\n", o.nproc, port, started,
             o.log_dir);
  std::fflush(stdout);
  // Ctrl-C reaches every rank (same process group); the launcher itself waits for them to stop.
  struct sigaction ign {}, old_int {};
  ign.sa_handler = SIG_IGN;
  sigaction(SIGINT, &ign, &old_int);

  int first_failed = -1;
  auto deadline = std::chrono::steady_clock::time_point::max();
  int running = o.nproc;
  while (running > 0) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, first_failed < 0 ? 0 : WNOHANG);
    if (pid > 0) {
      for (int r = 0; r < o.nproc; ++r) {
        auto& k = kids[static_cast<size_t>(r)];
        if (k.pid != pid) continue;
        k.done = true;
        k.status = status;
        --running;
        // 130: stopped by Ctrl-C with a checkpoint (every rank stops after the same step): not a failure.
        const bool ok = WIFEXITED(status) && (WEXITSTATUS(status) == 0 || WEXITSTATUS(status) == 130);
        if (!ok) {
          fmt::print(stderr, "keel: rank {} (pid {}) {}\n", r, pid, describe(status));
          if (first_failed < 0) {
            first_failed = r;
            deadline = std::chrono::steady_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>((o.timeout_seconds + 15) * 1000));
          }
        }
      }
      continue;
    }
    if (pid < 0 && errno == EINTR) continue;
    if (pid < 0) break;
    if (std::chrono::steady_clock::now() > deadline) {
      for (int r = 0; r < o.nproc; ++r) {
        auto& k = kids[static_cast<size_t>(r)];
        if (k.done) continue;
        fmt::print(stderr, "keel: rank {} (pid {}) still running {:.0f} s after rank {} failed: killing it\n", r, k.pid,
                   o.timeout_seconds + 15, first_failed);
        kill(k.pid, SIGKILL);
      }
      deadline = std::chrono::steady_clock::time_point::max();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  sigaction(SIGINT, &old_int, nullptr);
  if (first_failed < 0) {
    for (const auto& k : kids) {
      if (WIFEXITED(k.status) && WEXITSTATUS(k.status) == 130) return 130;  // interrupted; rank 0 said how to resume
    }
    return 0;
  }
  const int st = kids[static_cast<size_t>(first_failed)].status;
  fmt::print(stderr, "keel: data-parallel run failed: rank {} {} first\n", first_failed, describe(st));
  return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
}

}  // namespace keel::dist
