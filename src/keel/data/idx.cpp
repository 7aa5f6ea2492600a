// IdxDataset: reading (gzip or raw) and strict validation of MNIST-style IDX files.
#include "keel/data/idx.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <system_error>

namespace keel::data {
namespace {

constexpr uint32_t kImagesMagic = 0x00000803;  // type 0x08 (uint8), 3 dimensions
constexpr uint32_t kLabelsMagic = 0x00000801;  // type 0x08 (uint8), 1 dimension
constexpr size_t kChunk = size_t{1} << 20;

// Formats a magic number the way the IDX spec writes it.
std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

// Every IDX error names the file first, so a user knows which of the two files is wrong.
[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error(path + ": " + what);
}

// IDX stores integers big-endian.
uint32_t be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

// Reads a non-gzip file whole.
std::vector<uint8_t> read_plain(std::FILE* f, const std::string& path) {
  std::vector<uint8_t> out;
  for (;;) {
    size_t old = out.size();
    out.resize(old + kChunk);
    size_t n = std::fread(out.data() + old, 1, kChunk, f);
    out.resize(old + n);
    if (n < kChunk) break;
  }
  bool error = std::ferror(f) != 0;
  std::fclose(f);
  if (error) fail(path, "read error");
  return out;
}

// Inflates a gzip file whole; a corrupt or cut-off stream is an error, not a short file.
std::vector<uint8_t> read_gzip(const std::string& path) {
  gzFile g = gzopen(path.c_str(), "rb");
  if (!g) fail(path, "cannot open gzip stream (" + std::generic_category().message(errno) + ")");
  gzbuffer(g, 1 << 17);
  std::vector<uint8_t> out;
  auto gz_fail = [&](const char* stage) {
    int errnum = Z_OK;
    std::string msg = gzerror(g, &errnum);
    gzclose_r(g);
    fail(path, std::string("corrupt gzip data ") + stage + " (" + msg + ") after " +
                   std::to_string(out.size()) + " inflated bytes");
  };
  for (;;) {
    size_t old = out.size();
    out.resize(old + kChunk);
    int n = gzread(g, out.data() + old, static_cast<unsigned>(kChunk));
    if (n < 0) {
      out.resize(old);
      gz_fail("while inflating");
    }
    out.resize(old + static_cast<size_t>(n));
    if (n == 0) break;
  }
  // zlib reports a stream cut off mid-member only through gzerror / gzclose, not gzread.
  int errnum = Z_OK;
  gzerror(g, &errnum);
  if (errnum != Z_OK) gz_fail("at end of file");
  int rc = gzclose_r(g);
  if (rc != Z_OK) {
    fail(path, "corrupt gzip data: stream ends in the middle of a gzip member (zlib error " +
                   std::to_string(rc) + ") after " + std::to_string(out.size()) + " inflated bytes");
  }
  return out;
}

// Checks magic and header size, and returns the dimensions that follow the magic.
std::vector<uint32_t> parse_header(const std::string& path, const std::vector<uint8_t>& file,
                                   uint32_t expected_magic, size_t ndims, const char* kind) {
  const size_t header = 4 + 4 * ndims;
  if (file.size() < 4) {
    fail(path, "truncated header: file has " + std::to_string(file.size()) +
                   " bytes, expected at least " + std::to_string(header) + " (magic + " +
                   std::to_string(ndims) + " dimensions)");
  }
  uint32_t magic = be32(file.data());
  if (magic != expected_magic) {
    std::string hint;
    if (magic == kImagesMagic) hint = "; this looks like an images file";
    if (magic == kLabelsMagic) hint = "; this looks like a labels file";
    if (file[0] == 0x1f && file[1] == 0x8b) hint = "; this looks like doubly gzipped data";
    fail(path, "bad magic " + hex32(magic) + ", expected " + hex32(expected_magic) + " (" + kind +
                   ")" + hint);
  }
  if (file.size() < header) {
    fail(path, "truncated header: file has " + std::to_string(file.size()) +
                   " bytes, expected at least " + std::to_string(header) + " (magic + " +
                   std::to_string(ndims) + " dimensions)");
  }
  std::vector<uint32_t> dims(ndims);
  for (size_t d = 0; d < ndims; ++d) dims[d] = be32(file.data() + 4 + 4 * d);
  return dims;
}

// Checks that the payload after the header is exactly `expected` bytes.
void check_payload(const std::string& path, size_t file_size, size_t header,
                   unsigned __int128 expected, const std::string& what) {
  const size_t have = file_size - header;
  if (static_cast<unsigned __int128>(have) < expected) {
    fail(path, "truncated data: header says " + what + ", expected " +
                   std::to_string(static_cast<unsigned long long>(expected)) +
                   " bytes after the " + std::to_string(header) + "-byte header, found " +
                   std::to_string(have));
  }
  if (static_cast<unsigned __int128>(have) > expected) {
    fail(path, "trailing garbage: " +
                   std::to_string(have - static_cast<size_t>(expected)) +
                   " bytes after the " + std::to_string(static_cast<size_t>(expected)) +
                   " bytes the header describes (" + what + ")");
  }
}

}  // namespace

std::vector<uint8_t> read_maybe_gzipped(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) fail(path, "cannot open (" + std::generic_category().message(errno) + ")");
  uint8_t magic[2] = {0, 0};
  size_t got = std::fread(magic, 1, 2, f);
  if (got == 2 && magic[0] == 0x1f && magic[1] == 0x8b) {
    std::fclose(f);
    return read_gzip(path);
  }
  std::rewind(f);
  return read_plain(f, path);
}

