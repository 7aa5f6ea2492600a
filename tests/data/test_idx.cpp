// Tests for IdxDataset: raw and gzipped parsing, every malformation, the real Fashion-MNIST files.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <zlib.h>

#include <array>
#include <fstream>
#include <vector>

#include "data_test_util.h"
#include "keel/data/idx.h"

namespace keel::data {
namespace {

using ::testing::HasSubstr;
using Bytes = std::vector<uint8_t>;
namespace fs = std::filesystem;

void put_be32(Bytes& b, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<uint8_t>(v >> s));
}

// Pixel p of image i, so content checks catch misplaced offsets.
uint8_t pixel(size_t i, size_t p) { return static_cast<uint8_t>(i * 13 + p); }

Bytes images_file(uint32_t n, uint32_t h, uint32_t w, uint32_t magic = 0x00000803) {
  Bytes b;
  put_be32(b, magic);
  put_be32(b, n);
  put_be32(b, h);
  put_be32(b, w);
  for (size_t i = 0; i < n; ++i)
    for (size_t p = 0; p < size_t{h} * w; ++p) b.push_back(pixel(i, p));
  return b;
}

Bytes labels_file(const std::vector<uint8_t>& labels, uint32_t magic = 0x00000801) {
  Bytes b;
  put_be32(b, magic);
  put_be32(b, static_cast<uint32_t>(labels.size()));
  b.insert(b.end(), labels.begin(), labels.end());
  return b;
}

void write_raw(const fs::path& path, const Bytes& b) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  ASSERT_TRUE(f.good()) << path;
}

void write_gz(const fs::path& path, const Bytes& b) {
  gzFile g = gzopen(path.c_str(), "wb");
  ASSERT_NE(g, nullptr) << path;
  if (!b.empty()) {
    ASSERT_EQ(gzwrite(g, b.data(), static_cast<unsigned>(b.size())), int(b.size()));
  }
  ASSERT_EQ(gzclose(g), Z_OK);
}

// Raw and gzipped files must behave the same; every test runs on both.
class IdxTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override { dir_ = testing::scratch_dir(); }
  bool gz() const { return GetParam(); }

  std::string write(const std::string& name, const Bytes& b) {
    fs::path p = dir_ / (name + (gz() ? ".gz" : ""));
    if (gz()) {
      write_gz(p, b);
    } else {
      write_raw(p, b);
    }
    return p.string();
  }

  // The message of the std::runtime_error loading must throw.
  std::string load_error(const std::string& images, const std::string& labels,
                         int64_t num_classes = 0) {
    try {
      IdxDataset ds(images, labels, num_classes);
    } catch (const std::runtime_error& e) {
      return e.what();
    }
    ADD_FAILURE() << "IdxDataset(" << images << ", " << labels << ") did not throw";
    return "";
  }

  fs::path dir_;
};

TEST_P(IdxTest, LoadsValidFiles) {
  const std::string images = write("img", images_file(5, 3, 2));
  const std::string labels = write("lbl", labels_file({0, 3, 1, 3, 2}));
  IdxDataset ds(images, labels);
  EXPECT_EQ(ds.size(), 5u);
  EXPECT_EQ(ds.shape().channels, 1);
  EXPECT_EQ(ds.shape().height, 3);
  EXPECT_EQ(ds.shape().width, 2);
  EXPECT_EQ(ds.num_classes(), 4);  // max label + 1
  EXPECT_EQ(ds.label(1), 3);
  EXPECT_EQ(ds.label(4), 2);
  for (size_t i = 0; i < 5; ++i) {
    std::array<uint8_t, 6> img{};
    ds.read_image(i, img.data());
    for (size_t p = 0; p < 6; ++p) ASSERT_EQ(img[p], pixel(i, p)) << "image " << i << " pixel " << p;
  }
  EXPECT_EQ(ds.describe(4), images + "[4]");
  EXPECT_THROW(ds.label(5), std::out_of_range);
}

TEST_P(IdxTest, NumClassesGivenOrAtLeastOne) {
  const std::string images = write("img", images_file(2, 1, 1));
  EXPECT_EQ(IdxDataset(images, write("lbl", labels_file({0, 0}))).num_classes(), 1);
  EXPECT_EQ(IdxDataset(images, write("lbl", labels_file({0, 4})), 10).num_classes(), 10);
}

TEST_P(IdxTest, EmptyFileIsTruncatedHeader) {
  const std::string images = write("img", {});
  const std::string labels = write("lbl", labels_file({0}));
  std::string msg = load_error(images, labels);
  EXPECT_THAT(msg, HasSubstr(images));
  EXPECT_THAT(msg, HasSubstr("truncated header"));
}

