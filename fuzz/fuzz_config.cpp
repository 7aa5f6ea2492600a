// libFuzzer target: the config parser (TOML text, then each line as a `--set key=value` override).
// Any input must either parse or throw keel::config::ConfigError; anything else (another exception,
// a crash, a sanitizer report) is a finding.
#include <cstddef>
#include <cstdint>
#include <string>

#include "keel/config/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    keel::config::Config c = keel::config::parse(text, "fuzz.toml");
    (void)keel::config::to_toml(c);
  } catch (const keel::config::ConfigError&) {
  }
  size_t start = 0;
  for (int lines = 0; start < text.size() && lines < 4; ++lines) {  // the first lines as overrides
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    try {
      keel::config::parse("", "fuzz", {text.substr(start, end - start)});
    } catch (const keel::config::ConfigError&) {
    }
    start = end + 1;
  }
  return 0;
}
