// Checkpoint store: atomic checksummed checkpoint directories, verification, lookup, pruning,
// compatibility checks, and optimizer / param-group / RNG state serialisation.
// One file, past 600 lines: every format piece (atomic directory writes, manifest, optimizer and RNG state)
// shares the same file-descriptor, fsync and error-naming helpers, which stay private to it.
#include "keel/checkpoint/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <tuple>

#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>
#include <toml++/toml.h>

#include "keel/compat/torch_compat.h"
#include "keel/util/fs.h"

namespace keel::checkpoint {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kManifest = "manifest.json";
constexpr const char* kModel = "model.pt";
constexpr const char* kOptimizer = "optimizer.pt";
constexpr const char* kState = "state.json";
constexpr const char* kConfig = "config.toml";

// fsync of a directory, so that entries created/renamed in it survive a crash.
void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) throw std::runtime_error(dir + ": open for fsync failed: " + std::strerror(errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) throw std::runtime_error(dir + ": fsync failed: " + std::strerror(err));
}

std::string octal(unsigned mode) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%04o", mode);
  return buf;
}

// The directory mode that goes with a file mode: search (x) wherever read is allowed.
unsigned dir_mode_for(unsigned file_mode) { return file_mode | ((file_mode & 0444u) >> 2); }

// Creates `path`, which must not exist (O_EXCL; O_NOFOLLOW: a planted symlink is refused, never
// followed), with exactly `mode`, writes `bytes` and fsyncs. Throws naming the path.
void write_new_file(const std::string& path, const std::string& bytes, unsigned mode) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) throw std::runtime_error(path + ": cannot create: " + std::strerror(errno));
  auto fail = [&](const std::string& what) {
    const std::string err = std::strerror(errno);
    ::close(fd);
    throw std::runtime_error(path + ": " + what + " failed: " + err);
  };
  if (::fchmod(fd, mode) != 0) fail("setting mode " + octal(mode));
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = EIO;
      fail("write");
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) fail("fsync");
  if (::close(fd) != 0) throw std::runtime_error(path + ": close failed: " + std::strerror(errno));
}

// Renames `from` to `to` and fsyncs `to`'s parent directory; throws naming both.
void durable_rename_dir(const std::string& from, const std::string& to, const std::string& parent) {
  if (::rename(from.c_str(), to.c_str()) != 0) {
    throw std::runtime_error(to + ": rename from " + from + " failed: " + std::strerror(errno));
  }
  fsync_dir(parent);
}

// The step of a checkpoint directory: step-XXXXXXXX, or step-XXXXXXXX.old (the copy a re-save moved
// aside); nullopt for anything else.
std::optional<int64_t> step_of_checkpoint_path(const std::string& path) {
  if (auto step = step_of_dir_name(path)) return step;
  std::string name = fs::path(path).filename().string();
  if (name.empty()) name = fs::path(path).parent_path().filename().string();
  if (name.size() > 4 && name.compare(name.size() - 4, 4, ".old") == 0) {
    return step_of_dir_name(name.substr(0, name.size() - 4));
  }
  return std::nullopt;
}

// The step of a temporary directory of a write: step-XXXXXXXX.tmp (older keel) or step-XXXXXXXX.tmp.*.
std::optional<int64_t> step_of_tmp_name(const std::string& name) {
  const size_t pos = name.find(".tmp");
  if (pos == std::string::npos) return std::nullopt;
  if (pos + 4 != name.size() && name[pos + 4] != '.') return std::nullopt;
  return step_of_dir_name(name.substr(0, pos));
}

// Whether `bytes` are a TorchScript archive (torch::serialize / torch.jit.save: a zip with
// constants.pkl). Only the zip directory is read; nothing in it is unpickled.
bool is_torchscript_archive(const std::string& bytes) {
  try {
    std::istringstream in(bytes, std::ios::binary);
    caffe2::serialize::PyTorchStreamReader reader(&in);
    return reader.hasRecord("constants.pkl");
  } catch (const c10::Error&) {
    return false;
  }
}

// The whole file as bytes; throws naming the path.
std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open for reading");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw std::runtime_error(path + ": read failed");
  return ss.str();
}

std::string hex8(uint32_t v) {
  char buf[9];
  std::snprintf(buf, sizeof buf, "%08x", v);
  return buf;
}

// Current time as ISO 8601 UTC ("2024-05-01T12:34:56Z").
std::string utc_now() {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// Extra state-dict names become file names: keep them to a safe, unambiguous alphabet.
void check_extra_name(const std::string& name) {
  bool ok = !name.empty() && name != "model" && name != "optimizer";
  for (char ch : name) {
    if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '_' || ch == '-')) ok = false;
  }
  if (!ok) {
    throw std::runtime_error("checkpoint extra state name '" + name +
                             "' is not allowed (expected [A-Za-z0-9_-]+, not 'model' or 'optimizer')");
  }
}

// A manifest file entry name must be a plain file name (it comes from disk: never trust it).
bool plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

