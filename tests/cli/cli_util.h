// Helpers for tests that run the keel executable: run to completion, or start as a child process
// that the test reads line by line and kills.
#pragma once
#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>

namespace keel::test {

struct RunResult {
  int code;         // exit status
  std::string out;  // stdout and stderr
};

// Runs `keel ARGS` (through the shell) to completion.
inline RunResult run_keel(const std::string& args) {
  const std::string cmd = std::string(KEEL_BINARY_DIR) + "/keel " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  std::array<char, 4096> buf;
  while (size_t n = fread(buf.data(), 1, buf.size(), p)) out.append(buf.data(), n);
  int status = pclose(p);
  return {WEXITSTATUS(status), out};
}

// The last non-empty line of a command's output (where --json puts its summary).
inline std::string last_line(std::string s) {
  while (!s.empty() && s.back() == '\n') s.pop_back();
  return s.substr(s.rfind('\n') == std::string::npos ? 0 : s.rfind('\n') + 1);
}

// A wait status as one number: the exit code, or 128 + the signal that ended the process (as a shell).
inline int exit_code(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }

// `keel ARGV...` as a child process whose stdout+stderr the test reads through a pipe.
class KeelChild {
 public:
  explicit KeelChild(const std::vector<std::string>& args) {
    // Everything the child needs is built before fork(): between fork and exec only async-signal-safe calls.
    const std::string exe = std::string(KEEL_BINARY_DIR) + "/keel";
    std::vector<char*> argv = {const_cast<char*>(exe.c_str())};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    int fds[2];
    if (pipe(fds) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      dup2(fds[1], 1);
      dup2(fds[1], 2);
      close(fds[0]);
      close(fds[1]);
      execv(exe.c_str(), argv.data());
      _exit(127);
    }
    close(fds[1]);
    out_ = fdopen(fds[0], "r");
  }
  ~KeelChild() {
    if (pid_ > 0 && !reaped_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (out_) fclose(out_);
  }
  KeelChild(const KeelChild&) = delete;
  KeelChild& operator=(const KeelChild&) = delete;

  bool started() const { return pid_ > 0 && out_ != nullptr; }

  // Reads output lines until one contains `marker` (true) or the output ends (false).
  bool wait_for(const std::string& marker) {
    if (!out_) return false;
    char* line = nullptr;
    size_t cap = 0;
    bool found = false;
    while (getline(&line, &cap, out_) != -1) {
      log_ += line;
      if (std::string(line).find(marker) != std::string::npos) {
        found = true;
        break;
      }
    }
    free(line);
    return found;
  }

  // Sends `sig` (e.g. SIGINT) without waiting.
  void send(int sig) {
    if (pid_ > 0) kill(pid_, sig);
  }

  // Sends SIGKILL and reaps the child; returns the wait status.
  int kill_now() {
    if (pid_ <= 0) return -1;
    kill(pid_, SIGKILL);
    return reap();
  }

  // Reads the rest of the output and reaps the child; returns the wait status.
  int finish() {
    wait_for("\x01never\x01");
    return reap();
  }

  const std::string& log() const { return log_; }

 private:
  int reap() {
    if (pid_ <= 0) return -1;
    int status = 0;
    waitpid(pid_, &status, 0);
    reaped_ = true;
    return status;
  }
  pid_t pid_ = -1;
  FILE* out_ = nullptr;
  bool reaped_ = false;
  std::string log_;
};

}  // namespace keel::test