IdxDataset::IdxDataset(const std::string& images_path, const std::string& labels_path,
                       int64_t num_classes)
    : images_path_(images_path), labels_path_(labels_path) {
  if (num_classes < 0) {
    throw std::invalid_argument("IdxDataset: num_classes must be >= 0 (0 = infer), got " +
                                std::to_string(num_classes));
  }
  images_file_ = read_maybe_gzipped(images_path_);
  auto idims = parse_header(images_path_, images_file_, kImagesMagic, 3, "IDX uint8 images");
  const std::string geometry = std::to_string(idims[0]) + " images of " +
                               std::to_string(idims[1]) + "x" + std::to_string(idims[2]);
  if (idims[1] == 0 || idims[2] == 0) {
    fail(images_path_, "bad dimensions: header says " + geometry +
                           ", expected height and width > 0");
  }
  check_payload(images_path_, images_file_.size(), 16,
                static_cast<unsigned __int128>(idims[0]) * idims[1] * idims[2], geometry);

  labels_file_ = read_maybe_gzipped(labels_path_);
  auto ldims = parse_header(labels_path_, labels_file_, kLabelsMagic, 1, "IDX uint8 labels");
  check_payload(labels_path_, labels_file_.size(), 8, ldims[0],
                std::to_string(ldims[0]) + " labels");
  if (ldims[0] != idims[0]) {
    fail(labels_path_, "label/image count mismatch: " + std::to_string(ldims[0]) +
                           " labels, expected " + std::to_string(idims[0]) + " (the image count of " +
                           images_path_ + ")");
  }

  count_ = idims[0];
  height_ = idims[1];
  width_ = idims[2];
  const uint8_t* labels = labels_file_.data() + 8;
  int64_t max_label = -1;
  for (size_t i = 0; i < count_; ++i) {
    if (num_classes > 0 && labels[i] >= num_classes) {
      fail(labels_path_, "label out of range: label " + std::to_string(labels[i]) + " at index " +
                             std::to_string(i) + ", expected < " + std::to_string(num_classes) +
                             " (num_classes)");
    }
    max_label = std::max<int64_t>(max_label, labels[i]);
  }
  num_classes_ = num_classes > 0 ? num_classes : std::max<int64_t>(1, max_label + 1);
}

int64_t IdxDataset::label(size_t index) const {
  if (index >= count_) {
    throw std::out_of_range(describe(index) + ": index out of range, dataset has " +
                            std::to_string(count_) + " samples");
  }
  return labels_file_[8 + index];
}

void IdxDataset::read_image(size_t index, uint8_t* dst) const {
  if (index >= count_) {
    throw std::out_of_range(describe(index) + ": index out of range, dataset has " +
                            std::to_string(count_) + " samples");
  }
  const size_t bytes = static_cast<size_t>(height_ * width_);
  std::memcpy(dst, images_file_.data() + 16 + index * bytes, bytes);
}

std::string IdxDataset::describe(size_t index) const {
  return images_path_ + "[" + std::to_string(index) + "]";
}

std::unique_ptr<Dataset> make_idx_split(const std::string& dir, bool train) {
  namespace fs = std::filesystem;
  const std::string prefix = train ? "train" : "t10k";
  // Gzipped is how the datasets ship; raw is what a user gets after gunzip.
  auto resolve = [&](const std::string& stem) {
    fs::path gz = fs::path(dir) / (stem + ".gz");
    fs::path raw = fs::path(dir) / stem;
    if (fs::exists(gz)) return gz.string();
    if (fs::exists(raw)) return raw.string();
    throw std::runtime_error(
        "IDX split '" + prefix + "': neither " + gz.string() + " nor " + raw.string() +
        " exists (for Fashion-MNIST, run scripts/setup.sh: it installs dataset-fashion-mnist)");
  };
  std::string images = resolve(prefix + "-images-idx3-ubyte");
  std::string labels = resolve(prefix + "-labels-idx1-ubyte");
  return std::make_unique<IdxDataset>(images, labels);
}

}  // namespace keel::data
