// JSON Lines metrics writer.
#include "keel/monitor/metrics_log.h"

#include <stdexcept>

namespace keel::monitor {

MetricsLog::MetricsLog(const std::string& path) : path_(path), out_(path, std::ios::trunc) {
  if (!out_) throw std::runtime_error(path + ": cannot open metrics log for writing");
}

void MetricsLog::write(const nlohmann::json& record) {
  out_ << record.dump() << '\n';
  out_.flush();
  if (!out_) throw std::runtime_error(path_ + ": write failed (disk full?)");
}

}  // namespace keel::monitor
