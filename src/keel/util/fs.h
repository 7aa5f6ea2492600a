// File-system helpers: atomic writes (temporary file, fsync, rename, fsync of the directory).
#pragma once
#include <string>

namespace keel::util {

// Writes `bytes` to `path` so that a reader sees either the old file or the complete new one.
// Throws std::runtime_error naming the path and the failing step.
void atomic_write_file(const std::string& path, const std::string& bytes);

// Makes the file at `tmp_path` (already written) durable and moves it to `path` atomically.
void durable_rename(const std::string& tmp_path, const std::string& path);

// mkdir -p; throws naming the path on failure.
void make_dirs(const std::string& path);

}  // namespace keel::util
