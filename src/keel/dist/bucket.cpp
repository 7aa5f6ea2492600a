// Bucket assignment and readiness (see bucket.h).
#include "keel/dist/bucket.h"

#include <stdexcept>

namespace keel::dist {

std::vector<std::vector<size_t>> assign_buckets(const std::vector<int64_t>& bytes, const std::vector<std::string>& keys,
                                                int64_t cap_bytes) {
  if (cap_bytes < 1) throw std::invalid_argument("assign_buckets: cap_bytes must be >= 1");
  if (bytes.size() != keys.size()) throw std::invalid_argument("assign_buckets: bytes and keys differ in length");
  std::vector<std::vector<size_t>> out;
  int64_t filled = 0;
  std::string key;
  for (size_t i = bytes.size(); i-- > 0;) {
    const bool fits = !out.empty() && keys[i] == key && filled + bytes[i] <= cap_bytes;
    if (!fits) {
      out.emplace_back();
      filled = 0;
      key = keys[i];
    }
    out.back().push_back(i);
    filled += bytes[i];
  }
  return out;
}

ReadyTracker::ReadyTracker(std::vector<std::vector<size_t>> buckets, size_t num_params)
    : buckets_(std::move(buckets)), bucket_of_(num_params, -1) {
  for (size_t b = 0; b < buckets_.size(); ++b) {
    for (size_t p : buckets_[b]) {
      if (p >= num_params || bucket_of_[p] != -1) throw std::invalid_argument("ReadyTracker: bad bucket assignment");
      bucket_of_[p] = static_cast<int64_t>(b);
    }
  }
  reset();
}

void ReadyTracker::reset() {
  ready_.assign(bucket_of_.size(), 0);
  pending_.resize(buckets_.size());
  for (size_t b = 0; b < buckets_.size(); ++b) pending_[b] = buckets_[b].size();
  next_ = 0;
}

std::vector<size_t> ReadyTracker::mark_ready(size_t p) {
  if (p >= bucket_of_.size() || bucket_of_[p] < 0) throw std::logic_error("ReadyTracker: parameter not bucketed");
  if (ready_[p]) {
    throw std::logic_error("gradient of parameter " + std::to_string(p) +
                           " produced twice in one backward pass (its bucket may already have been sent)");
  }
  ready_[p] = 1;
  --pending_[static_cast<size_t>(bucket_of_[p])];
  std::vector<size_t> go;
  while (next_ < buckets_.size() && pending_[next_] == 0) go.push_back(next_++);
  return go;
}

std::vector<size_t> ReadyTracker::launch_rest() {
  std::vector<size_t> go;
  while (next_ < buckets_.size()) go.push_back(next_++);
  return go;
}

}  // namespace keel::dist
