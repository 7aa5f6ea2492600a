// Training progress display: an updating bar with ETA, images/s and loss on a terminal; plain
// periodic log lines otherwise (CI logs, files, pipes).
#pragma once
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

namespace keel::monitor {

struct ProgressOptions {
  enum class Mode { kAuto, kBar, kLines };
  Mode mode = Mode::kAuto;     // kAuto: bar when `out` is a terminal (isatty), lines otherwise
  std::FILE* out = stdout;     // not owned
  int bar_width = 24;          // characters of the bar itself
  int64_t line_every = 50;     // lines mode: one line every this many steps (and at the last step)
  double redraw_seconds = 0.1; // bar mode: least time between redraws (the last step always redraws)

  ProgressOptions& set_mode(Mode m) { mode = m; return *this; }
  ProgressOptions& set_out(std::FILE* f) { out = f; return *this; }
  ProgressOptions& set_bar_width(int w) { bar_width = w; return *this; }
  ProgressOptions& set_line_every(int64_t n) { line_every = n; return *this; }
  ProgressOptions& set_redraw_seconds(double s) { redraw_seconds = s; return *this; }
};

// Figures shown beside the step count; NaN fields are left out (the loss is only read back from
// the device every few steps, so callers pass NaN in between and the last known value is shown).
struct ProgressStats {
  double images_per_second = NAN;
  double loss = NAN;
  double lr = NAN;
};

class Progress {
 public:
  using Clock = std::chrono::steady_clock;

  // `total_steps` > 0; `label` prefixes every line (e.g. "train", "epoch 1/2").
  Progress(int64_t total_steps, std::string label = "", ProgressOptions opts = {});
  ~Progress();  // finish() if not done
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // Reports that `step` of total steps are complete (1-based).
  void update(int64_t step, const ProgressStats& stats = {}) { update(step, stats, Clock::now()); }
  void update(int64_t step, const ProgressStats& stats, Clock::time_point now);

  // Prints a full line (e.g. an epoch summary) without garbling the bar, which is redrawn after it.
  void message(const std::string& line);

  // Ends the display: draws the final state (bar mode: and ends the line; lines mode: a last line
  // unless the current step was just printed). Idempotent.
  void finish();

  bool is_bar() const { return bar_; }

 private:
  std::string render_bar(Clock::time_point now) const;
  std::string render_line(Clock::time_point now) const;
  double eta_seconds(Clock::time_point now) const;
  void draw(Clock::time_point now);
  void print_line(Clock::time_point now);

  int64_t total_;
  std::string label_;
  ProgressOptions opts_;
  bool bar_ = false;
  bool finished_ = false;
  bool drawn_ = false;    // bar mode: a partial line is on screen
  bool dirty_ = false;    // bar mode: updated since the last draw
  int64_t line_step_ = -1;  // lines mode: the step of the last line printed
  int64_t step_ = 0;
  double ips_ = NAN, loss_ = NAN, lr_ = NAN;
  Clock::time_point start_;
  Clock::time_point last_draw_{};
};

// "7s", "2:05", "1:02:03" (h:mm:ss); "?" for negative or non-finite input.
std::string format_duration(double seconds);

// "[#########...............]" of `width` characters for `done` of `total`.
std::string format_bar(int64_t done, int64_t total, int width);

}  // namespace keel::monitor
