// Helpers shared by the monitor tests: scratch directories and whole-file reads.
#pragma once
#include <string>

#include "../test_util.h"

namespace keel::monitor::test_util {

// A fresh directory under $KEEL_TEST_TMP (or /tmp), emptied first so reruns start clean: keel-monitor-NAME.
inline std::string fresh_dir(const std::string& name) { return keel::test::fresh_dir("monitor-" + name); }

using keel::test::read_file;

}  // namespace keel::monitor::test_util