// Verification proper; returns the problem or "" and, when ok, the parsed manifest.
std::string check(const std::string& dir, json* manifest_out) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return dir + ": not a directory";
  const std::string mpath = dir + "/" + kManifest;
  if (!fs::exists(mpath, ec)) {
    return mpath + ": missing (expected the manifest written last; the checkpoint is incomplete)";
  }
  json m;
  try {
    m = json::parse(read_file(mpath));
  } catch (const std::exception& e) {
    return mpath + ": not valid JSON (" + e.what() + ")";
  }
  if (!m.is_object()) return mpath + ": expected a JSON object";
  if (!m.contains("format_version") || !m["format_version"].is_number_integer()) {
    return mpath + ": no integer format_version";
  }
  if (m["format_version"].get<int64_t>() != kFormatVersion) {
    return mpath + ": format_version " + m["format_version"].dump() + " is not supported (expected " +
           std::to_string(kFormatVersion) + ")";
  }
  for (const char* key : {"step", "epoch"}) {
    if (!m.contains(key) || !m[key].is_number_integer()) return mpath + ": no integer " + key;
  }
  if (!m.contains("model_name") || !m["model_name"].is_string()) return mpath + ": no model_name string";
  if (auto dir_step = step_of_checkpoint_path(dir)) {
    if (m["step"].get<int64_t>() != *dir_step) {
      return mpath + ": step " + m["step"].dump() + " does not match the directory name (expected " +
             std::to_string(*dir_step) + ")";
    }
  }
  if (!m.contains("files") || !m["files"].is_object()) return mpath + ": no files object";
  const json& files = m["files"];
  for (const char* required : {kModel, kState}) {
    if (!files.contains(required)) return mpath + ": does not list " + required;
  }
  if (m.contains("extra")) {
    if (!m["extra"].is_array()) return mpath + ": extra is not an array";
    for (const auto& e : m["extra"]) {
      if (!e.is_string() || !files.contains(e.get<std::string>() + ".pt")) {
        return mpath + ": extra entry " + e.dump() + " has no listed file";
      }
    }
  }
  for (auto it = files.begin(); it != files.end(); ++it) {
    const std::string& name = it.key();
    if (!plain_file_name(name)) return mpath + ": file name '" + name + "' is not a plain file name";
    const json& entry = it.value();
    if (!entry.is_object() || !entry.contains("size") || !entry["size"].is_number_unsigned() ||
        !entry.contains("crc32") || !entry["crc32"].is_string()) {
      return mpath + ": entry for " + name + " needs size (integer) and crc32 (hex string)";
    }
    const std::string path = dir + "/" + name;
    if (!fs::is_regular_file(path, ec)) return path + ": missing (listed in the manifest)";
    const uint64_t size = fs::file_size(path, ec);
    if (ec) return path + ": cannot read size: " + ec.message();
    const uint64_t want = entry["size"].get<uint64_t>();
    if (size != want) {
      return path + ": size " + std::to_string(size) + " bytes, expected " + std::to_string(want) +
             " (truncated or overwritten)";
    }
    std::string crc;
    try {
      crc = hex8(file_crc32(path));
    } catch (const std::exception& e) {
      return e.what();
    }
    if (crc != entry["crc32"].get<std::string>()) {
      return path + ": crc32 " + crc + ", expected " + entry["crc32"].get<std::string>() +
             " (contents corrupted)";
    }
  }
  if (manifest_out) *manifest_out = std::move(m);
  return "";
}

// Checkpoint directories under `dir`, sorted by step, oldest first: every final step-* directory,
// and step-*.old for a step that has no final directory (a re-save killed between its two renames).
std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& dir) {
  std::map<int64_t, std::string> finals, olds;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return {};
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (!entry.is_directory(ec)) continue;
    const std::string name = entry.path().filename().string();
    if (auto step = step_of_dir_name(name)) {
      finals[*step] = entry.path().string();
    } else if (auto old_step = step_of_checkpoint_path(name)) {
      olds[*old_step] = entry.path().string();
    }
  }
  for (const auto& [step, path] : olds) finals.emplace(step, path);  // only where no final one exists
  return {finals.begin(), finals.end()};
}

// Deletes a directory tree by first renaming it to <name>.trash, so that a crash mid-delete leaves
// a name no lookup takes for a checkpoint.
void remove_dir(const std::string& path) {
  std::string trash = path + ".trash";
  std::error_code ec;
  fs::remove_all(trash, ec);
  fs::rename(path, trash, ec);
  if (ec) throw std::runtime_error(path + ": cannot move aside for deletion: " + ec.message());
  fs::remove_all(trash, ec);
  if (ec) throw std::runtime_error(trash + ": cannot delete: " + ec.message());
}

// The value at a dotted TOML path as TOML text, or "(absent)".
std::string toml_value_text(const toml::table& t, const std::string& key) {
  toml::node_view<const toml::node> v = t.at_path(key);
  if (!v) return "(absent)";
  std::ostringstream ss;
  v.visit([&](const auto& node) { ss << node; });
  return ss.str();
}

std::string shape_text(const at::Tensor& t) {
  std::ostringstream ss;
  ss << t.sizes();
  return ss.str();
}

}  // namespace

// ---------------------------------------------------------------- names

std::string dir_name_for_step(int64_t step) {
  if (step < 0) throw std::runtime_error("checkpoint step " + std::to_string(step) + " is negative");
  char buf[32];
  std::snprintf(buf, sizeof buf, "step-%08lld", static_cast<long long>(step));
  return buf;
}

std::optional<int64_t> step_of_dir_name(const std::string& name_or_path) {
  std::string name = fs::path(name_or_path).filename().string();
  if (name.empty()) name = fs::path(name_or_path).parent_path().filename().string();  // trailing '/'
  if (name.size() < 13 || name.size() > 24 || name.compare(0, 5, "step-") != 0) return std::nullopt;
  int64_t step = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return std::nullopt;
    if (step > (INT64_MAX - 9) / 10) return std::nullopt;
    step = step * 10 + (name[i] - '0');
  }
  if (dir_name_for_step(step) != name) return std::nullopt;  // canonical form only (no extra zeros)
  return step;
}

