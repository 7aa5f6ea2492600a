// TensorBoard events: CRC-32C test vectors, TFRecord framing, and a round trip through an
// independent reader (scripts/read_tfevents.py: Debian's python3-protobuf and python3-crcmod).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <cstring>
#include <sstream>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "keel/monitor/tensorboard.h"
#include "monitor_test_util.h"

using namespace keel::monitor;
using keel::monitor::test_util::fresh_dir;
using keel::monitor::test_util::read_file;
using ::testing::HasSubstr;
using ::testing::StartsWith;

namespace {

uint32_t le32(const std::string& s, size_t at) {
  uint32_t v;
  std::memcpy(&v, s.data() + at, 4);
  return v;
}

uint64_t le64(const std::string& s, size_t at) {
  uint64_t v;
  std::memcpy(&v, s.data() + at, 8);
  return v;
}

// Splits a TFRecord file into its records, checking both CRCs of each.
std::vector<std::string> split_records(const std::string& file) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < file.size()) {
    EXPECT_GE(file.size() - pos, 16u) << "truncated record at " << pos;
    if (file.size() - pos < 16) break;
    const uint64_t len = le64(file, pos);
    EXPECT_EQ(le32(file, pos + 8), masked_crc32c(file.data() + pos, 8)) << "length CRC at " << pos;
    const std::string data = file.substr(pos + 12, len);
    EXPECT_EQ(le32(file, pos + 12 + len), masked_crc32c(data.data(), data.size())) << "data CRC at " << pos;
    out.push_back(data);
    pos += 16 + len;
  }
  return out;
}

struct ReaderResult {
  int code;
  std::string out;
};

// Runs `python scripts/<script> 'arg'` and captures stdout and stderr.
ReaderResult run_python(const std::string& python, const std::string& script, const std::string& arg) {
  const std::string cmd = python + " " + KEEL_SOURCE_DIR + "/scripts/" + script + " '" + arg + "' 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return {-1, "popen failed"};
  std::string out;
  std::array<char, 4096> buf;
  while (size_t n = fread(buf.data(), 1, buf.size(), p)) out.append(buf.data(), n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

std::vector<nlohmann::json> parse_lines(const std::string& out) {
  std::vector<nlohmann::json> v;
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);) v.push_back(nlohmann::json::parse(line));
  return v;
}

}  // namespace

TEST(TensorBoard, Crc32cMatchesRfc3720Vectors) {
  const char* digits = "123456789";
  EXPECT_EQ(crc32c(digits, 9), 0xE3069283u);
  std::array<unsigned char, 32> buf{};
  EXPECT_EQ(crc32c(buf.data(), buf.size()), 0x8A9136AAu);  // 32 bytes of zeros (RFC 3720 B.4)
  buf.fill(0xFF);
  EXPECT_EQ(crc32c(buf.data(), buf.size()), 0x62A8AB43u);  // 32 bytes of 0xFF
  for (int i = 0; i < 32; ++i) buf[i] = static_cast<unsigned char>(i);
  EXPECT_EQ(crc32c(buf.data(), buf.size()), 0x46DD794Eu);  // 0x00..0x1F
  // A running CRC over pieces equals the CRC of the whole.
  EXPECT_EQ(crc32c(digits + 4, 5, crc32c(digits, 4)), 0xE3069283u);
}

TEST(TensorBoard, MaskedCrcIsRotatedAndOffset) {
  const uint32_t c = 0xE3069283u;
  EXPECT_EQ(masked_crc32c("123456789", 9), ((c >> 15) | (c << 17)) + 0xa282ead8u);
}

TEST(TensorBoard, RecordFraming) {
  const std::string rec = tfrecord("hello");
  ASSERT_EQ(rec.size(), 8u + 4u + 5u + 4u);
  EXPECT_EQ(le64(rec, 0), 5u);
  EXPECT_EQ(rec.substr(12, 5), "hello");
  EXPECT_EQ(split_records(rec), std::vector<std::string>{"hello"});
}

TEST(TensorBoard, EventEncodingFollowsTheProtoFieldNumbers) {
  // Event{wall_time=1.5 (field 1, fixed64), file_version="brain.Event:2" (field 3, bytes)}
  std::string fv = encode_file_version_event(1.5);
  ASSERT_EQ(fv.size(), 1u + 8u + 1u + 1u + 13u);
  EXPECT_EQ(static_cast<unsigned char>(fv[0]), 0x09);
  EXPECT_EQ(static_cast<unsigned char>(fv[9]), 0x1A);
  EXPECT_EQ(fv[10], 13);
  EXPECT_EQ(fv.substr(11), "brain.Event:2");
  // Event{wall_time (0x09), step=300 (0x10, varint ac 02), summary (0x2a){value (0x0a){tag (0x0a), simple_value (0x15)}}}
  std::string e = encode_scalar_event(2.0, 300, "loss", 0.5f);
  const std::string tail = std::string("\x10\xac\x02\x2a\x0d\x0a\x0b\x0a\x04loss\x15\x00\x00\x00\x3f", 18);
  EXPECT_EQ(e.substr(9), tail);
}

