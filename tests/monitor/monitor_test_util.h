// Helpers shared by the monitor tests: scratch directories and whole-file reads.
#pragma once
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "../test_util.h"

namespace keel::monitor::test_util {

// A fresh directory under $KEEL_TEST_TMP (or /tmp), emptied first so reruns start clean.
inline std::string fresh_dir(const std::string& name) {
  const char* base = std::getenv("KEEL_TEST_TMP");
  auto p = std::filesystem::path(base ? base : "/tmp") / ("keel-monitor-" + name);
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

using keel::test::read_file;

}  // namespace keel::monitor::test_util
