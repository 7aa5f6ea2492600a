// Progress: a bar on a pseudo-terminal, plain lines on a pipe, and the pure formatting helpers.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <termios.h>
#include <unistd.h>

#include "keel/monitor/progress.h"

using namespace keel::monitor;
using ::testing::HasSubstr;
using ::testing::Not;
using std::chrono::milliseconds;
using TP = Progress::Clock::time_point;

namespace {

// Reads everything from `fd` until end of file (pipe) or EIO (pty master after the slave closed).
std::string drain(int fd) {
  std::string out;
  char buf[4096];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 5000) <= 0) break;  // nothing more within 5 s: the writer is done
    const ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t at = s.find(what); at != std::string::npos; at = s.find(what, at + what.size())) ++n;
  return n;
}

// Runs `body` with a Progress writing to a pseudo-terminal (raw mode, so bytes arrive untranslated).
template <typename F>
std::string on_pty(int cols, F body) {
  int master = -1, slave = -1;
  termios raw{};
  cfmakeraw(&raw);
  winsize ws{};
  ws.ws_row = 24;
  ws.ws_col = static_cast<unsigned short>(cols);
  if (openpty(&master, &slave, nullptr, &raw, &ws) != 0) {
    ADD_FAILURE() << "openpty failed: " << std::strerror(errno);
    return "";
  }
  FILE* out = fdopen(slave, "w");
  body(out);
  fclose(out);
  std::string s = drain(master);
  close(master);
  return s;
}

template <typename F>
std::string on_pipe(F body) {
  int fds[2];
  if (pipe(fds) != 0) {
    ADD_FAILURE() << "pipe failed";
    return "";
  }
  FILE* out = fdopen(fds[1], "w");
  body(out);
  fclose(out);
  std::string s = drain(fds[0]);
  close(fds[0]);
  return s;
}

}  // namespace

TEST(Progress, FormatDuration) {
  EXPECT_EQ(format_duration(0), "0s");
  EXPECT_EQ(format_duration(7.4), "7s");
  EXPECT_EQ(format_duration(125), "2:05");
  EXPECT_EQ(format_duration(3723), "1:02:03");
  EXPECT_EQ(format_duration(-1), "?");
  EXPECT_EQ(format_duration(NAN), "?");
}

TEST(Progress, FormatBar) {
  EXPECT_EQ(format_bar(0, 10, 10), "[..........]");
  EXPECT_EQ(format_bar(5, 10, 10), "[#####.....]");
  EXPECT_EQ(format_bar(10, 10, 10), "[##########]");
  EXPECT_EQ(format_bar(20, 10, 4), "[####]");
}

TEST(Progress, BarOnAPseudoTerminal) {
  bool was_bar = false;
  const std::string s = on_pty(200, [&](FILE* out) {
    Progress p(10, "epoch 1/2", ProgressOptions().set_out(out).set_redraw_seconds(0).set_bar_width(10));
    was_bar = p.is_bar();
    TP now = Progress::Clock::now();
    for (int i = 1; i <= 10; ++i) p.update(i, {750.0, i == 5 ? 1.2345 : NAN, NAN}, now += milliseconds(100));
    p.finish();
  });
  EXPECT_TRUE(was_bar) << "isatty() on a pty must select the bar";
  EXPECT_EQ(count(s, "\r"), 10u) << s;  // one redraw per update
  EXPECT_EQ(count(s, "\n"), 1u) << s;   // the line ends only at finish
  EXPECT_EQ(s.back(), '\n');
  EXPECT_THAT(s, HasSubstr("epoch 1/2 [#####.....]  50% 5/10 eta "));
  EXPECT_THAT(s, HasSubstr("loss 1.2345"));
  EXPECT_THAT(s, HasSubstr("750 img/s"));
  // The last drawn state: full bar, no time left, the last known loss kept.
  const std::string last = s.substr(s.rfind('\r') + 1);
  EXPECT_THAT(last, HasSubstr("[##########] 100% 10/10 eta 0s loss 1.2345 750 img/s"));
}

