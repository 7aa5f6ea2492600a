// Checkpoint store: atomic, checksummed checkpoint directories under <run_dir>/checkpoints/,
// with verification, newest-valid lookup, pruning, compatibility checks, and the helpers that
// turn optimizer, param-group options and RNG state into bytes/JSON and back.
//
// Layout of one checkpoint, <checkpoints_dir>/step-<8+ digit step>/:
//   model.pt        weights (models::write_state_dict; Python's torch.load reads it)
//   optimizer.pt    per-parameter optimizer state as a torch.save() dict of tensors (optimizer_state();
//                   read with keel's restricted reader, never LibTorch's TorchScript loader) (optional)
//   <name>.pt       extra state dicts given by the caller (e.g. ema.pt, best.pt)
//   state.json      the caller's JSON (counters, scaler, schedule, guard, RNG, param-group options)
//   config.toml     resolved config text
//   manifest.json   written last: format_version, step, epoch, model_name, created, and per file
//                   its size and zlib CRC-32
// The directory is written as a fresh step-XXXXXXXX.tmp.XXXXXX/ (mkdtemp: a unique name, nothing planted
// is reused; files created O_EXCL|O_NOFOLLOW with exactly the save's file mode, 0600 by default, each
// fsynced), given its directory mode, fsynced, renamed to its final name and the parent directory
// fsynced: a reader sees a complete checkpoint or none. A manifest names exactly the files it covers,
// so a checkpoint without a manifest (or with a wrong one) is never taken for a valid one.
// Re-saving an existing step moves the old copy aside to step-XXXXXXXX.old/ first; a reader takes that
// .old directory for step XXXXXXXX while no final one exists, so a crash between the two renames still
// leaves one copy of the step to resume from.
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

// Permission bits of checkpoint files unless the caller says otherwise (config: checkpoint.file_mode).
constexpr unsigned kDefaultFileMode = 0600;

// Everything one checkpoint holds.
struct CheckpointContents {
  models::StateDict model;                         // model.pt
  std::optional<models::StateDict> optimizer;      // optimizer.pt (optimizer_state()); nullopt = no file
  std::map<std::string, models::StateDict> extra;  // "<name>.pt"; names: [A-Za-z0-9_-]+, not model/optimizer
  nlohmann::json state = nlohmann::json::object(); // state.json
  std::string config_toml;                         // config.toml (resolved config)
  int64_t step = 0;                                // optimizer steps done
  int64_t epoch = 0;                               // epochs done (or current epoch, as the caller defines)
  std::string model_name;                          // registry name, e.g. "resnet20"
  std::string dir;                                 // set by load(): the directory read (for messages)
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
// Creates checkpoints_dir if needed. Stale step-XXXXXXXX.tmp*/ directories of killed writes of this
// step are removed first; an existing checkpoint of the same step is replaced (moved aside to
// step-XXXXXXXX.old/, then deleted after the new one is in place). Files get exactly `file_mode`
// (read/write bits that include the owner's 0600; the umask does not apply), directories the same
// with search (x) wherever read is allowed (0600 -> 0700, 0640 -> 0750). Throws std::runtime_error
// naming the path on any failure, a failed fsync included.
// after_file (optional) is called with each file's path once it is complete inside the temporary
// directory (manifest.json last, before the rename), and, when an existing step is replaced, with
// the moved-aside "<final dir>.old" between the two renames: fault injection for kill tests.
using FileHook = std::function<void(const std::string& path)>;
std::string save(const std::string& checkpoints_dir, const CheckpointContents& c, const FileHook& after_file = {},
                 unsigned file_mode = kDefaultFileMode);

// Checks a checkpoint directory: manifest.json present and parseable, format version known,
// step/epoch/model_name present, the step equals the directory's, and every listed file present
// with the listed size and CRC-32. Never throws for a bad checkpoint (reports it in `problem`).
Verified verify(const std::string& checkpoint_dir);

// Verifies, then reads everything back. Throws std::runtime_error naming the file and the problem.
CheckpointContents load(const std::string& checkpoint_dir);

// The newest checkpoint under checkpoints_dir that verifies: final step-* directories (never
// .tmp), and a step-*.old directory for a step without a final one (a crash between the renames of
// a re-save), newest step first. Each invalid one passed over adds "<dir>: <problem>" to *skipped (if
// given). nullopt when the directory is missing or holds no valid checkpoint.
std::optional<std::string> find_latest_valid(const std::string& checkpoints_dir,
                                             std::vector<std::string>* skipped = nullptr);

// Removes old checkpoints: keeps the `keep_last` newest step checkpoints (as find_latest_valid
// lists them; keep_last <= 0 keeps all), every one whose name (or path, or canonical step-XXXXXXXX
// name) is in `keep` (e.g. the best one), and always the newest valid checkpoint even when newer ones
// are corrupt. Also removes leftovers of interrupted writes and prunes (*.tmp and *.tmp.* for steps
// at or below the newest checkpoint, *.old whose final directory exists, *.trash).
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

// The per-parameter state of an SGD, Adam or AdamW optimizer (momentum buffers; Adam's step count,
// moments and amsgrad maximum) as named tensors, for optimizer.pt:
//   "format"                     int64 scalar, 1
//   "group.<g>.params"           int64 scalar: parameters in param group g
//   "state.<g>.<i>.<field>"      parameter i of group g: momentum_buffer (SGD); step (int64 scalar),
//                                exp_avg, exp_avg_sq, max_exp_avg_sq (Adam, AdamW)
// Holds no param-group options: see param_group_options(). Throws for other optimizers.
models::StateDict optimizer_state(const torch::optim::Optimizer& opt);

// Replaces the optimizer's per-parameter state with optimizer_state() output, each tensor copied to
// its parameter's device. Everything is checked first (the optimizer is unchanged on error): the
// format, the group and parameter counts, known fields only, each buffer of its parameter's shape and
// dtype, a step count >= 1, max_exp_avg_sq present where the group's amsgrad is on. Throws
// std::runtime_error starting with `where` (e.g. the file) saying what differed.
void load_optimizer_state(torch::optim::Optimizer& opt, const models::StateDict& state, const std::string& where);

// Reads an optimizer.pt held in memory with keel's restricted torch.save reader
// (models::read_state_dict_bytes); `name` names it in messages. A TorchScript archive (LibTorch's
// torch::serialize format, which keel wrote for optimizer.pt before) is refused with an error naming
// the file, without being loaded: loading one runs TorchScript's unpickler and the code in it.
models::StateDict read_optimizer_bytes(const std::string& bytes, const std::string& name);

// Every param group's options as JSON ([{"type":"sgd","lr":..,"momentum":..,...}, ...]), since
// LibTorch 1.13's Optimizer::load does not restore them. Supports SGD, Adam and AdamW options;
// throws std::runtime_error for other optimizers.
nlohmann::json param_group_options(const torch::optim::Optimizer& opt);

// Sets every param group's options from param_group_options() output. Throws std::runtime_error
// when the group count or an options type differs, or a field is missing.
void restore_param_group_options(torch::optim::Optimizer& opt, const nlohmann::json& groups);

// Fills c.optimizer and c.state["optimizer_param_groups"] from `opt`.
void capture_optimizer(CheckpointContents& c, const torch::optim::Optimizer& opt);

// Restores `opt` from what capture_optimizer() stored (options, then state). Throws if absent.
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
