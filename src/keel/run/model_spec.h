// The model a config names, as a registry spec: the one place that maps model.* keys to models::ModelSpec, so
// training, its EMA shadow, evaluation, export and benchmarks all build the same architecture (a ViT's image and
// patch size included).
#pragma once
#include "keel/config/config.h"
#include "keel/models/registry.h"

namespace keel::run {

inline models::ModelSpec model_spec(const config::Config& cfg) {
  models::ModelSpec s;
  s.name = cfg.model.name;
  s.in_channels = cfg.model.in_channels;
  s.num_classes = cfg.model.num_classes;
  s.checkpoint_stages = cfg.model.checkpoint_stages;
  s.image_size = cfg.model.image_size;
  s.patch_size = cfg.model.patch_size;
  s.attention = cfg.model.attention;
  return s;
}

}  // namespace keel::run
