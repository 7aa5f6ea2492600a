// Model registry: maps a name to a constructor.
#include "keel/models/registry.h"

#include <algorithm>
#include <stdexcept>
#include "keel/models/resnet.h"
#include "keel/models/vit.h"

namespace keel::models {

NetPtr create(const ModelSpec& spec) {
  if (spec.in_channels < 1 || spec.num_classes < 1) {
    throw std::invalid_argument("model: in_channels and num_classes must be >= 1 (got " +
                                std::to_string(spec.in_channels) + ", " +
                                std::to_string(spec.num_classes) + ")");
  }
  if (auto o = resnet_options(spec.name)) {
    o->in_channels = spec.in_channels;
    o->num_classes = spec.num_classes;
    o->checkpoint_stages = spec.checkpoint_stages;
    return std::make_shared<ResNet>(*o);
  }
  if (auto o = vit_options(spec.name)) {
    o->in_channels = spec.in_channels;
    o->num_classes = spec.num_classes;
    if (spec.image_size > 0) o->image_size = spec.image_size;
    if (spec.patch_size > 0) o->patch_size = spec.patch_size;
    if (o->image_size % o->patch_size != 0) {
      throw std::invalid_argument("model " + spec.name + ": image size " + std::to_string(o->image_size) +
                                  " is not a multiple of its patch size " + std::to_string(o->patch_size));
    }
    o->attention = parse_attention(spec.attention);
    return std::make_shared<VisionTransformer>(*o);
  }
  std::string known;
  for (const auto& n : available()) known += (known.empty() ? "" : ", ") + n;
  throw std::invalid_argument("unknown model '" + spec.name + "'; known models: " + known);
}

std::vector<std::string> available() {
  std::vector<std::string> names = {"resnet101", "resnet110", "resnet152", "resnet18", "resnet20",
                                    "resnet32",  "resnet34",  "resnet44",  "resnet50",  "resnet56"};
  for (auto& n : vit_names()) names.push_back(n);
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace keel::models
