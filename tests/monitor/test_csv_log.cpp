// CsvLog: header fixed by the first row, unknown columns rejected by name, rows flushed as written.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "keel/monitor/csv_log.h"
#include "monitor_test_util.h"

using namespace keel::monitor;
using keel::monitor::test_util::fresh_dir;
using keel::monitor::test_util::read_file;
using ::testing::AllOf;
using ::testing::HasSubstr;

TEST(CsvLog, FirstRowFixesTheHeaderAndEachRowIsFlushed) {
  const std::string path = fresh_dir("csv-basic") + "/steps.csv";
  CsvLog log(path);
  log.write({{"step", 50}, {"loss", 1.25}, {"lr", 0.1}});
  // Read while the log is still open: the row must already be on disk.
  EXPECT_EQ(read_file(path), "step,loss,lr\n50,1.25,0.1\n");
  log.write({{"step", 100}, {"loss", 0.5}, {"lr", 0.05}});
  EXPECT_EQ(read_file(path), "step,loss,lr\n50,1.25,0.1\n100,0.5,0.05\n");
  EXPECT_EQ(log.columns(), (std::vector<std::string>{"step", "loss", "lr"}));
}

TEST(CsvLog, LaterRowsMayOmitOrReorderColumns) {
  const std::string path = fresh_dir("csv-partial") + "/m.csv";
  CsvLog log(path);
  log.write({{"step", 1}, {"loss", 2}, {"top1", 0.5}});
  log.write({{"loss", 3}, {"step", 2}});
  EXPECT_EQ(read_file(path), "step,loss,top1\n1,2,0.5\n2,3,\n");
}

TEST(CsvLog, UnknownColumnIsAnErrorNamingIt) {
  const std::string path = fresh_dir("csv-unknown") + "/m.csv";
  CsvLog log(path);
  log.write({{"step", 1}, {"loss", 2}});
  try {
    log.write({{"step", 2}, {"accuracy", 0.9}});
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_THAT(e.what(), AllOf(HasSubstr("unknown CSV column 'accuracy'"), HasSubstr("step, loss"),
                                HasSubstr(path)));
  }
  EXPECT_EQ(read_file(path), "step,loss\n1,2\n");  // the rejected row wrote nothing
}

TEST(CsvLog, DuplicateOrEmptyFirstRowIsRejected) {
  const std::string dir = fresh_dir("csv-dup");
  CsvLog log(dir + "/m.csv");
  EXPECT_THROW(log.write({}), std::invalid_argument);
  EXPECT_THROW(log.write({{"a", 1}, {"a", 2}}), std::invalid_argument);
  EXPECT_TRUE(log.columns().empty());
  log.write({{"a", 1}, {"b", 2}});
  EXPECT_THROW(log.write({{"b", 1}, {"b", 2}}), std::invalid_argument);
  EXPECT_EQ(read_file(dir + "/m.csv"), "a,b\n1,2\n");
}

TEST(CsvLog, ValuesRoundTripExactlyAndNonFiniteAreSpelledOut) {
  const std::string path = fresh_dir("csv-values") + "/m.csv";
  CsvLog log(path);
  log.write({{"a", 0.1}, {"b", 1e-9}, {"c", 123456789012.0}, {"d", NAN}, {"e", INFINITY}, {"f", -INFINITY},
             {"g", -2.5}});
  EXPECT_EQ(read_file(path), "a,b,c,d,e,f,g\n0.1,1e-09,123456789012,nan,inf,-inf,-2.5\n");
  const double third = 1.0 / 3.0;
  log.write({{"a", third}});
  std::string text = read_file(path);
  std::string cell = text.substr(text.rfind('\n', text.size() - 2) + 1);
  EXPECT_EQ(std::stod(cell.substr(0, cell.find(','))), third);
}

TEST(CsvLog, ColumnNamesAreQuotedWhenNeeded) {
  EXPECT_EQ(csv_escape("plain"), "plain");
  EXPECT_EQ(csv_escape("a,b"), "\"a,b\"");
  EXPECT_EQ(csv_escape("say \"hi\""), "\"say \"\"hi\"\"\"");
  const std::string path = fresh_dir("csv-quote") + "/m.csv";
  CsvLog log(path);
  log.write({{"loss,train", 1}});
  EXPECT_EQ(read_file(path), "\"loss,train\"\n1\n");
}

TEST(CsvLog, UnwritablePathThrowsNamingIt) {
  const std::string path = fresh_dir("csv-bad") + "/no/such/dir/m.csv";
  try {
    CsvLog log(path);
    FAIL() << "expected std::runtime_error";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr(path));
  }
}
