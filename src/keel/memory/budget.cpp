// Budget parsing and host memory facts from /proc and the cgroup file system.
#include "keel/memory/budget.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace keel::memory {
namespace {

constexpr const char* kAcceptedForms =
    "expected bytes (\"1000000\"), a size with a unit (\"512MiB\", \"3GiB\", \"1.5GB\"; "
    "units B, kB, MB, GB, TB = powers of 1000, KiB, MiB, GiB, TiB = powers of 1024), "
    "or a share of device memory (\"0.8\" or \"80%\")";

// Values at or above this in a cgroup limit file mean "no limit" (v1 writes ~2^63 rounded to pages).
constexpr int64_t kUnlimited = int64_t{1} << 62;

// The error for budget text that cannot be used, with the reason and the accepted forms.
[[noreturn]] void fail(std::string_view text, const std::string& why) {
  throw std::invalid_argument("memory budget \"" + std::string(text) + "\" " + why + ": " +
                              kAcceptedForms);
}

// Strips ASCII whitespace from both ends.
std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

// Lower-cases ASCII.
std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// Size multiplier of a (lower-cased) unit, or 0 when the unit is unknown.
long double unit_multiplier(const std::string& unit) {
  static const std::pair<const char*, long double> kUnits[] = {
      {"b", 1.0L},
      {"kb", 1e3L},          {"mb", 1e6L},
      {"gb", 1e9L},          {"tb", 1e12L},
      {"kib", 1024.0L},      {"mib", 1024.0L * 1024},
      {"gib", 1024.0L * 1024 * 1024}, {"tib", 1024.0L * 1024 * 1024 * 1024},
  };
  for (const auto& [name, mult] : kUnits)
    if (unit == name) return mult;
  return 0.0L;
}

// Reads the first whitespace-separated token of a one-line file; empty when unreadable.
std::string read_token(const std::string& path) {
  std::ifstream in(path);
  std::string tok;
  if (in) in >> tok;
  return tok;
}

// A cgroup limit file's value in bytes, or nullopt when absent, "max" or effectively unlimited.
std::optional<int64_t> read_limit(const std::string& path) {
  const std::string tok = read_token(path);
  if (tok.empty() || tok == "max") return std::nullopt;
  try {
    const long long v = std::stoll(tok);
    if (v <= 0 || v >= kUnlimited) return std::nullopt;
    return static_cast<int64_t>(v);
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

// The lowest memory limit on this process's cgroup path and its ancestors (v1 and v2), if any.
std::optional<int64_t> cgroup_limit_bytes() {
  std::optional<int64_t> best;
  auto consider = [&](const std::string& dir, const char* file, std::string rel) {
    // Walk from the process's own cgroup up to the mount root: a parent's limit binds too.
    while (true) {
      if (auto v = read_limit(dir + rel + "/" + file)) best = best ? std::min(*best, *v) : *v;
      if (rel.empty() || rel == "/") break;
      const auto slash = rel.find_last_of('/');
      rel = slash == std::string::npos ? std::string() : rel.substr(0, slash);
    }
  };
  std::ifstream in("/proc/self/cgroup");
  std::string line;
  while (std::getline(in, line)) {
    // Format: hierarchy-id:controllers:path
    const auto a = line.find(':');
    const auto b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1);
    const std::string path = line.substr(b + 1);
    if (controllers.empty()) {  // v2 unified hierarchy (or the unified part of a hybrid setup)
      consider("/sys/fs/cgroup", "memory.max", path);
      consider("/sys/fs/cgroup/unified", "memory.max", path);
    } else {
      std::stringstream ss(controllers);
      std::string c;
      while (std::getline(ss, c, ','))
        if (c == "memory") consider("/sys/fs/cgroup/memory", "memory.limit_in_bytes", path);
    }
  }
  return best;
}

}  // namespace

Budget parse_budget(std::string_view raw, int64_t device_total_bytes) {
  const std::string_view text = trim(raw);
  if (text.empty()) fail(raw, "is empty");

  // Number: digits with at most one decimal point; no sign, no exponent.
  size_t i = 0;
  bool seen_dot = false, seen_digit = false;
  for (; i < text.size(); ++i) {
    const char c = text[i];
    if (std::isdigit(static_cast<unsigned char>(c))) {
      seen_digit = true;
    } else if (c == '.' && !seen_dot) {
      seen_dot = true;
    } else {
      break;
    }
  }
  if (!seen_digit) fail(raw, "does not start with a non-negative number");
  const std::string number(text.substr(0, i));
  const std::string unit = lower(trim(text.substr(i)));

  Budget out;
  out.text = std::string(raw);
  const long double value = std::strtold(number.c_str(), nullptr);

  if (unit.empty() && !seen_dot) {  // plain bytes: parse exactly, no floating point
    try {
      size_t used = 0;
      const long long v = std::stoll(number, &used);
      if (used != number.size()) fail(raw, "is not a whole number of bytes");
      out.bytes = static_cast<int64_t>(v);
    } catch (const std::out_of_range&) {
      fail(raw, "is too large");
    }
    if (out.bytes <= 0) fail(raw, "must be positive");
    return out;
  }

  if (unit.empty() || unit == "%") {  // a share of device memory
    const long double frac = unit.empty() ? value : value / 100.0L;
    if (!(frac > 0.0L) || frac > 1.0L)
      fail(raw, unit.empty() ? "is a fraction outside (0, 1]" : "is a percentage outside (0, 100]");
    if (device_total_bytes <= 0) fail(raw, "is a share of device memory, but the device's total memory is unknown");
    out.fraction = static_cast<double>(frac);
    out.bytes = static_cast<int64_t>(std::floor(frac * static_cast<long double>(device_total_bytes)));
    if (out.bytes <= 0) fail(raw, "resolves to zero bytes");
    return out;
  }

  const long double mult = unit_multiplier(unit);
  if (mult == 0.0L) fail(raw, "has an unknown unit \"" + std::string(trim(text.substr(i))) + "\"");
  const long double bytes = std::floor(value * mult);
  if (bytes >= static_cast<long double>(std::numeric_limits<int64_t>::max())) fail(raw, "is too large");
  out.bytes = static_cast<int64_t>(bytes);
  if (out.bytes <= 0) fail(raw, "must be at least one byte");
  return out;
}

Budget parse_cpu_budget(std::string_view text) { return parse_budget(text, total_cpu_memory_bytes()); }

int64_t total_cpu_memory_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  long long kib = -1;
  while (in >> key) {
    if (key == "MemTotal:") {
      in >> kib >> unit;
      break;
    }
    in.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
  }
  if (kib <= 0) throw std::runtime_error("cannot read MemTotal from /proc/meminfo");
  int64_t total = static_cast<int64_t>(kib) * 1024;
  if (auto limit = cgroup_limit_bytes()) total = std::min(total, *limit);
  return total;
}

int64_t process_rss_bytes() {
  std::ifstream in("/proc/self/statm");
  long long size_pages = 0, resident_pages = -1;
  if (!(in >> size_pages >> resident_pages) || resident_pages < 0) return -1;
  return static_cast<int64_t>(resident_pages) * static_cast<int64_t>(sysconf(_SC_PAGESIZE));
}

std::string format_bytes(int64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  const bool neg = bytes < 0;
  long double v = neg ? -static_cast<long double>(bytes) : static_cast<long double>(bytes);
  int u = 0;
  while (v >= 1024.0L && u < 6) {
    v /= 1024.0L;
    ++u;
  }
  char buf[48];
  if (u == 0)
    std::snprintf(buf, sizeof buf, "%s%lld B", neg ? "-" : "", static_cast<long long>(v));
  else
    std::snprintf(buf, sizeof buf, "%s%.2Lf %s", neg ? "-" : "", v, kUnits[u]);
  return buf;
}

}  // namespace keel::memory