uint32_t file_crc32(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open for reading");
  std::vector<char> buf(1 << 20);
  uLong crc = crc32(0L, Z_NULL, 0);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    std::streamsize n = in.gcount();
    if (n > 0) crc = crc32_z(crc, reinterpret_cast<const Bytef*>(buf.data()), static_cast<z_size_t>(n));
  }
  if (in.bad()) throw std::runtime_error(path + ": read failed");
  return static_cast<uint32_t>(crc);
}

// ---------------------------------------------------------------- save / verify / load

std::string save(const std::string& checkpoints_dir, const CheckpointContents& c, const FileHook& after_file,
                 unsigned file_mode) {
  if ((file_mode & ~0777u) != 0 || (file_mode & 0600u) != 0600u || (file_mode & 0111u) != 0) {
    throw std::runtime_error("checkpoint file mode " + octal(file_mode) +
                             " is not allowed (expected read/write permission bits that include the owner's, "
                             "e.g. 0600 or 0640)");
  }
  for (const auto& [name, sd] : c.extra) check_extra_name(name);
  std::error_code ec;
  const bool existed = fs::is_directory(checkpoints_dir, ec);
  util::make_dirs(checkpoints_dir);
  if (!existed) {
    std::string parent = fs::path(checkpoints_dir).parent_path().string();
    fsync_dir(parent.empty() ? "." : parent);
  }
  const std::string step_name = dir_name_for_step(c.step);
  const std::string final_dir = checkpoints_dir + "/" + step_name;
  // Temporary directories of killed writes of this step (one writer per run: none is in progress).
  std::vector<fs::path> stale;
  for (const auto& entry : fs::directory_iterator(checkpoints_dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(step_name + ".tmp", 0) == 0 && step_of_tmp_name(name) == c.step) stale.push_back(entry.path());
  }
  for (const auto& path : stale) {
    fs::remove_all(path, ec);
    if (ec) throw std::runtime_error(path.string() + ": cannot remove a stale partial checkpoint: " + ec.message());
  }
  // A fresh, uniquely named directory (mkdtemp: mode 0700, never an existing name or a symlink).
  std::string tmp_dir = final_dir + ".tmp.XXXXXX";
  if (::mkdtemp(tmp_dir.data()) == nullptr) {
    throw std::runtime_error(tmp_dir + ": cannot create the temporary checkpoint directory: " + std::strerror(errno));
  }

  std::vector<std::string> names;
  auto put = [&](const std::string& name, const std::string& bytes) {
    write_new_file(tmp_dir + "/" + name, bytes, file_mode);
    names.push_back(name);
    if (after_file) after_file(tmp_dir + "/" + name);
  };
  put(kModel, models::state_dict_bytes(c.model, tmp_dir + "/" + kModel));
  if (c.optimizer) put(kOptimizer, models::state_dict_bytes(*c.optimizer, tmp_dir + "/" + kOptimizer));
  json extra_names = json::array();
  for (const auto& [name, sd] : c.extra) {
    extra_names.push_back(name);
    put(name + ".pt", models::state_dict_bytes(sd, tmp_dir + "/" + name + ".pt"));
  }
  put(kState, c.state.dump(1) + "\n");
  put(kConfig, c.config_toml);

  json files = json::object();
  for (const auto& name : names) {
    const std::string path = tmp_dir + "/" + name;
    files[name] = {{"size", static_cast<uint64_t>(fs::file_size(path))}, {"crc32", hex8(file_crc32(path))}};
  }
  json manifest = {{"format", "keel-checkpoint"},
                   {"format_version", kFormatVersion},
                   {"step", c.step},
                   {"epoch", c.epoch},
                   {"model_name", c.model_name},
                   {"created", utc_now()},
                   {"checksum", "crc32 (zlib), lowercase hex"},
                   {"extra", extra_names},
                   {"files", files}};
  write_new_file(tmp_dir + "/" + kManifest, manifest.dump(1) + "\n", file_mode);
  if (after_file) after_file(tmp_dir + "/" + kManifest);
  if (::chmod(tmp_dir.c_str(), dir_mode_for(file_mode)) != 0) {
    throw std::runtime_error(tmp_dir + ": setting mode " + octal(dir_mode_for(file_mode)) + " failed: " +
                             std::strerror(errno));
  }
  fsync_dir(tmp_dir);

  // An existing checkpoint of this step (e.g. a corrupt one a resume fell back past) is moved aside
  // so the rename can take its name, and deleted once the new one is durable. Between the two
  // renames, list_checkpoints() takes the .old directory for this step: one copy exists at every
  // instant. An .old without a final directory is such a copy already: it stays until the new one is in.
  const std::string old_dir = final_dir + ".old";
  if (fs::exists(fs::symlink_status(final_dir, ec))) {
    fs::remove_all(old_dir, ec);  // a leftover: the final directory exists
    if (ec) throw std::runtime_error(old_dir + ": cannot remove a leftover: " + ec.message());
    durable_rename_dir(final_dir, old_dir, checkpoints_dir);
    if (after_file) after_file(old_dir);
  }
  durable_rename_dir(tmp_dir, final_dir, checkpoints_dir);
  if (fs::exists(fs::symlink_status(old_dir, ec))) {
    fs::remove_all(old_dir, ec);  // on failure prune() removes it later (its final directory exists)
  }
  return final_dir;
}

Verified verify(const std::string& checkpoint_dir) {
  Verified v;
  v.path = checkpoint_dir;
  v.problem = check(checkpoint_dir, nullptr);
  v.ok = v.problem.empty();
  return v;
}

