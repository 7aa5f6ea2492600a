// CSV log of scalar rows: the first row fixes the columns; every row is flushed as it is written.
#pragma once
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace keel::monitor {

class CsvLog {
 public:
  using Row = std::vector<std::pair<std::string, double>>;  // (column, value) in column order

  // Truncates `path`; throws std::runtime_error naming the path if it cannot be opened.
  explicit CsvLog(const std::string& path);
  ~CsvLog();
  CsvLog(const CsvLog&) = delete;
  CsvLog& operator=(const CsvLog&) = delete;

  // Appends one row. The first row writes the header and fixes the columns; later rows may omit
  // columns (empty cells) but a column not in the header throws std::invalid_argument naming it,
  // as does a column repeated within a row. Values are written in the shortest form that reads
  // back exactly; NaN and infinities as nan, inf, -inf.
  void write(const Row& row);

  const std::vector<std::string>& columns() const { return columns_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::FILE* out_ = nullptr;
  std::vector<std::string> columns_;
};

// Quotes a CSV field per RFC 4180 when it holds a comma, quote or line break.
std::string csv_escape(const std::string& field);

}  // namespace keel::monitor
