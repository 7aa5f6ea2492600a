// TensorBoard event-file writer: scalars as tf.Event records in TFRecord framing, readable by the
// TensorBoard people already use. No protobuf or TensorFlow dependency: the few fields are hand-encoded.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace keel::monitor {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) as TFRecord uses; `crc` continues a running value.
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);

// TFRecord's masked CRC: rotate right by 15 and add 0xa282ead8, so CRCs of CRC-bearing data stay strong.
uint32_t masked_crc32c(const void* data, size_t n);

// One TFRecord: uint64 length (little endian), masked crc32c of those 8 bytes, data, masked crc32c of data.
std::string tfrecord(std::string_view data);

// Serialized tensorflow.Event{wall_time, file_version} (the first record of every events file).
std::string encode_file_version_event(double wall_time, std::string_view version = "brain.Event:2");

// Serialized tensorflow.Event{wall_time, step, summary{value{tag, simple_value}}}.
std::string encode_scalar_event(double wall_time, int64_t step, std::string_view tag, float value);

class TensorBoardWriter {
 public:
  // Creates `log_dir` if needed and the file events.out.tfevents.<unix_time>.<hostname><suffix>
  // there (".2", ".3", ... appended if that name is taken), and writes the file_version record.
  // Throws std::runtime_error naming the path when it cannot.
  explicit TensorBoardWriter(const std::string& log_dir, const std::string& filename_suffix = "");
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  // Appends one scalar (TensorBoard stores it as float32); wall_time < 0 means now.
  void add_scalar(std::string_view tag, double value, int64_t step, double wall_time = -1.0);
  // Pushes buffered records to the file; add_scalar callers flush once per logging interval.
  void flush();
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& event);
  std::string path_;
  std::FILE* out_ = nullptr;
};

}  // namespace keel::monitor