CheckpointContents load(const std::string& checkpoint_dir) {
  json m;
  std::string problem = check(checkpoint_dir, &m);
  if (!problem.empty()) throw std::runtime_error("checkpoint " + checkpoint_dir + " is not valid: " + problem);
  CheckpointContents c;
  c.step = m["step"].get<int64_t>();
  c.epoch = m["epoch"].get<int64_t>();
  c.model_name = m["model_name"].get<std::string>();
  c.dir = checkpoint_dir;
  const json& files = m["files"];
  c.model = models::read_state_dict(checkpoint_dir + "/" + kModel);
  if (files.contains(kOptimizer)) {
    const std::string path = checkpoint_dir + "/" + kOptimizer;
    c.optimizer = read_optimizer_bytes(read_file(path), path);
  }
  if (m.contains("extra")) {
    for (const auto& e : m["extra"]) {
      const std::string name = e.get<std::string>();
      check_extra_name(name);
      c.extra[name] = models::read_state_dict(checkpoint_dir + "/" + name + ".pt");
    }
  }
  const std::string state_path = checkpoint_dir + "/" + kState;
  try {
    c.state = json::parse(read_file(state_path));
  } catch (const json::exception& e) {
    throw std::runtime_error(state_path + ": not valid JSON (" + e.what() + ")");
  }
  if (files.contains(kConfig)) c.config_toml = read_file(checkpoint_dir + "/" + kConfig);
  return c;
}

std::optional<std::string> find_latest_valid(const std::string& checkpoints_dir,
                                             std::vector<std::string>* skipped) {
  auto all = list_checkpoints(checkpoints_dir);
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    Verified v = verify(it->second);
    if (v.ok) return it->second;
    if (skipped) skipped->push_back(it->second + ": " + v.problem);
  }
  return std::nullopt;
}

