// Budget text parsing (units, fractions, errors) and host memory facts (total, RSS).
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <fstream>
#include <stdexcept>
#include <string>

#include "keel/memory/budget.h"

namespace km = keel::memory;

namespace {
constexpr int64_t kTotal = int64_t{16} << 30;  // a 16 GiB device for the fraction cases

// The invalid_argument message parse_budget throws for `text`, or "" when it does not throw.
std::string parse_error(const std::string& text, int64_t total = kTotal) {
  try {
    km::parse_budget(text, total);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(Budget, ParsesSizesWithBinaryAndDecimalUnits) {
  EXPECT_EQ(km::parse_budget("3GiB", kTotal).bytes, int64_t{3} << 30);
  EXPECT_EQ(km::parse_budget("512MiB", kTotal).bytes, int64_t{512} << 20);
  EXPECT_EQ(km::parse_budget("1.5GB", kTotal).bytes, 1500000000);
  EXPECT_EQ(km::parse_budget("1000000", kTotal).bytes, 1000000);
  EXPECT_EQ(km::parse_budget("64KiB", kTotal).bytes, 65536);
  EXPECT_EQ(km::parse_budget("10kB", kTotal).bytes, 10000);
  EXPECT_EQ(km::parse_budget("2TiB", kTotal).bytes, int64_t{2} << 40);
  EXPECT_EQ(km::parse_budget("100B", kTotal).bytes, 100);
  EXPECT_EQ(km::parse_budget(" 3 gib ", kTotal).bytes, int64_t{3} << 30);  // case and spaces
  EXPECT_EQ(km::parse_budget("0.5GiB", kTotal).bytes, int64_t{512} << 20);
  EXPECT_EQ(km::parse_budget("9223372036854775807", kTotal).bytes, INT64_MAX);
  const km::Budget b = km::parse_budget("3GiB", kTotal);
  EXPECT_EQ(b.text, "3GiB");
  EXPECT_FALSE(b.fraction.has_value());
}

TEST(Budget, ParsesFractionsAndPercentagesOfDeviceMemory) {
  km::Budget f = km::parse_budget("0.8", kTotal);
  ASSERT_TRUE(f.fraction.has_value());
  EXPECT_DOUBLE_EQ(*f.fraction, 0.8);
  EXPECT_NEAR(static_cast<double>(f.bytes), 0.8 * kTotal, 1.0);
  km::Budget p = km::parse_budget("80%", kTotal);
  ASSERT_TRUE(p.fraction.has_value());
  EXPECT_DOUBLE_EQ(*p.fraction, 0.8);
  EXPECT_NEAR(static_cast<double>(p.bytes), 0.8 * kTotal, 1.0);
  EXPECT_EQ(km::parse_budget("1.0", kTotal).bytes, kTotal);
  EXPECT_EQ(km::parse_budget("100%", kTotal).bytes, kTotal);
  EXPECT_EQ(km::parse_budget("12.5 %", kTotal).bytes, kTotal / 8);
}

TEST(Budget, ErrorsNameTheTextAndTheAcceptedForms) {
  for (const char* bad : {"", "   ", "abc", "3XB", "-1", "0", "0B", "1.5", "150%", "0%", "0.0", "1e9", "3 GiB extra",
                          "99999999999999999999", "99999999TiB", "1..5GB", "GiB"}) {
    const std::string msg = parse_error(bad);
    ASSERT_FALSE(msg.empty()) << "\"" << bad << "\" was accepted";
    EXPECT_NE(msg.find("\"" + std::string(bad) + "\""), std::string::npos) << msg;
    EXPECT_NE(msg.find("512MiB"), std::string::npos) << msg;
    EXPECT_NE(msg.find("80%"), std::string::npos) << msg;
  }
  EXPECT_NE(parse_error("3XB").find("unknown unit \"XB\""), std::string::npos);
  EXPECT_NE(parse_error("150%").find("outside (0, 100]"), std::string::npos);
  EXPECT_NE(parse_error("0.8", /*total=*/0).find("total memory is unknown"), std::string::npos);
}

TEST(Budget, CpuTotalIsPositiveAndAtMostMemTotal) {
  std::ifstream in("/proc/meminfo");
  ASSERT_TRUE(in) << "/proc/meminfo is needed by this test";
  std::string key;
  long long kib = 0;
  in >> key >> kib;
  ASSERT_EQ(key, "MemTotal:");
  const int64_t total = km::total_cpu_memory_bytes();
  EXPECT_GT(total, 0);
  EXPECT_LE(total, kib * 1024);
  const km::Budget half = km::parse_cpu_budget("50%");
  EXPECT_NEAR(static_cast<double>(half.bytes), total / 2.0, 1.0);
}

TEST(Budget, ResidentSetGrowsWhenMemoryIsTouched) {
  const int64_t before = km::process_rss_bytes();
  ASSERT_GT(before, 0);
  at::Tensor t = at::ones({64 << 20}, at::kByte);  // 64 MiB, every page written
  const int64_t after = km::process_rss_bytes();
  EXPECT_GE(after - before, int64_t{32} << 20) << "before " << before << " after " << after;
  EXPECT_EQ(t.sum().item<int64_t>(), int64_t{64} << 20);
}

TEST(Budget, FormatsBytes) {
  EXPECT_EQ(km::format_bytes(0), "0 B");
  EXPECT_EQ(km::format_bytes(1023), "1023 B");
  EXPECT_EQ(km::format_bytes(1536), "1.50 KiB");
  EXPECT_EQ(km::format_bytes(int64_t{3} << 30), "3.00 GiB");
  EXPECT_EQ(km::format_bytes(-(int64_t{1} << 20)), "-1.00 MiB");
}
