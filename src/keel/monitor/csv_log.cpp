// CSV scalar logger.
#include "keel/monitor/csv_log.h"

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace keel::monitor {

namespace {

std::string format_value(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  // Shortest round-trip form: 0.1 stays "0.1" and 1000 stays "1000", with no precision lost.
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

}  // namespace

std::string csv_escape(const std::string& field) {
  if (field.find_first_of(",\"\r\n") == std::string::npos) return field;
  std::string q = "\"";
  for (char c : field) {
    if (c == '"') q += '"';
    q += c;
  }
  return q + '"';
}

CsvLog::CsvLog(const std::string& path) : path_(path), out_(std::fopen(path.c_str(), "w")) {
  if (!out_) throw std::runtime_error(path + ": cannot open CSV log for writing (" + std::strerror(errno) + ")");
}

CsvLog::~CsvLog() {
  if (out_) std::fclose(out_);
}

void CsvLog::write(const Row& row) {
  std::vector<const double*> cells;
  if (columns_.empty()) {
    if (row.empty()) throw std::invalid_argument(path_ + ": the first CSV row fixes the columns and cannot be empty");
    std::vector<std::string> cols;  // committed only when valid, so a rejected first row fixes nothing
    for (const auto& [name, value] : row) {
      for (const auto& c : cols)
        if (c == name) throw std::invalid_argument(path_ + ": CSV column '" + name + "' given twice in one row");
      cols.push_back(name);
    }
    columns_ = std::move(cols);
    std::string header;
    for (size_t i = 0; i < columns_.size(); ++i) header += (i ? "," : "") + csv_escape(columns_[i]);
    header += '\n';
    std::fputs(header.c_str(), out_);
  }
  cells.assign(columns_.size(), nullptr);
  for (const auto& [name, value] : row) {
    size_t i = 0;
    while (i < columns_.size() && columns_[i] != name) ++i;
    if (i == columns_.size()) {
      std::string known;
      for (const auto& c : columns_) known += (known.empty() ? "" : ", ") + c;
      throw std::invalid_argument(path_ + ": unknown CSV column '" + name + "' (the first row fixed the columns: " +
                                  known + ")");
    }
    if (cells[i]) throw std::invalid_argument(path_ + ": CSV column '" + name + "' given twice in one row");
    cells[i] = &value;
  }
  std::string line;
  for (size_t i = 0; i < cells.size(); ++i) {
    if (i) line += ',';
    if (cells[i]) line += format_value(*cells[i]);
  }
  line += '\n';
  // Flushed per row so that a killed run keeps every row it logged.
  if (std::fputs(line.c_str(), out_) == EOF || std::fflush(out_) != 0)
    throw std::runtime_error(path_ + ": write failed (" + std::strerror(errno) + ")");
}

}  // namespace keel::monitor