std::vector<std::string> prune(const std::string& checkpoints_dir, int64_t keep_last,
                               const std::set<std::string>& keep) {
  std::vector<std::string> removed;
  auto all = list_checkpoints(checkpoints_dir);
  std::set<std::string> kept;
  for (auto it = all.rbegin(); it != all.rend(); ++it) {  // the newest valid, whatever keep_last says
    if (verify(it->second).ok) {
      kept.insert(it->second);
      break;
    }
  }
  const size_t n = all.size();
  for (size_t i = 0; i < n; ++i) {
    const std::string& path = all[i].second;
    const std::string name = fs::path(path).filename().string();
    const bool in_last = keep_last <= 0 || i + static_cast<size_t>(keep_last) >= n;
    if (in_last || kept.count(path) || keep.count(name) || keep.count(path) ||
        keep.count(dir_name_for_step(all[i].first))) {
      continue;
    }
    remove_dir(path);
    removed.push_back(path);
  }
  // Leftovers of interrupted saves and deletions.
  const int64_t newest = all.empty() ? -1 : all.back().first;
  std::error_code ec;
  std::vector<std::string> leftovers;
  for (const auto& entry : fs::directory_iterator(checkpoints_dir, ec)) {
    const std::string name = entry.path().filename().string();
    auto ends_with = [&](const std::string& suffix) {
      return name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    if (name.compare(0, 5, "step-") != 0) continue;
    if (ends_with(".trash")) {
      leftovers.push_back(entry.path().string());
    } else if (ends_with(".old")) {
      // A leftover once its final directory exists; otherwise it is the step's only copy (listed above).
      auto step = step_of_checkpoint_path(name);
      if (!step || fs::exists(fs::symlink_status(checkpoints_dir + "/" + dir_name_for_step(*step), ec))) {
        leftovers.push_back(entry.path().string());
      }
    } else if (auto step = step_of_tmp_name(name)) {
      if (*step <= newest) leftovers.push_back(entry.path().string());
    }
  }
  for (const auto& path : leftovers) {
    fs::remove_all(path, ec);
    if (ec) throw std::runtime_error(path + ": cannot delete leftover: " + ec.message());
    removed.push_back(path);
  }
  if (!removed.empty() && fs::is_directory(checkpoints_dir, ec)) fsync_dir(checkpoints_dir);
  return removed;
}

std::string compatibility_problem(const CheckpointContents& ckpt, const std::string& model_name,
                                  const models::StateDict& current_model,
                                  const std::string& current_config_toml,
                                  const std::vector<std::string>& config_keys) {
  std::vector<std::string> diffs;
  if (ckpt.model_name != model_name) {
    diffs.push_back("model name: checkpoint '" + ckpt.model_name + "', current '" + model_name + "'");
  }
  if (!current_config_toml.empty() && !ckpt.config_toml.empty()) {
    try {
      toml::table stored = toml::parse(ckpt.config_toml, std::string_view("checkpoint config.toml"));
      toml::table current = toml::parse(current_config_toml, std::string_view("current config"));
      for (const auto& key : config_keys) {
        std::string a = toml_value_text(stored, key), b = toml_value_text(current, key);
        if (a != b) diffs.push_back(key + ": checkpoint " + a + ", current " + b);
      }
    } catch (const toml::parse_error& e) {
      std::ostringstream ss;
      ss << "config cannot be compared: " << e.description() << " (" << e.source() << ")";
      diffs.push_back(ss.str());
    }
  }
  std::map<std::string, const at::Tensor*> stored;
  for (const auto& [name, t] : ckpt.model) stored[name] = &t;
  std::set<std::string> seen;
  std::vector<std::string> missing, shapes;
  for (const auto& [name, t] : current_model) {
    seen.insert(name);
    auto it = stored.find(name);
    if (it == stored.end()) {
      missing.push_back(name);
    } else if (it->second->sizes() != t.sizes()) {
      shapes.push_back(name + " checkpoint " + shape_text(*it->second) + ", current " + shape_text(t));
    }
  }
  std::vector<std::string> unexpected;
  for (const auto& [name, t] : ckpt.model) {
    if (!seen.count(name)) unexpected.push_back(name);
  }
  // Long lists (a different architecture) are cut to a readable length.
  auto listing = [](const std::string& what, const std::vector<std::string>& items) {
    std::string s = what + " (" + std::to_string(items.size()) + "): ";
    const size_t shown = std::min<size_t>(items.size(), 8);
    for (size_t i = 0; i < shown; ++i) s += (i ? ", " : "") + items[i];
    if (items.size() > shown) s += ", ...";
    return s;
  };
  if (!shapes.empty()) diffs.push_back(listing("weight shapes differ", shapes));
  if (!missing.empty()) diffs.push_back(listing("weights missing from the checkpoint", missing));
  if (!unexpected.empty()) diffs.push_back(listing("weights in the checkpoint but not in the model", unexpected));
  if (diffs.empty()) return "";
  std::string msg = "checkpoint is incompatible with the current run: ";
  for (size_t i = 0; i < diffs.size(); ++i) msg += (i ? "; " : "") + diffs[i];
  return msg;
}

// ---------------------------------------------------------------- optimizer

namespace {

enum class OptimizerKind { kSgd, kAdam, kAdamW };

// The optimizer's kind, from its param groups' options (all groups of one optimizer share a type).
OptimizerKind optimizer_kind(const torch::optim::Optimizer& opt) {
  if (opt.param_groups().empty()) throw std::runtime_error("optimizer state: the optimizer has no param groups");
  const torch::optim::OptimizerOptions& o = opt.param_groups().front().options();
  if (dynamic_cast<const torch::optim::SGDOptions*>(&o)) return OptimizerKind::kSgd;
  if (dynamic_cast<const torch::optim::AdamWOptions*>(&o)) return OptimizerKind::kAdamW;
  if (dynamic_cast<const torch::optim::AdamOptions*>(&o)) return OptimizerKind::kAdam;
  throw std::runtime_error("optimizer state: the optimizer is not supported for checkpoints (expected SGD, Adam or AdamW)");
}

at::Tensor int_scalar(int64_t v) { return at::scalar_tensor(v, at::TensorOptions().dtype(at::kLong)); }

std::string tensor_text(const at::Tensor& t) {
  std::ostringstream ss;
  ss << c10::toString(t.scalar_type()) << t.sizes();
  return ss.str();
}

// Adam and AdamW keep the same fields in different classes.
template <class State>
void add_adam_like(models::StateDict& sd, const std::string& prefix, const torch::optim::OptimizerParamState& st) {
  const auto* s = dynamic_cast<const State*>(&st);
  if (!s) throw std::runtime_error("optimizer state: " + prefix + " is not of the optimizer's state type");
  sd.emplace_back(prefix + "step", int_scalar(s->step()));
  sd.emplace_back(prefix + "exp_avg", s->exp_avg());
  sd.emplace_back(prefix + "exp_avg_sq", s->exp_avg_sq());
  if (s->max_exp_avg_sq().defined()) sd.emplace_back(prefix + "max_exp_avg_sq", s->max_exp_avg_sq());
}

// Parses a decimal index without leading zeros ("12"); nullopt for anything else.
std::optional<size_t> parse_index(const std::string& s) {
  if (s.empty() || s.size() > 9 || (s.size() > 1 && s[0] == '0')) return std::nullopt;
  size_t v = 0;
  for (char ch : s) {
    if (ch < '0' || ch > '9') return std::nullopt;
    v = v * 10 + static_cast<size_t>(ch - '0');
  }
  return v;
}

std::vector<std::string> split_dots(const std::string& s) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    const size_t dot = s.find('.', start);
    parts.push_back(s.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (dot == std::string::npos) return parts;
    start = dot + 1;
  }
}

}  // namespace

models::StateDict optimizer_state(const torch::optim::Optimizer& opt) {
  const OptimizerKind kind = optimizer_kind(opt);
  models::StateDict sd;
  sd.emplace_back("format", int_scalar(1));
  const auto& groups = opt.param_groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    sd.emplace_back("group." + std::to_string(g) + ".params", int_scalar(static_cast<int64_t>(groups[g].params().size())));
  }
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& params = groups[g].params();
    for (size_t i = 0; i < params.size(); ++i) {
      auto it = opt.state().find(compat::optimizer_state_key(params[i]));
      if (it == opt.state().end()) continue;  // no state yet (e.g. a parameter that never had a gradient)
      const std::string prefix = "state." + std::to_string(g) + "." + std::to_string(i) + ".";
      if (kind == OptimizerKind::kSgd) {
        const auto* s = dynamic_cast<const torch::optim::SGDParamState*>(it->second.get());
        if (!s) throw std::runtime_error("optimizer state: " + prefix + " is not SGD state");
        if (s->momentum_buffer().defined()) sd.emplace_back(prefix + "momentum_buffer", s->momentum_buffer());
      } else if (kind == OptimizerKind::kAdam) {
        add_adam_like<torch::optim::AdamParamState>(sd, prefix, *it->second);
      } else {
        add_adam_like<torch::optim::AdamWParamState>(sd, prefix, *it->second);
      }
    }
  }
  return sd;
}

