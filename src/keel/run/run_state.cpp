// RunState (run_state.h).
#include "keel/run/run_state.h"

#include <stdexcept>
#include <utility>

namespace keel::run {

void RunState::add(std::string name, Save save, Load load) {
  for (const auto& p : parts_) {
    if (p.name == name) throw std::logic_error("RunState: part \"" + name + "\" added twice");
  }
  parts_.push_back({std::move(name), std::move(save), std::move(load)});
}

void RunState::add_json(std::string key, std::function<nlohmann::json()> state,
                        std::function<void(const nlohmann::json&)> load_state, bool required) {
  Save save = [key, state = std::move(state)](checkpoint::CheckpointContents& c) {
    nlohmann::json v = state();
    if (!v.is_null()) c.state[key] = std::move(v);
  };
  Load load = [key, required, load_state = std::move(load_state)](const checkpoint::CheckpointContents& c) {
    if (!c.state.contains(key)) {
      if (!required) return;
      throw std::runtime_error(c.dir + "/state.json: no \"" + key + "\" (every checkpoint of this run has one)");
    }
    load_state(c.state.at(key));
  };
  add(std::move(key), std::move(save), std::move(load));
}

void RunState::save(checkpoint::CheckpointContents& c) const {
  for (const auto& p : parts_) p.save(c);
}

void RunState::load(const checkpoint::CheckpointContents& c) const {
  for (const auto& p : parts_) p.load(c);
}

}  // namespace keel::run
