// RunState: the one list of what a checkpoint of a run holds. Each part is a name, what it writes into a
// checkpoint and how it reads itself back; saving walks the list in one direction, resuming in the other
// (the same parts, in the order they were added). Adding a checkpointed part is one add() call where the
// run registers its parts (Fit::register_state in run/fit_checkpoint.cpp), next to the object that owns the state.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "keel/checkpoint/checkpoint.h"

namespace keel::run {

class RunState {
 public:
  using Save = std::function<void(checkpoint::CheckpointContents&)>;
  using Load = std::function<void(const checkpoint::CheckpointContents&)>;

  // A part with its own files or fields (model weights, optimizer state, extra state dicts).
  void add(std::string name, Save save, Load load);

  // A part kept as one key of state.json: state() writes it (a null value writes nothing), load_state()
  // reads it back. A required key missing from a checkpoint is an error naming it; an optional one is not
  // read (the part keeps what it has: checkpoints of older keel versions, or of runs without the part).
  void add_json(std::string key, std::function<nlohmann::json()> state,
                std::function<void(const nlohmann::json&)> load_state, bool required = true);

  void save(checkpoint::CheckpointContents& c) const;        // every part writes itself into c
  void load(const checkpoint::CheckpointContents& c) const;  // every part reads itself from c, in order

 private:
  struct Part {
    std::string name;
    Save save;
    Load load;
  };
  std::vector<Part> parts_;
};

}  // namespace keel::run
