// SIGINT -> a flag the training loop polls once per step; the second SIGINT -> _exit(130).
#include "keel/util/interrupt.h"

#include <csignal>
#include <cstring>
#include <stdexcept>
#include <unistd.h>

namespace keel::util {
namespace {

volatile std::sig_atomic_t g_requested = 0;
struct sigaction g_previous;
bool g_installed = false;

void write_stderr(const char* s) {
  // write(2) is async-signal-safe; stdio is not.
  ssize_t r = ::write(STDERR_FILENO, s, std::strlen(s));
  (void)r;
}

void on_sigint(int) {
  if (g_requested) {
    write_stderr("\nkeel: second Ctrl-C: exiting now, without a checkpoint\n");
    ::_exit(130);
  }
  g_requested = 1;
  write_stderr("\nkeel: Ctrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to exit now)\n");
}

}  // namespace

InterruptGuard::InterruptGuard() {
  if (g_installed) throw std::logic_error("InterruptGuard: already installed");
  g_requested = 0;
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigint;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // blocking reads (loader waits, file I/O) continue rather than fail with EINTR
  if (sigaction(SIGINT, &sa, &g_previous) != 0) throw std::runtime_error("InterruptGuard: sigaction(SIGINT) failed");
  g_installed = true;
}

InterruptGuard::~InterruptGuard() {
  sigaction(SIGINT, &g_previous, nullptr);
  g_installed = false;
  g_requested = 0;
}

bool stop_requested() { return g_requested != 0; }

}  // namespace keel::util
