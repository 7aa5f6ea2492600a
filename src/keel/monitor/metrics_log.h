// Metrics as JSON Lines: one object per event ("step", "epoch", "final"), appended and flushed.
#pragma once
#include <fstream>
#include <string>
#include <nlohmann/json.hpp>

namespace keel::monitor {

class MetricsLog {
 public:
  explicit MetricsLog(const std::string& path);  // truncates; throws naming the path if it cannot open
  void write(const nlohmann::json& record);      // one line, flushed so a killed run keeps what it logged
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::ofstream out_;
};

}  // namespace keel::monitor