TEST(Progress, BarIsCutToTheTerminalWidth) {
  const std::string s = on_pty(40, [&](FILE* out) {
    Progress p(1000, "a long label that does not fit", ProgressOptions().set_out(out));
    p.update(500, {1234.0, 0.5, 0.1});
  });
  const std::string last = s.substr(s.rfind('\r') + 1);
  EXPECT_EQ(last.find("\x1b[K"), 39u) << last;  // 39 visible characters, then clear-to-end-of-line
}

TEST(Progress, BarRedrawsAreThrottledButTheLastStepAlwaysDraws) {
  const std::string s = on_pty(200, [&](FILE* out) {
    Progress p(100, "", ProgressOptions().set_out(out).set_redraw_seconds(0.5));
    TP now = Progress::Clock::now();
    for (int i = 1; i <= 100; ++i) p.update(i, {}, now += milliseconds(10));  // 1 s of simulated time
  });
  // Step 1 (first draw), step 51 (half a simulated second later) and step 100 (the last always draws).
  EXPECT_EQ(count(s, "\r"), 3u) << s;
  EXPECT_THAT(s, HasSubstr(" 51/100"));
  EXPECT_THAT(s, HasSubstr("100/100"));
}

TEST(Progress, MessagesDoNotGarbleTheBar) {
  const std::string s = on_pty(200, [&](FILE* out) {
    Progress p(4, "", ProgressOptions().set_out(out).set_redraw_seconds(0));
    p.update(2);
    p.message("epoch 1 done: loss 0.5");
    p.update(4);
  });
  EXPECT_THAT(s, HasSubstr("\r\x1b[Kepoch 1 done: loss 0.5\n\r"));
  EXPECT_EQ(count(s, "\n"), 2u);
}

TEST(Progress, PlainLinesOnAPipe) {
  bool was_bar = true;
  const std::string s = on_pipe([&](FILE* out) {
    Progress p(10, "train", ProgressOptions().set_out(out).set_line_every(4));
    was_bar = p.is_bar();
    for (int i = 1; i <= 10; ++i) p.update(i, {500.0, i == 4 ? 0.75 : NAN, 0.1});
    p.finish();
  });
  EXPECT_FALSE(was_bar) << "a pipe is not a terminal";
  EXPECT_THAT(s, Not(HasSubstr("\r")));
  EXPECT_THAT(s, Not(HasSubstr("\x1b")));
  EXPECT_EQ(count(s, "\n"), 3u) << s;  // steps 4, 8 and the last
  EXPECT_THAT(s, HasSubstr("train step 4/10 loss 0.7500 lr 0.1 500 img/s eta "));
  EXPECT_THAT(s, HasSubstr("train step 8/10 loss 0.7500"));
  EXPECT_THAT(s, HasSubstr("train step 10/10 loss 0.7500 lr 0.1 500 img/s\n"));
}

TEST(Progress, LinesModeReportsWhereAnEarlyStopEnded) {
  const std::string s = on_pipe([&](FILE* out) {
    Progress p(100, "", ProgressOptions().set_out(out).set_line_every(50));
    for (int i = 1; i <= 57; ++i) p.update(i);
  });
  EXPECT_EQ(count(s, "\n"), 2u) << s;
  EXPECT_THAT(s, HasSubstr("step 50/100"));
  EXPECT_THAT(s, HasSubstr("step 57/100"));
}

TEST(Progress, ModesCanBeForced) {
  const std::string lines = on_pty(200, [&](FILE* out) {
    Progress p(2, "", ProgressOptions().set_out(out).set_mode(ProgressOptions::Mode::kLines).set_line_every(1));
    EXPECT_FALSE(p.is_bar());
    p.update(1);
    p.update(2);
  });
  EXPECT_EQ(count(lines, "\r"), 0u);
  EXPECT_EQ(count(lines, "\n"), 2u);
  const std::string bar = on_pipe([&](FILE* out) {
    Progress p(2, "", ProgressOptions().set_out(out).set_mode(ProgressOptions::Mode::kBar).set_redraw_seconds(0));
    EXPECT_TRUE(p.is_bar());
    p.update(1);
    p.update(2);
  });
  EXPECT_GE(count(bar, "\r"), 2u);
  EXPECT_EQ(count(bar, "\n"), 1u);
}

TEST(Progress, RejectsAnEmptyRun) {
  EXPECT_THROW(Progress(0), std::invalid_argument);
}