void load_optimizer_state(torch::optim::Optimizer& opt, const models::StateDict& state, const std::string& where) {
  auto bad = [&](const std::string& what) -> void { throw std::runtime_error(where + ": " + what); };
  const OptimizerKind kind = optimizer_kind(opt);
  auto& groups = opt.param_groups();
  auto int_value = [&](const std::string& name, const at::Tensor& t) {
    if (t.scalar_type() != at::kLong || t.numel() != 1) {
      bad("'" + name + "' is a " + tensor_text(t) + " tensor; expected one int64");
    }
    return t.item<int64_t>();
  };
  bool format_seen = false;
  std::map<size_t, int64_t> counts;
  std::map<std::pair<size_t, size_t>, std::map<std::string, at::Tensor>> fields;
  for (const auto& [name, t] : state) {
    const std::vector<std::string> parts = split_dots(name);
    if (name == "format") {
      const int64_t v = int_value(name, t);
      if (v != 1) bad("format " + std::to_string(v) + " is not supported (expected 1)");
      format_seen = true;
    } else if (parts.size() == 3 && parts[0] == "group" && parse_index(parts[1]) && parts[2] == "params") {
      counts[*parse_index(parts[1])] = int_value(name, t);
    } else if (parts.size() == 4 && parts[0] == "state" && parse_index(parts[1]) && parse_index(parts[2])) {
      fields[{*parse_index(parts[1]), *parse_index(parts[2])}][parts[3]] = t;
    } else {
      bad("unexpected entry '" + name + "' (expected format, group.<g>.params or state.<g>.<i>.<field>)");
    }
  }
  if (!format_seen) bad("no 'format' entry (expected the optimizer state keel writes)");
  auto layout = [](const std::vector<int64_t>& sizes) {
    std::string s = std::to_string(sizes.size()) + " param groups of [";
    for (size_t k = 0; k < sizes.size(); ++k) s += (k ? ", " : "") + std::to_string(sizes[k]);
    return s + "] parameters";
  };
  std::vector<int64_t> have, stored;
  for (const auto& g : groups) have.push_back(static_cast<int64_t>(g.params().size()));
  for (size_t g = 0; g < counts.size(); ++g) {
    if (!counts.count(g)) bad("group entries are not numbered 0..n-1");
    stored.push_back(counts.at(g));
  }
  if (stored != have) {
    bad("the checkpoint's optimizer has " + layout(stored) + ", this optimizer " + layout(have) +
        " (expected the same model and parameter grouping)");
  }

  // Everything is checked and copied before the optimizer's state is touched.
  std::vector<std::pair<compat::OptimizerStateKey, std::unique_ptr<torch::optim::OptimizerParamState>>> loaded;
  for (const auto& entry : fields) {  // not a structured binding: C++17 lambdas cannot capture one
    const size_t g = entry.first.first, i = entry.first.second;
    const std::map<std::string, at::Tensor>& f = entry.second;
    if (g >= groups.size() || i >= groups[g].params().size()) {
      bad("state of parameter " + std::to_string(i) + " of group " + std::to_string(g) + ", which does not exist");
    }
    const at::Tensor& p = groups[g].params()[i];
    const std::string prefix = "state." + std::to_string(g) + "." + std::to_string(i) + ".";
    std::set<std::string> known;
    auto buffer = [&](const char* field, bool required) -> at::Tensor {
      known.insert(field);
      auto it = f.find(field);
      if (it == f.end()) {
        if (required) bad("'" + prefix + field + "' is missing");
        return {};
      }
      const at::Tensor& t = it->second;
      if (t.scalar_type() != p.scalar_type() || t.sizes() != p.sizes()) {
        bad("'" + prefix + field + "' is a " + tensor_text(t) + " tensor; expected its parameter's " + tensor_text(p));
      }
      return t.to(p.device(), t.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
    };
    std::unique_ptr<torch::optim::OptimizerParamState> st;
    if (kind == OptimizerKind::kSgd) {
      auto s = std::make_unique<torch::optim::SGDParamState>();
      s->momentum_buffer(buffer("momentum_buffer", true));
      st = std::move(s);
    } else {
      known.insert("step");
      auto step_it = f.find("step");
      if (step_it == f.end()) bad("'" + prefix + "step' is missing");
      const int64_t step = int_value(prefix + "step", step_it->second);
      if (step < 1) bad("'" + prefix + "step' is " + std::to_string(step) + "; expected >= 1");
      const torch::optim::OptimizerOptions& o = groups[g].options();
      const bool amsgrad = kind == OptimizerKind::kAdam ? static_cast<const torch::optim::AdamOptions&>(o).amsgrad()
                                                        : static_cast<const torch::optim::AdamWOptions&>(o).amsgrad();
      at::Tensor m1 = buffer("exp_avg", true), m2 = buffer("exp_avg_sq", true), mx = buffer("max_exp_avg_sq", amsgrad);
      if (kind == OptimizerKind::kAdam) {
        auto s = std::make_unique<torch::optim::AdamParamState>();
        s->step(step).exp_avg(m1).exp_avg_sq(m2).max_exp_avg_sq(mx);
        st = std::move(s);
      } else {
        auto s = std::make_unique<torch::optim::AdamWParamState>();
        s->step(step).exp_avg(m1).exp_avg_sq(m2).max_exp_avg_sq(mx);
        st = std::move(s);
      }
    }
    for (const auto& [field, t] : f) {
      if (!known.count(field)) bad("unexpected field '" + prefix + field + "' for this optimizer");
    }
    loaded.emplace_back(compat::optimizer_state_key(p), std::move(st));
  }
  for (const auto& g : groups) {
    for (const auto& p : g.params()) opt.state().erase(compat::optimizer_state_key(p));
  }
  for (auto& [key, st] : loaded) opt.state()[key] = std::move(st);
}

models::StateDict read_optimizer_bytes(const std::string& bytes, const std::string& name) {
  if (is_torchscript_archive(bytes)) {
    throw std::runtime_error(
        name + ": a TorchScript archive (LibTorch's torch::serialize format, in which keel wrote optimizer.pt "
        "before), which keel no longer loads: loading one runs TorchScript's unpickler and any code in the "
        "archive. This checkpoint cannot be resumed; to keep its weights, start a new run with model.weights "
        "set to its model.pt (the optimizer state then starts afresh)");
  }
  return models::read_state_dict_bytes(bytes, name);
}

json param_group_options(const torch::optim::Optimizer& opt) {
  json groups = json::array();
  size_t index = 0;
  for (const auto& group : opt.param_groups()) {
    const torch::optim::OptimizerOptions& o = group.options();
    json g;
    if (auto* s = dynamic_cast<const torch::optim::SGDOptions*>(&o)) {
      g = {{"type", "sgd"}, {"lr", s->lr()}, {"momentum", s->momentum()}, {"dampening", s->dampening()},
           {"weight_decay", s->weight_decay()}, {"nesterov", s->nesterov()}};
    } else if (auto* a = dynamic_cast<const torch::optim::AdamWOptions*>(&o)) {
      g = {{"type", "adamw"}, {"lr", a->lr()}, {"betas", {std::get<0>(a->betas()), std::get<1>(a->betas())}},
           {"eps", a->eps()}, {"weight_decay", a->weight_decay()}, {"amsgrad", a->amsgrad()}};
    } else if (auto* a = dynamic_cast<const torch::optim::AdamOptions*>(&o)) {
      g = {{"type", "adam"}, {"lr", a->lr()}, {"betas", {std::get<0>(a->betas()), std::get<1>(a->betas())}},
           {"eps", a->eps()}, {"weight_decay", a->weight_decay()}, {"amsgrad", a->amsgrad()}};
    } else {
      throw std::runtime_error("param group " + std::to_string(index) +
                               ": options type is not supported for checkpoints (expected SGD, Adam or AdamW)");
    }
    groups.push_back(std::move(g));
    ++index;
  }
  return groups;
}

void restore_param_group_options(torch::optim::Optimizer& opt, const json& groups) {
  auto& pg = opt.param_groups();
  if (!groups.is_array() || groups.size() != pg.size()) {
    throw std::runtime_error("param group options: checkpoint has " +
                             (groups.is_array() ? std::to_string(groups.size()) : std::string("no list of")) +
                             " groups, the optimizer has " + std::to_string(pg.size()));
  }
  for (size_t i = 0; i < pg.size(); ++i) {
    const json& g = groups[i];
    const std::string where = "param group " + std::to_string(i);
    auto num = [&](const char* key) {
      if (!g.contains(key) || !g[key].is_number()) throw std::runtime_error(where + ": no number '" + key + "'");
      return g[key].get<double>();
    };
    auto flag = [&](const char* key) {
      if (!g.contains(key) || !g[key].is_boolean()) throw std::runtime_error(where + ": no boolean '" + key + "'");
      return g[key].get<bool>();
    };
    auto betas = [&]() {
      if (!g.contains("betas") || !g["betas"].is_array() || g["betas"].size() != 2 || !g["betas"][0].is_number() ||
          !g["betas"][1].is_number()) {
        throw std::runtime_error(where + ": no 'betas' pair");
      }
      return std::make_tuple(g["betas"][0].get<double>(), g["betas"][1].get<double>());
    };
    const std::string type = g.contains("type") && g["type"].is_string() ? g["type"].get<std::string>() : "";
    torch::optim::OptimizerOptions& o = pg[i].options();
    if (auto* s = dynamic_cast<torch::optim::SGDOptions*>(&o); s && type == "sgd") {
      s->lr(num("lr")).momentum(num("momentum")).dampening(num("dampening"))
          .weight_decay(num("weight_decay")).nesterov(flag("nesterov"));
    } else if (auto* a = dynamic_cast<torch::optim::AdamWOptions*>(&o); a && type == "adamw") {
      a->lr(num("lr")).betas(betas()).eps(num("eps")).weight_decay(num("weight_decay")).amsgrad(flag("amsgrad"));
    } else if (auto* a = dynamic_cast<torch::optim::AdamOptions*>(&o); a && type == "adam") {
      a->lr(num("lr")).betas(betas()).eps(num("eps")).weight_decay(num("weight_decay")).amsgrad(flag("amsgrad"));
    } else {
      const char* have = dynamic_cast<torch::optim::SGDOptions*>(&o)     ? "sgd"
                         : dynamic_cast<torch::optim::AdamWOptions*>(&o) ? "adamw"
                         : dynamic_cast<torch::optim::AdamOptions*>(&o)  ? "adam"
                                                                         : "unsupported";
      throw std::runtime_error(where + ": checkpoint options are of type '" + type + "', the optimizer's are '" +
                               have + "'");
    }
  }
}

void capture_optimizer(CheckpointContents& c, const torch::optim::Optimizer& opt) {
  c.optimizer = optimizer_state(opt);
  c.state["optimizer_param_groups"] = param_group_options(opt);
}

void restore_optimizer(const CheckpointContents& c, torch::optim::Optimizer& opt) {
  const std::string where = c.dir.empty() ? std::string("optimizer state") : c.dir + "/" + kOptimizer;
  if (!c.optimizer) throw std::runtime_error("checkpoint has no optimizer.pt (expected optimizer state)");
  if (!c.state.is_object() || !c.state.contains("optimizer_param_groups")) {
    throw std::runtime_error("checkpoint state.json has no optimizer_param_groups (expected param-group options)");
  }
  // Options first: the state check needs each group's amsgrad as the checkpoint had it.
  restore_param_group_options(opt, c.state["optimizer_param_groups"]);
  load_optimizer_state(opt, *c.optimizer, where);
}

// ---------------------------------------------------------------- RNG

namespace {

std::string generator_state_b64(at::Generator gen) {
  at::Tensor st;
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    st = gen.get_state();
  }
  st = st.contiguous();
  return base64_encode(std::string(static_cast<const char*>(st.data_ptr()), static_cast<size_t>(st.nbytes())));
}

void set_generator_state_b64(at::Generator gen, const std::string& b64, const std::string& what) {
  const std::string bytes = base64_decode(b64);
  at::Tensor st = at::empty({static_cast<int64_t>(bytes.size())}, at::kByte);
  std::memcpy(st.data_ptr(), bytes.data(), bytes.size());
  try {
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(st);
  } catch (const c10::Error& e) {
    throw std::runtime_error(what + " RNG state rejected (" + std::to_string(bytes.size()) +
                             " bytes): " + e.what_without_backtrace());
  }
}

int cuda_device_count() {
  const auto& hooks = at::detail::getCUDAHooks();
  return hooks.hasCUDA() ? hooks.getNumGPUs() : 0;
}

}  // namespace

