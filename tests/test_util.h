// Helpers shared by the test areas.
#pragma once
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace keel::test {

// A fresh, empty directory for one test: under $KEEL_TEST_TMP (set by ctest to build/test-tmp) or /tmp.
inline std::string fresh_dir(const std::string& name) {
  const char* base = std::getenv("KEEL_TEST_TMP");
  auto p = std::filesystem::path(base ? base : "/tmp") / ("keel-" + name);
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

// The whole file ("" when it cannot be read).
inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace keel::test
