// Ctrl-C handling for `keel train`: the first SIGINT asks the training loop to stop after the current
// step (it then writes a checkpoint); a second one exits at once.
#pragma once

namespace keel::util {

// Installs the SIGINT handler for its lifetime and restores the previous one after. Not nestable.
class InterruptGuard {
 public:
  InterruptGuard();
  ~InterruptGuard();
  InterruptGuard(const InterruptGuard&) = delete;
  InterruptGuard& operator=(const InterruptGuard&) = delete;
};

// True once a SIGINT arrived under an InterruptGuard (always false without one).
bool stop_requested();

}  // namespace keel::util