TEST_P(IdxTest, ShortHeaderIsTruncatedHeader) {
  Bytes b = images_file(1, 2, 2);
  b.resize(10);  // magic + 1.5 dimensions
  const std::string images = write("img", b);
  std::string msg = load_error(images, write("lbl", labels_file({0})));
  EXPECT_THAT(msg, HasSubstr(images));
  EXPECT_THAT(msg, HasSubstr("truncated header: file has 10 bytes, expected at least 16"));
}

TEST_P(IdxTest, BadImagesMagic) {
  const std::string images = write("img", labels_file({0, 1}));  // a labels file in its place
  std::string msg = load_error(images, write("lbl", labels_file({0, 1})));
  EXPECT_THAT(msg, HasSubstr(images));
  EXPECT_THAT(msg, HasSubstr("bad magic 0x00000801, expected 0x00000803 (IDX uint8 images)"));
}

TEST_P(IdxTest, BadLabelsMagic) {
  const std::string labels = write("lbl", labels_file({0, 1}, 0x00000C01));  // int32 labels
  std::string msg = load_error(write("img", images_file(2, 2, 2)), labels);
  EXPECT_THAT(msg, HasSubstr(labels));
  EXPECT_THAT(msg, HasSubstr("bad magic 0x00000c01, expected 0x00000801 (IDX uint8 labels)"));
}

TEST_P(IdxTest, ZeroImageDimension) {
  const std::string images = write("img", images_file(3, 0, 28));
  std::string msg = load_error(images, write("lbl", labels_file({0, 1, 2})));
  EXPECT_THAT(msg, HasSubstr(images));
  EXPECT_THAT(msg, HasSubstr("bad dimensions: header says 3 images of 0x28"));
}

TEST_P(IdxTest, TruncatedImageData) {
  Bytes b = images_file(4, 3, 3);
  b.resize(b.size() - 5);
  const std::string images = write("img", b);
  std::string msg = load_error(images, write("lbl", labels_file({0, 1, 2, 3})));
  EXPECT_THAT(msg, HasSubstr(images));
  EXPECT_THAT(msg, HasSubstr("truncated data: header says 4 images of 3x3, expected 36 bytes"));
  EXPECT_THAT(msg, HasSubstr("found 31"));
}

TEST_P(IdxTest, HugeHeaderCountIsTruncatedNotAllocated) {
  Bytes b = images_file(1, 2, 2);
  b[4] = b[5] = b[6] = b[7] = 0xff;  // 4294967295 images
  const std::string images = write("img", b);
  std::string msg = load_error(images, write("lbl", labels_file({0})));
  EXPECT_THAT(msg, HasSubstr(images));
  EXPECT_THAT(msg, HasSubstr("truncated data: header says 4294967295 images of 2x2"));
}

TEST_P(IdxTest, TrailingGarbageAfterImages) {
  Bytes b = images_file(2, 2, 2);
  b.insert(b.end(), {1, 2, 3});
  const std::string images = write("img", b);
  std::string msg = load_error(images, write("lbl", labels_file({0, 1})));
  EXPECT_THAT(msg, HasSubstr(images));
  EXPECT_THAT(msg, HasSubstr("trailing garbage: 3 bytes after the 8 bytes"));
}

TEST_P(IdxTest, TruncatedLabels) {
  Bytes b = labels_file({0, 1, 2});
  b.pop_back();
  const std::string labels = write("lbl", b);
  std::string msg = load_error(write("img", images_file(3, 1, 1)), labels);
  EXPECT_THAT(msg, HasSubstr(labels));
  EXPECT_THAT(msg, HasSubstr("truncated data: header says 3 labels, expected 3 bytes"));
}

TEST_P(IdxTest, TrailingGarbageAfterLabels) {
  Bytes b = labels_file({0, 1, 2});
  b.push_back(9);
  const std::string labels = write("lbl", b);
  std::string msg = load_error(write("img", images_file(3, 1, 1)), labels);
  EXPECT_THAT(msg, HasSubstr(labels));
  EXPECT_THAT(msg, HasSubstr("trailing garbage: 1 bytes"));
}

TEST_P(IdxTest, LabelImageCountMismatch) {
  const std::string images = write("img", images_file(4, 1, 1));
  const std::string labels = write("lbl", labels_file({0, 1, 2}));
  std::string msg = load_error(images, labels);
  EXPECT_THAT(msg, HasSubstr(labels));
  EXPECT_THAT(msg, HasSubstr(images));
  EXPECT_THAT(msg, HasSubstr("count mismatch: 3 labels, expected 4"));
}

