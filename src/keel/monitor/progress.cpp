// Progress bar / periodic lines.
#include "keel/monitor/progress.h"

#include <algorithm>
#include <fmt/format.h>
#include <stdexcept>
#include <sys/ioctl.h>
#include <unistd.h>

namespace keel::monitor {

namespace {

// Terminal columns, or 0 when unknown; the bar line is cut to fit since a wrapped line breaks '\r'.
int terminal_columns(std::FILE* f) {
  winsize ws{};
  if (ioctl(fileno(f), TIOCGWINSZ, &ws) == 0) return ws.ws_col;
  return 0;
}

std::string stats_text(double ips, double loss, double lr) {
  std::string s;
  if (std::isfinite(loss)) s += fmt::format(" loss {:.4f}", loss);
  if (std::isfinite(lr)) s += fmt::format(" lr {:.4g}", lr);
  if (std::isfinite(ips)) s += fmt::format(" {:.0f} img/s", ips);
  return s;
}

}  // namespace

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = static_cast<int64_t>(std::llround(seconds));
  if (s < 60) return fmt::format("{}s", s);
  if (s < 3600) return fmt::format("{}:{:02d}", s / 60, s % 60);
  return fmt::format("{}:{:02d}:{:02d}", s / 3600, (s / 60) % 60, s % 60);
}

std::string format_bar(int64_t done, int64_t total, int width) {
  if (width <= 0) return "";
  const int64_t filled = total > 0 ? std::clamp<int64_t>(done * width / total, 0, width) : 0;
  return "[" + std::string(filled, '#') + std::string(width - filled, '.') + "]";
}

Progress::Progress(int64_t total_steps, std::string label, ProgressOptions opts)
    : total_(total_steps), label_(std::move(label)), opts_(opts), start_(Clock::now()) {
  if (total_ <= 0) throw std::invalid_argument("Progress: total_steps must be > 0 (got " + std::to_string(total_) + ")");
  if (!opts_.out) throw std::invalid_argument("Progress: no output stream");
  if (opts_.line_every < 1) opts_.line_every = 1;
  switch (opts_.mode) {
    case ProgressOptions::Mode::kBar: bar_ = true; break;
    case ProgressOptions::Mode::kLines: bar_ = false; break;
    case ProgressOptions::Mode::kAuto: bar_ = isatty(fileno(opts_.out)) == 1; break;
  }
}

Progress::~Progress() {
  try {
    finish();
  } catch (...) {
    // A destructor must not throw; the display is cosmetic.
  }
}

double Progress::eta_seconds(Clock::time_point now) const {
  if (step_ <= 0) return NAN;
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  return elapsed / step_ * (total_ - step_);
}

std::string Progress::render_bar(Clock::time_point now) const {
  const double pct = 100.0 * step_ / total_;
  std::string s = label_.empty() ? "" : label_ + " ";
  s += fmt::format("{} {:3.0f}% {}/{} eta {}", format_bar(step_, total_, opts_.bar_width), pct, step_, total_,
                   step_ >= total_ ? "0s" : format_duration(eta_seconds(now)));
  s += stats_text(ips_, loss_, lr_);
  return s;
}

std::string Progress::render_line(Clock::time_point now) const {
  std::string s = label_.empty() ? "" : label_ + " ";
  s += fmt::format("step {}/{}", step_, total_);
  s += stats_text(ips_, loss_, lr_);
  if (step_ < total_) s += " eta " + format_duration(eta_seconds(now));
  return s + "\n";
}

void Progress::draw(Clock::time_point now) {
  std::string line = render_bar(now);
  const int cols = terminal_columns(opts_.out);
  if (cols > 1 && static_cast<int>(line.size()) > cols - 1) line.resize(cols - 1);
  // '\r' returns to column 0 and ESC[K clears what a longer previous line left behind.
  std::fputs(("\r" + line + "\x1b[K").c_str(), opts_.out);
  std::fflush(opts_.out);
  drawn_ = true;
  dirty_ = false;
  last_draw_ = now;
}

void Progress::print_line(Clock::time_point now) {
  std::fputs(render_line(now).c_str(), opts_.out);
  std::fflush(opts_.out);
  line_step_ = step_;
}

void Progress::update(int64_t step, const ProgressStats& stats, Clock::time_point now) {
  if (finished_) return;
  step_ = std::clamp<int64_t>(step, 0, total_);
  if (std::isfinite(stats.images_per_second)) ips_ = stats.images_per_second;
  if (std::isfinite(stats.loss)) loss_ = stats.loss;
  if (std::isfinite(stats.lr)) lr_ = stats.lr;
  if (bar_) {
    dirty_ = true;
    // Redrawing every step would cost more than a fast step on a slow terminal.
    const bool due = !drawn_ || step_ >= total_ ||
                     std::chrono::duration<double>(now - last_draw_).count() >= opts_.redraw_seconds;
    if (due) draw(now);
  } else if (step_ % opts_.line_every == 0 || step_ >= total_) {
    print_line(now);
  }
}

void Progress::message(const std::string& line) {
  if (bar_ && drawn_) std::fputs("\r\x1b[K", opts_.out);
  std::fputs((line + "\n").c_str(), opts_.out);
  if (bar_ && drawn_ && !finished_) {
    draw(Clock::now());
  } else {
    std::fflush(opts_.out);
  }
}

void Progress::finish() {
  if (finished_) return;
  finished_ = true;
  if (bar_) {
    if (dirty_) draw(Clock::now());  // the last updates may have been throttled
    if (drawn_) {
      std::fputs("\n", opts_.out);
      std::fflush(opts_.out);
    }
  } else if (step_ > 0 && line_step_ != step_) {
    print_line(Clock::now());  // a run stopped between lines still reports where it ended
  }
}

}  // namespace keel::monitor