json rng_state_json() {
  json j;
  j["cpu"] = generator_state_b64(at::detail::getDefaultCPUGenerator());
  json cuda = json::array();
  const int n = cuda_device_count();
  for (int i = 0; i < n; ++i) {
    cuda.push_back(generator_state_b64(at::globalContext().defaultGenerator(at::Device(at::kCUDA, i))));
  }
  j["cuda"] = cuda;
  return j;
}

std::vector<std::string> restore_rng_state(const json& j) {
  if (!j.is_object() || !j.contains("cpu") || !j["cpu"].is_string()) {
    throw std::runtime_error("RNG state: expected an object with a base64 'cpu' string");
  }
  set_generator_state_b64(at::detail::getDefaultCPUGenerator(), j["cpu"].get<std::string>(), "CPU");
  std::vector<std::string> notes;
  if (j.contains("cuda") && j["cuda"].is_array() && !j["cuda"].empty()) {
    const int n = cuda_device_count();
    const int stored = static_cast<int>(j["cuda"].size());
    for (int i = 0; i < stored; ++i) {
      if (i >= n) {
        notes.push_back("CUDA RNG state of device " + std::to_string(i) + " not restored: this process has " +
                        std::to_string(n) + " CUDA device(s)");
        continue;
      }
      if (!j["cuda"][i].is_string()) throw std::runtime_error("RNG state: cuda[" + std::to_string(i) + "] is not a string");
      set_generator_state_b64(at::globalContext().defaultGenerator(at::Device(at::kCUDA, i)),
                              j["cuda"][i].get<std::string>(), "CUDA device " + std::to_string(i));
    }
  }
  return notes;
}

