// TensorBoard event files. Wire format of the fields used, from TensorFlow's protos:
//   tensorflow/core/util/event.proto:
//     message Event { double wall_time = 1; int64 step = 2;
//                     oneof what { string file_version = 3; ... Summary summary = 5; ... } }
//   tensorflow/core/framework/summary.proto:
//     message Summary { message Value { string tag = 1; oneof value { float simple_value = 2; ... } }
//                       repeated Value value = 1; }
// A protobuf field key is (field_number << 3) | wire_type; wire types: 0 varint, 1 fixed64,
// 2 length-delimited, 5 fixed32. Numbers are little endian. As protobuf's own proto3 serializer
// does, plain fields at their default (step 0, empty tag) are omitted; oneof members never are.
#include "keel/monitor/tensorboard.h"

#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <stdexcept>
#include <unistd.h>

namespace keel::monitor {

namespace {

// Table for the byte-at-a-time CRC-32C, built once at first use.
const std::array<uint32_t, 256>& crc32c_table() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  return table;
}

uint32_t mask(uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xa282ead8u; }

void put_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out += static_cast<char>((v >> (8 * i)) & 0xff);
}

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out += static_cast<char>((v & 0x7f) | 0x80);
    v >>= 7;
  }
  out += static_cast<char>(v);
}

enum WireType : uint32_t { kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kFixed32 = 5 };

void put_key(std::string& out, uint32_t field, WireType type) { put_varint(out, (field << 3) | type); }

void put_bytes(std::string& out, uint32_t field, std::string_view bytes) {
  put_key(out, field, kLengthDelimited);
  put_varint(out, bytes.size());
  out.append(bytes.data(), bytes.size());
}

void put_double(std::string& out, uint32_t field, double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  put_key(out, field, kFixed64);
  put_le(out, bits, 8);
}

void put_float(std::string& out, uint32_t field, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  put_key(out, field, kFixed32);
  put_le(out, bits, 4);
}

// Field numbers (see the protos quoted at the top of this file).
constexpr uint32_t kEventWallTime = 1, kEventStep = 2, kEventFileVersion = 3, kEventSummary = 5;
constexpr uint32_t kSummaryValue = 1;
constexpr uint32_t kValueTag = 1, kValueSimpleValue = 2;

// proto3's test for "default" on a double compares bits, so -0.0 is written and +0.0 is not.
bool is_positive_zero(double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits == 0;
}

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const auto& t = crc32c_table();
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = t[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

uint32_t masked_crc32c(const void* data, size_t n) { return mask(crc32c(data, n)); }

std::string tfrecord(std::string_view data) {
  std::string out;
  out.reserve(data.size() + 16);
  put_le(out, data.size(), 8);
  put_le(out, masked_crc32c(out.data(), 8), 4);
  out.append(data.data(), data.size());
  put_le(out, masked_crc32c(data.data(), data.size()), 4);
  return out;
}

std::string encode_file_version_event(double wall_time, std::string_view version) {
  std::string e;
  if (!is_positive_zero(wall_time)) put_double(e, kEventWallTime, wall_time);
  put_bytes(e, kEventFileVersion, version);
  return e;
}

std::string encode_scalar_event(double wall_time, int64_t step, std::string_view tag, float value) {
  std::string v;
  if (!tag.empty()) put_bytes(v, kValueTag, tag);
  put_float(v, kValueSimpleValue, value);
  std::string summary;
  put_bytes(summary, kSummaryValue, v);
  std::string e;
  if (!is_positive_zero(wall_time)) put_double(e, kEventWallTime, wall_time);
  if (step != 0) {
    put_key(e, kEventStep, kVarint);
    put_varint(e, static_cast<uint64_t>(step));  // int64: negatives take ten bytes, as protobuf does
  }
  put_bytes(e, kEventSummary, summary);
  return e;
}

TensorBoardWriter::TensorBoardWriter(const std::string& log_dir, const std::string& filename_suffix) {
  std::error_code ec;
  std::filesystem::create_directories(log_dir, ec);
  if (ec) throw std::runtime_error(log_dir + ": cannot create TensorBoard log directory (" + ec.message() + ")");
  char host[256] = {};
  if (gethostname(host, sizeof host - 1) != 0 || host[0] == '\0') std::strcpy(host, "localhost");
  const std::string base = (std::filesystem::path(log_dir) / ("events.out.tfevents." +
                                                             std::to_string(std::time(nullptr)) + "." + host +
                                                             filename_suffix))
                               .string();
  // Two writers started in the same second would share a name; "x" never overwrites another run's file.
  for (int n = 1; !out_; ++n) {
    path_ = n == 1 ? base : base + "." + std::to_string(n);
    out_ = std::fopen(path_.c_str(), "wbx");
    if (!out_ && (errno != EEXIST || n >= 100))
      throw std::runtime_error(path_ + ": cannot create TensorBoard events file (" + std::strerror(errno) + ")");
  }
  write_record(encode_file_version_event(unix_now()));
  flush();
}

TensorBoardWriter::~TensorBoardWriter() {
  if (out_) std::fclose(out_);
}

void TensorBoardWriter::add_scalar(std::string_view tag, double value, int64_t step, double wall_time) {
  write_record(encode_scalar_event(wall_time < 0 ? unix_now() : wall_time, step, tag, static_cast<float>(value)));
}

void TensorBoardWriter::flush() {
  if (std::fflush(out_) != 0) throw std::runtime_error(path_ + ": write failed (" + std::strerror(errno) + ")");
}

void TensorBoardWriter::write_record(const std::string& event) {
  const std::string rec = tfrecord(event);
  if (std::fwrite(rec.data(), 1, rec.size(), out_) != rec.size())
    throw std::runtime_error(path_ + ": write failed (" + std::strerror(errno) + ")");
}

}  // namespace keel::monitor
