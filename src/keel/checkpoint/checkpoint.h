// Checkpoint store: atomic, checksummed checkpoint directories under <run_dir>/checkpoints/,
// with verification, newest-valid lookup, pruning, compatibility checks, and the helpers that
// turn optimizer, param-group options and RNG state into bytes/JSON and back.
//
// Layout of one checkpoint, <checkpoints_dir>/step-<8+ digit step>/:
//   model.pt        weights (models::write_state_dict; Python's torch.load reads it)
//   optimizer.pt    torch::serialize archive of Optimizer::save (optional)
//   <name>.pt       extra state dicts given by the caller (e.g. ema.pt, best.pt)
//   state.json      the caller's JSON (counters, scaler, schedule, guard, RNG, param-group options)
//   config.toml     resolved config text
//   manifest.json   written last: format_version, step, epoch, model_name, created, and per file
//                   its size and zlib CRC-32
// The directory is written as step-XXXXXXXX.tmp/ (every file fsynced), the directory is fsynced,
// renamed to its final name and the parent directory fsynced: a reader sees a complete checkpoint
// or none. A manifest names exactly the files it covers, so a checkpoint without a manifest (or
// with a wrong one) is never taken for a valid one.
//
// Checksum choice: zlib's crc32 (already linked; ~GB/s) guards against truncation, torn writes and
// bit rot, which is what a checkpoint store meets. It is not a defence against deliberate
// tampering (nothing here is); the size is checked as well, before the checksum.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/optim/optimizer.h>

#include "keel/models/state_dict.h"