TEST(TensorBoard, FileNameAndFirstRecord) {
  const std::string dir = fresh_dir("tb-name");
  const long before = static_cast<long>(std::time(nullptr));
  TensorBoardWriter w(dir);
  const long after = static_cast<long>(std::time(nullptr));
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  const std::string name = std::filesystem::path(w.path()).filename().string();
  EXPECT_THAT(name, StartsWith("events.out.tfevents."));
  const std::string rest = name.substr(std::strlen("events.out.tfevents."));
  const long t = std::stol(rest.substr(0, rest.find('.')));
  EXPECT_GE(t, before);
  EXPECT_LE(t, after);
  EXPECT_EQ(rest.substr(rest.find('.') + 1), host);
  auto recs = split_records(read_file(w.path()));  // the first record is on disk before any scalar
  ASSERT_EQ(recs.size(), 1u);
  EXPECT_THAT(recs[0], HasSubstr("brain.Event:2"));
}

TEST(TensorBoard, TwoWritersInOneDirectoryGetTwoFiles) {
  const std::string dir = fresh_dir("tb-two");
  TensorBoardWriter a(dir);
  TensorBoardWriter b(dir);
  EXPECT_NE(a.path(), b.path());
  TensorBoardWriter c(dir, ".eval");
  EXPECT_THAT(c.path(), ::testing::EndsWith(".eval"));
}

TEST(TensorBoard, ScalarsRoundTripThroughAnIndependentReader) {
  const std::string dir = fresh_dir("tb-roundtrip");
  struct S {
    std::string tag;
    double value;
    int64_t step;
    double wall;
  };
  const std::vector<S> written = {
      {"train/loss", 2.302585, 0, 1700000000.25},  // step 0 and value of a proto3 default are still read back
      {"train/loss", 0.0, 1, 1700000001.5},
      {"train/lr", 0.2, 1, 1700000001.5},
      {"train/images_per_s", 751.5, 50, 1700000010.0},
      {"time/share.data_wait", -1.5e-3, 1LL << 40, 1700000020.0},
      {"négatif", -7.25, -3, 1700000030.0},
  };
  std::string path;
  {
    TensorBoardWriter w(dir);
    path = w.path();
    for (const auto& s : written) w.add_scalar(s.tag, s.value, s.step, s.wall);
    w.flush();
  }
  EXPECT_EQ(split_records(read_file(path)).size(), written.size() + 1);

  ReaderResult r = run_python("/usr/bin/python3", "read_tfevents.py", path);
  ASSERT_EQ(r.code, 0) << "scripts/read_tfevents.py failed (needs python3-protobuf and python3-crcmod; "
                          "scripts/setup.sh installs them):\n"
                       << r.out;
  auto events = parse_lines(r.out);
  ASSERT_EQ(events.size(), written.size() + 1) << r.out;
  EXPECT_EQ(events[0]["file_version"], "brain.Event:2");
  EXPECT_GT(events[0]["wall_time"].get<double>(), 1.6e9);
  for (size_t i = 0; i < written.size(); ++i) {
    const auto& e = events[i + 1];
    SCOPED_TRACE(written[i].tag);
    EXPECT_EQ(e["step"].get<int64_t>(), written[i].step);
    EXPECT_EQ(e["wall_time"].get<double>(), written[i].wall);
    ASSERT_EQ(e["values"].size(), 1u);
    EXPECT_EQ(e["values"][0]["tag"].get<std::string>(), written[i].tag);
    EXPECT_EQ(e["values"][0]["simple_value"].get<double>(), static_cast<double>(static_cast<float>(written[i].value)));
  }
}

TEST(TensorBoard, IndependentReaderRejectsACorruptFile) {
  // Guards the round trip against a reader that accepts anything.
  const std::string dir = fresh_dir("tb-corrupt");
  std::string path;
  {
    TensorBoardWriter w(dir);
    path = w.path();
    w.add_scalar("loss", 1.0, 1, 1700000000.0);
  }
  std::string bytes = read_file(path);
  bytes[bytes.size() - 6] ^= 0x01;  // a bit of the last record's data (the float value)
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  ReaderResult r = run_python("/usr/bin/python3", "read_tfevents.py", path);
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_THAT(r.out, HasSubstr("data CRC mismatch"));
}

TEST(TensorBoard, TensorBoardItselfReadsTheScalars) {
#ifndef KEEL_PEER_PYTHON
  GTEST_SKIP() << "no PyPI tensorboard: this build's LibTorch is not the .venv-torch wheel "
                  "(scripts/setup-pytorch.sh installs tensorboard there)";
#else
  const std::string dir = fresh_dir("tb-tensorboard");
  {
    TensorBoardWriter w(dir);
    for (int64_t step = 0; step < 5; ++step) {
      w.add_scalar("train/loss", 2.5 - 0.5 * static_cast<double>(step), step, 1700000000.0 + step);
      w.add_scalar("train/lr", 0.1, step, 1700000000.0 + step);
    }
    w.flush();
  }
  ReaderResult r = run_python(KEEL_PEER_PYTHON, "read_tensorboard.py", dir);
  ASSERT_EQ(r.code, 0) << r.out;
  auto lines = parse_lines(r.out);
  ASSERT_EQ(lines.size(), 10u) << r.out;
  for (size_t i = 0; i < 5; ++i) {  // tags sorted: train/loss first
    EXPECT_EQ(lines[i]["tag"], "train/loss");
    EXPECT_EQ(lines[i]["step"].get<int64_t>(), static_cast<int64_t>(i));
    EXPECT_DOUBLE_EQ(lines[i]["value"].get<double>(), 2.5 - 0.5 * static_cast<double>(i));
    EXPECT_DOUBLE_EQ(lines[i]["wall_time"].get<double>(), 1700000000.0 + static_cast<double>(i));
    EXPECT_EQ(lines[i + 5]["tag"], "train/lr");
    EXPECT_NEAR(lines[i + 5]["value"].get<double>(), 0.1, 1e-7);
  }
#endif
}
