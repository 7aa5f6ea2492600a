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
  int64_t image_size = 0;          // ViTs: input side (0 = 224); ResNets take any size and ignore it
  int64_t patch_size = 0;          // ViTs: patch side (0 = the name's)
  std::string attention = "auto";  // ViTs: auto | keel | sdpa | reference (vit.h AttentionImpl)
};

// Builds a freshly initialised model; throws std::invalid_argument naming the known models
// when `spec.name` is unknown.
NetPtr create(const ModelSpec& spec);

// Every registered name, sorted.
std::vector<std::string> available();

}  // namespace keel::models
