// The precision a step computes in: a closed choice, parsed once from its name (train.precision, parsed by the
// composition root, run/compose.cpp) and taken as this enum by the engine.
#pragma once
#include <stdexcept>
#include <string>

namespace keel::train {

enum class Precision {
  kFp32,  // no autocast
  kBf16,  // autocast to bfloat16 (CPU and CUDA)
  kFp16,  // autocast to float16 (CUDA only; with the loss scaler)
};

inline Precision parse_precision(const std::string& name) {
  if (name == "fp32") return Precision::kFp32;
  if (name == "bf16") return Precision::kBf16;
  if (name == "fp16") return Precision::kFp16;
  throw std::invalid_argument("unknown precision \"" + name + "\" (fp32, bf16 or fp16)");
}

inline const char* precision_name(Precision p) {
  switch (p) {
    case Precision::kFp32: return "fp32";
    case Precision::kBf16: return "bf16";
    case Precision::kFp16: return "fp16";
  }
  return "?";
}

}  // namespace keel::train