// ---------------------------------------------------------------- base64

namespace {
constexpr char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
}

std::string base64_encode(const std::string& bytes) {
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= bytes.size(); i += 3) {
    uint32_t v = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8) | uint8_t(bytes[i + 2]);
    out += kB64[v >> 18];
    out += kB64[(v >> 12) & 63];
    out += kB64[(v >> 6) & 63];
    out += kB64[v & 63];
  }
  if (i < bytes.size()) {
    uint32_t v = uint8_t(bytes[i]) << 16;
    if (i + 1 < bytes.size()) v |= uint8_t(bytes[i + 1]) << 8;
    out += kB64[v >> 18];
    out += kB64[(v >> 12) & 63];
    out += i + 1 < bytes.size() ? kB64[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

std::string base64_decode(const std::string& text) {
  if (text.size() % 4 != 0) {
    throw std::runtime_error("base64: length " + std::to_string(text.size()) + " is not a multiple of 4");
  }
  auto value = [](char ch) -> int {
    if (ch >= 'A' && ch <= 'Z') return ch - 'A';
    if (ch >= 'a' && ch <= 'z') return ch - 'a' + 26;
    if (ch >= '0' && ch <= '9') return ch - '0' + 52;
    if (ch == '+') return 62;
    if (ch == '/') return 63;
    return -1;
  };
  std::string out;
  out.reserve(text.size() / 4 * 3);
  for (size_t i = 0; i < text.size(); i += 4) {
    const bool last = i + 4 == text.size();
    int pad = 0;
    if (last && text[i + 3] == '=') pad = text[i + 2] == '=' ? 2 : 1;
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      int d = k >= 4 - pad ? 0 : value(text[i + k]);
      if (d < 0) {
        throw std::runtime_error("base64: unexpected character at offset " + std::to_string(i + k));
      }
      v = (v << 6) | static_cast<uint32_t>(d);
    }
    out += static_cast<char>(v >> 16);
    if (pad < 2) out += static_cast<char>((v >> 8) & 255);
    if (pad < 1) out += static_cast<char>(v & 255);
  }
  return out;
}

}  // namespace keel::checkpoint
