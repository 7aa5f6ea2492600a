// Helpers shared by the data-layer tests: a scratch directory, a fake dataset, a hang guard.
#pragma once
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <future>
#include <stdexcept>
#include <string>
#include <thread>

#include "keel/data/dataset.h"

namespace keel::data::testing {

// A fresh directory for the running test (ctest may run tests in parallel processes).
inline std::filesystem::path scratch_dir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::filesystem::path dir = std::filesystem::path(KEEL_BINARY_DIR) / "test-tmp" / "data" /
                              (std::string(info->test_suite_name()) + "." + info->name());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

// Sample i's image: its index in the first 4 bytes (little-endian), then a pattern of i.
inline void fake_image(size_t index, uint8_t* dst, size_t bytes) {
  for (size_t p = 0; p < bytes; ++p) dst[p] = static_cast<uint8_t>(index * 31 + p * 7);
  for (size_t b = 0; b < 4 && b < bytes; ++b) dst[b] = static_cast<uint8_t>(index >> (8 * b));
}

// Recovers the sample index fake_image wrote.
inline int64_t fake_index(const uint8_t* img) {
  return int64_t{img[0]} | int64_t{img[1]} << 8 | int64_t{img[2]} << 16 | int64_t{img[3]} << 24;
}

// In-memory dataset of `n` 2x3x4 images; label = index % 7. Optionally throws on one index and
// sleeps per read so that workers finish out of order.
class FakeDataset : public Dataset {
 public:
  explicit FakeDataset(size_t n, int64_t throw_at = -1, int64_t sleep_us = 0)
      : n_(n), throw_at_(throw_at), sleep_us_(sleep_us) {}
  size_t size() const override { return n_; }
  ImageShape shape() const override { return {2, 3, 4}; }
  int64_t num_classes() const override { return 7; }
  int64_t label(size_t i) const override { return static_cast<int64_t>(i % 7); }
  void read_image(size_t i, uint8_t* dst) const override {
    // Varying delays make later batches finish before earlier ones.
    if (sleep_us_ > 0) std::this_thread::sleep_for(std::chrono::microseconds(sleep_us_ * (1 + i % 3)));
    if (static_cast<int64_t>(i) == throw_at_) throw std::runtime_error("boom: unreadable sample");
    fake_image(i, dst, 24);
  }
  std::string describe(size_t i) const override { return "fake[" + std::to_string(i) + "]"; }

 private:
  size_t n_;
  int64_t throw_at_;
  int64_t sleep_us_;
};

// Runs fn on another thread; if it does not finish within `seconds` the test fails and the
// process exits, because a hung join cannot be cancelled and must not hang the suite.
inline void run_bounded(const std::function<void()>& fn, double seconds, const char* what) {
  auto task = std::make_shared<std::packaged_task<void()>>(fn);
  std::future<void> done = task->get_future();
  std::thread([task] { (*task)(); }).detach();
  if (done.wait_for(std::chrono::duration<double>(seconds)) != std::future_status::ready) {
    std::fprintf(stderr, "FAILED: %s did not finish within %.0f s (hang)\n", what, seconds);
    std::fflush(stderr);
    std::_Exit(1);
  }
  done.get();  // rethrows fn's exception on this thread
}

}  // namespace keel::data::testing