TEST_P(IdxTest, LabelOutOfRange) {
  const std::string labels = write("lbl", labels_file({0, 9, 12, 1}));
  std::string msg = load_error(write("img", images_file(4, 1, 1)), labels, 10);
  EXPECT_THAT(msg, HasSubstr(labels));
  EXPECT_THAT(msg, HasSubstr("label out of range: label 12 at index 2, expected < 10"));
}

TEST_P(IdxTest, MissingFile) {
  const std::string images = (dir_ / "nope").string();
  std::string msg = load_error(images, write("lbl", labels_file({0})));
  EXPECT_THAT(msg, HasSubstr(images));
  EXPECT_THAT(msg, HasSubstr("cannot open (No such file or directory)"));
}

INSTANTIATE_TEST_SUITE_P(RawAndGzip, IdxTest, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "gz" : "raw"; });

TEST(IdxGzip, CutOffStreamIsAnError) {
  const fs::path dir = testing::scratch_dir();
  write_gz(dir / "full.gz", images_file(50, 8, 8));
  std::ifstream in(dir / "full.gz", std::ios::binary);
  Bytes gz((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  gz.resize(gz.size() / 2);
  const std::string images = (dir / "cut.gz").string();
  write_raw(images, gz);
  try {
    read_maybe_gzipped(images);
    FAIL() << "a gzip stream cut in half was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr(images));
    EXPECT_THAT(e.what(), HasSubstr("corrupt gzip data"));
  }
}

TEST(IdxGzip, GarbageAfterGzipMagicIsAnError) {
  const fs::path dir = testing::scratch_dir();
  const std::string path = (dir / "bad.gz").string();
  Bytes b = {0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03};
  for (int i = 0; i < 64; ++i) b.push_back(static_cast<uint8_t>(0xff - i));
  write_raw(path, b);
  try {
    read_maybe_gzipped(path);
    FAIL() << "garbage deflate data was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr(path));
    EXPECT_THAT(e.what(), HasSubstr("corrupt gzip data"));
  }
}

TEST(IdxSplit, FindsRawOrGzipAndNamesMissingFiles) {
  const fs::path dir = testing::scratch_dir();
  write_gz(dir / "t10k-images-idx3-ubyte.gz", images_file(3, 2, 2));
  write_raw(dir / "t10k-labels-idx1-ubyte", labels_file({1, 0, 1}));
  auto test = make_idx_split(dir.string(), false);
  EXPECT_EQ(test->size(), 3u);
  EXPECT_EQ(test->num_classes(), 2);
  try {
    make_idx_split(dir.string(), true);
    FAIL() << "missing train split was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr((dir / "train-images-idx3-ubyte.gz").string()));
    EXPECT_THAT(e.what(), HasSubstr("scripts/setup.sh"));
  }
}

// The real data: fails (never skips) when it is missing, since training depends on it.
TEST(FashionMnist, RealFilesLoad) {
  const std::string dir = "/usr/share/datasets/fashion-mnist";
  ASSERT_TRUE(fs::exists(dir + "/train-images-idx3-ubyte.gz"))
      << dir << " is missing: run scripts/setup.sh (installs dataset-fashion-mnist)";
  struct Split { bool train; size_t count; };
  for (Split s : {Split{true, 60000}, Split{false, 10000}}) {
    auto ds = make_idx_split(dir, s.train);
    EXPECT_EQ(ds->size(), s.count);
    EXPECT_EQ(ds->shape().channels, 1);
    EXPECT_EQ(ds->shape().height, 28);
    EXPECT_EQ(ds->shape().width, 28);
    EXPECT_EQ(ds->num_classes(), 10);
    // Fashion-MNIST is balanced: every class has a tenth of the split.
    std::vector<size_t> per_class(10, 0);
    for (size_t i = 0; i < ds->size(); ++i) ++per_class.at(ds->label(i));
    for (size_t c = 0; c < 10; ++c) EXPECT_EQ(per_class[c], s.count / 10) << "class " << c;
    std::vector<uint8_t> img(28 * 28);
    ds->read_image(s.count - 1, img.data());
    size_t nonzero = 0;
    for (uint8_t v : img) nonzero += v != 0;
    EXPECT_GT(nonzero, 0u);
    EXPECT_THAT(ds->describe(7), HasSubstr("-images-idx3-ubyte.gz[7]"));
  }
}

}  // namespace
}  // namespace keel::data