namespace keel::checkpoint {

// The manifest format version this code writes and the only one it reads.
constexpr int kFormatVersion = 1;

// Everything one checkpoint holds.
struct CheckpointContents {
  models::StateDict model;                         // model.pt
  std::string optimizer_bytes;                     // optimizer.pt; empty = no optimizer file
  std::map<std::string, models::StateDict> extra;  // "<name>.pt"; names: [A-Za-z0-9_-]+, not model/optimizer
  nlohmann::json state = nlohmann::json::object(); // state.json
  std::string config_toml;                         // config.toml (resolved config)
  int64_t step = 0;                                // optimizer steps done
  int64_t epoch = 0;                               // epochs done (or current epoch, as the caller defines)
  std::string model_name;                          // registry name, e.g. "resnet20"
};

// Result of verify(): ok, or the problem found (naming the file and what was expected).
struct Verified {
  bool ok = false;
  std::string path;     // the checkpoint directory checked
  std::string problem;  // empty when ok
};

// "step-00001234" for step 1234 (at least 8 digits, more when the step needs them).
std::string dir_name_for_step(int64_t step);

// The step of a final checkpoint directory name ("step-00001234" -> 1234); nullopt for anything
// else (.tmp directories, other names). Accepts a path; looks at its last component.
std::optional<int64_t> step_of_dir_name(const std::string& name_or_path);

// Writes `c` as <checkpoints_dir>/step-XXXXXXXX/ atomically (see top) and returns that path.
// Creates checkpoints_dir if needed. A stale step-XXXXXXXX.tmp/ from a killed write is removed
// first; an existing checkpoint of the same step is replaced (moved aside, then deleted after the
// new one is in place). Throws std::runtime_error naming the path on any failure.
// after_file (optional) is called with each file's path once it is complete inside the temporary
// directory (manifest.json last, before the rename): fault injection for kill tests.
using FileHook = std::function<void(const std::string& path)>;
std::string save(const std::string& checkpoints_dir, const CheckpointContents& c, const FileHook& after_file = {});

// Checks a checkpoint directory: manifest.json present and parseable, format version known,
// step/epoch/model_name present, the step equals the directory's, and every listed file present
// with the listed size and CRC-32. Never throws for a bad checkpoint (reports it in `problem`).
Verified verify(const std::string& checkpoint_dir);

// Verifies, then reads everything back. Throws std::runtime_error naming the file and the problem.
CheckpointContents load(const std::string& checkpoint_dir);

// The newest checkpoint under checkpoints_dir that verifies: final step-* directories (never
// .tmp), newest step first. Each invalid one passed over adds "<dir>: <problem>" to *skipped (if
// given). nullopt when the directory is missing or holds no valid checkpoint.
std::optional<std::string> find_latest_valid(const std::string& checkpoints_dir,
                                             std::vector<std::string>* skipped = nullptr);

// Removes old checkpoints: keeps the `keep_last` newest final step-* directories (keep_last <= 0
// keeps all), every directory whose name (or path) is in `keep` (e.g. the best one), and always the
// newest valid checkpoint even when newer ones are corrupt. Also removes leftovers of interrupted
// writes and prunes (*.tmp for steps at or below the newest final checkpoint, *.old, *.trash).
// Call it from the thread that saves, after save() returns (it would take an in-progress .tmp of
// an older step for a leftover). Returns the paths removed.
std::vector<std::string> prune(const std::string& checkpoints_dir, int64_t keep_last,
                               const std::set<std::string>& keep = {});

// Whether checkpoint `ckpt` can be resumed into the current run: "" if compatible, else one
// message listing every difference: model name, missing/unexpected weight names, weight shapes,
// and (when both config texts are non-empty) the config keys in `config_keys` (dotted TOML paths).
std::string compatibility_problem(const CheckpointContents& ckpt, const std::string& model_name,
                                  const models::StateDict& current_model,
                                  const std::string& current_config_toml = "",
                                  const std::vector<std::string>& config_keys = {
                                      "model.name", "model.in_channels", "model.num_classes",
                                      "optim.name"});

// ---- optimizer ----

// Optimizer::save as bytes (torch::serialize archive). Holds per-parameter state (momentum
// buffers, Adam moments, step counts), not param-group options: see param_group_options().
std::string optimizer_to_bytes(const torch::optim::Optimizer& opt);

// Optimizer::load from optimizer_to_bytes() output. The optimizer must have the same parameter
// groups with the same numbers of parameters. Throws std::runtime_error saying what differed.
void optimizer_from_bytes(torch::optim::Optimizer& opt, const std::string& bytes);

// Every param group's options as JSON ([{"type":"sgd","lr":..,"momentum":..,...}, ...]), since
// LibTorch 1.13's Optimizer::load does not restore them. Supports SGD, Adam and AdamW options;
// throws std::runtime_error for other optimizers.
nlohmann::json param_group_options(const torch::optim::Optimizer& opt);

// Sets every param group's options from param_group_options() output. Throws std::runtime_error
// when the group count or an options type differs, or a field is missing.
void restore_param_group_options(torch::optim::Optimizer& opt, const nlohmann::json& groups);

// Fills c.optimizer_bytes and c.state["optimizer_param_groups"] from `opt`.
void capture_optimizer(CheckpointContents& c, const torch::optim::Optimizer& opt);

// Restores `opt` from what capture_optimizer() stored (state and options). Throws if absent.
void restore_optimizer(const CheckpointContents& c, torch::optim::Optimizer& opt);

// ---- RNG ----

// State of the default CPU generator and, when CUDA is available, of each device's default CUDA
// generator: {"cpu": "<base64>", "cuda": ["<base64>", ...]} ("cuda" is [] without CUDA).
nlohmann::json rng_state_json();

// Restores what rng_state_json() captured. CUDA states are skipped when this process has no CUDA
// (or fewer devices); each skip is returned as a note for the caller to print. Throws
// std::runtime_error when "cpu" is missing or malformed.
std::vector<std::string> restore_rng_state(const nlohmann::json& j);

// Standard base64 (RFC 4648, with padding), for byte states in JSON.
std::string base64_encode(const std::string& bytes);
// Inverse of base64_encode; throws std::runtime_error on a character or length outside base64.
std::string base64_decode(const std::string& text);

// zlib CRC-32 of a file's bytes, read in chunks; throws naming the path if unreadable.
uint32_t file_crc32(const std::string& path);

}  // namespace keel::checkpoint
