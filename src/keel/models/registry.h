// Model registry: torchvision-compatible names -> Net.
#pragma once
#include <string>
#include <vector>
#include "keel/models/net.h"

namespace keel::models {

struct ModelSpec {
  std::string name = "resnet20";  // see available()
  int64_t in_channels = 3;
  int64_t num_classes = 10;
  bool checkpoint_stages = false;  // activation checkpointing per stage (ResNetOptions)
};

// Builds a freshly initialised model; throws std::invalid_argument naming the known models
// when `spec.name` is unknown.
NetPtr create(const ModelSpec& spec);

// Every registered name, sorted.
std::vector<std::string> available();

}  // namespace keel::models
