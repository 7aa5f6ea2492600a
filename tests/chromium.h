// Renders an HTML file in headless Chromium (Debian's `chromium`): the DOM after scripts ran, a PNG
// screenshot decoded to RGB, and the browser's console output.
#pragma once
#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "keel/data/image_io.h"

namespace keel::test {

inline std::string chromium_binary() {
  for (const char* p : {"/usr/bin/chromium", "/usr/bin/chromium-browser"})
    if (std::filesystem::exists(p)) return p;
  return "";
}

struct Rendered {
  int dom_status = -1, shot_status = -1;
  std::string dom;      // --dump-dom output
  std::string console;  // stderr of both runs (console messages with --enable-logging=stderr)
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // screenshot, HWC
};

inline std::string run_capture(const std::string& cmd, int* status) {
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  std::array<char, 8192> buf;
  while (size_t n = fread(buf.data(), 1, buf.size(), p)) out.append(buf.data(), n);
  const int st = pclose(p);
  *status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

// `scratch`: a directory for the browser profile, the screenshot and the logs.
inline Rendered render_in_chromium(const std::string& html_path, const std::string& scratch, int width = 1280,
                                   int height = 2400) {
  Rendered r;
  const std::string url = "file://" + std::filesystem::absolute(html_path).string();
  const std::string common = chromium_binary() + " --headless --no-sandbox --disable-gpu --no-first-run "
                             "--disable-extensions --hide-scrollbars --enable-logging=stderr --v=0 "
                             "--user-data-dir=" + scratch + "/profile --window-size=" + std::to_string(width) + "," +
                             std::to_string(height) + " ";
  r.dom = run_capture("timeout 90 " + common + "--dump-dom '" + url + "' 2>" + scratch + "/dom.log", &r.dom_status);
  const std::string png = scratch + "/shot.png";
  run_capture("timeout 90 " + common + "--screenshot=" + png + " '" + url + "' 2>" + scratch + "/shot.log",
              &r.shot_status);
  for (const char* log : {"/dom.log", "/shot.log"}) {
    std::ifstream in(scratch + log);
    std::stringstream ss;
    ss << in.rdbuf();
    r.console += ss.str();
  }
  if (std::filesystem::exists(png)) {
    std::vector<uint8_t> bytes;
    data::read_file(png, bytes);
    data::ImageDecoder dec;
    data::Pixels px;
    dec.decode(bytes.data(), bytes.size(), 3, 1.0, px);
    r.width = px.width;
    r.height = px.height;
    r.rgb = px.data;
  }
  return r;
}

// Occurrences of `needle` in `hay`.
inline size_t count_of(const std::string& hay, const std::string& needle) {
  size_t n = 0;
  for (size_t p = hay.find(needle); p != std::string::npos; p = hay.find(needle, p + needle.size())) ++n;
  return n;
}

}  // namespace keel::test
