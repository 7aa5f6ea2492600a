// Tests for the CIFAR-10/100 binary reader and the synthetic dataset.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <set>

#include "data_test_util.h"
#include "keel/data/cifar.h"
#include "keel/data/synthetic.h"

namespace keel::data {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

// Writes `n` CIFAR records; record r has label(s) from r and pixel p = (r * 7 + p) % 251.
void write_cifar(const fs::path& path, int n, int classes, int first = 0) {
  std::ofstream out(path, std::ios::binary);
  for (int r = first; r < first + n; ++r) {
    if (classes == 100) out.put(static_cast<char>(r % 20));  // coarse label
    out.put(static_cast<char>(classes == 100 ? (r * 3) % 100 : r % 10));
    for (int p = 0; p < 3072; ++p) out.put(static_cast<char>((r * 7 + p) % 251));
  }
}

TEST(Cifar, TenReadsEveryBatchFileInOrder) {
  const fs::path dir = testing::scratch_dir() / "cifar-10-batches-bin";
  fs::create_directories(dir);
  for (int b = 1; b <= 5; ++b) write_cifar(dir / ("data_batch_" + std::to_string(b) + ".bin"), 3, 10, (b - 1) * 3);
  write_cifar(dir / "test_batch.bin", 4, 10, 100);
  auto train = make_cifar_split(dir.parent_path().string(), 10, true);  // found in the archive's folder
  auto test = make_cifar_split(dir.string(), 10, false);
  ASSERT_EQ(train->size(), 15u);
  ASSERT_EQ(test->size(), 4u);
  EXPECT_EQ(train->num_classes(), 10);
  EXPECT_EQ(train->shape().numel(), 3072);
  std::vector<uint8_t> img(3072);
  for (size_t i = 0; i < train->size(); ++i) {
    EXPECT_EQ(train->label(i), static_cast<int64_t>(i % 10));
    train->read_image(i, img.data());
    EXPECT_EQ(img[0], (i * 7) % 251);
    EXPECT_EQ(img[1024], (i * 7 + 1024) % 251) << "green plane starts at 1024 (CHW)";
  }
  EXPECT_EQ(test->label(0), 0);  // record 100
  EXPECT_EQ(train->describe(7), (dir / "data_batch_3.bin").string() + "[1]");
}

TEST(Cifar, HundredUsesTheFineLabel) {
  const fs::path dir = testing::scratch_dir();
  write_cifar(dir / "train.bin", 40, 100);
  write_cifar(dir / "test.bin", 5, 100);
  auto train = make_cifar_split(dir.string(), 100, true);
  ASSERT_EQ(train->size(), 40u);
  EXPECT_EQ(train->num_classes(), 100);
  for (size_t i = 0; i < train->size(); ++i) EXPECT_EQ(train->label(i), static_cast<int64_t>((i * 3) % 100));
}

TEST(Cifar, BadFilesAreErrorsNamingThem) {
  const fs::path dir = testing::scratch_dir();
  write_cifar(dir / "train.bin", 2, 100);
  // CIFAR-100 records (3074 bytes) read as CIFAR-10 (3073): not a whole number of records.
  try {
    CifarDataset({(dir / "train.bin").string()}, 10);
    FAIL() << "wrong record size accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr((dir / "train.bin").string()));
    EXPECT_THAT(e.what(), HasSubstr("3073-byte CIFAR-10 record"));
  }
  std::ofstream(dir / "empty.bin").close();
  EXPECT_THROW(CifarDataset({(dir / "empty.bin").string()}, 10), std::runtime_error);
  try {
    make_cifar_split(dir.string(), 10, true);
    FAIL() << "missing files accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("data_batch_1.bin"));
  }
}

TEST(Synthetic, DeterministicPerSeedAndIndex) {
  SyntheticDataset a(50, {3, 17, 9}, 7, 42), b(50, {3, 17, 9}, 7, 42), c(50, {3, 17, 9}, 7, 43);
  std::vector<uint8_t> x(3 * 17 * 9), y(x.size()), z(x.size());
  std::set<int64_t> labels;
  for (size_t i = 0; i < 50; ++i) {
    a.read_image(i, x.data());
    b.read_image(i, y.data());
    c.read_image(i, z.data());
    EXPECT_EQ(x, y) << i;
    EXPECT_NE(x, z) << i;
    EXPECT_EQ(a.label(i), b.label(i));
    ASSERT_GE(a.label(i), 0);
    ASSERT_LT(a.label(i), 7);
    labels.insert(a.label(i));
    if (i > 0) {
      a.read_image(i - 1, y.data());
      EXPECT_NE(x, y) << "samples differ";
    }
  }
  EXPECT_EQ(labels.size(), 7u) << "50 samples cover all 7 classes";
  // Pixels spread over the byte range (a mean near 127.5 for uniform bytes).
  double sum = 0;
  for (uint8_t v : x) sum += v;
  EXPECT_NEAR(sum / x.size(), 127.5, 20);
  EXPECT_THROW(a.read_image(50, x.data()), std::out_of_range);
  EXPECT_THROW(SyntheticDataset(1, {0, 1, 1}, 1, 0), std::invalid_argument);
}

}  // namespace
}  // namespace keel::data
