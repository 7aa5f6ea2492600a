// Memory budget text ("3GiB", "80%") -> bytes, and the host's memory facts (total, resident set).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace keel::memory {

// A parsed `memory.budget`: what the user wrote and what it resolved to.
struct Budget {
  std::string text;                // as written, e.g. "80%"
  int64_t bytes = 0;               // resolved size in bytes (> 0)
  std::optional<double> fraction;  // set when written as a fraction/percentage of device memory (0, 1]
};

// Parses a budget: "1000000" (bytes), "512MiB" / "3GiB" / "1KiB" / "1TiB" (powers of 1024),
// "1.5GB" / "500MB" / "10kB" / "1TB" (powers of 1000), "100B", or a fraction of
// `device_total_bytes`: "0.8" (a number with a decimal point, in (0, 1]) or "80%" (in (0, 100]).
// Units are case-insensitive; space between number and unit is allowed.
// Throws std::invalid_argument naming the text and the accepted forms.
Budget parse_budget(std::string_view text, int64_t device_total_bytes);

// parse_budget against total_cpu_memory_bytes().
Budget parse_cpu_budget(std::string_view text);

// Memory this process may use on the host: MemTotal of /proc/meminfo, or the cgroup (v1 or v2)
// memory limit when that is lower. Throws std::runtime_error when /proc/meminfo cannot be read.
int64_t total_cpu_memory_bytes();

// The process's resident set size in bytes (/proc/self/statm), or -1 when it cannot be read.
int64_t process_rss_bytes();

// Human-readable size for messages and logs: "512 B", "1.50 MiB", "3.00 GiB" (powers of 1024).
std::string format_bytes(int64_t bytes);

}  // namespace keel::memory
