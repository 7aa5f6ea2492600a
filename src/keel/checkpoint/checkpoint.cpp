// Checkpoint store: atomic checksummed checkpoint directories, verification, lookup, pruning,
// compatibility checks, and optimizer / param-group / RNG state serialisation.
#include "keel/checkpoint/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cerrno>
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
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <toml++/toml.h>

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
  if (auto dir_step = step_of_dir_name(dir)) {
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

// Final step-* directories under `dir`, sorted by step, oldest first.
std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (!entry.is_directory(ec)) continue;
    if (auto step = step_of_dir_name(entry.path().filename().string())) {
      out.emplace_back(*step, entry.path().string());
    }
  }
  std::sort(out.begin(), out.end());
  return out;
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

std::string save(const std::string& checkpoints_dir, const CheckpointContents& c, const FileHook& after_file) {
  for (const auto& [name, sd] : c.extra) check_extra_name(name);
  std::error_code ec;
  const bool existed = fs::is_directory(checkpoints_dir, ec);
  util::make_dirs(checkpoints_dir);
  if (!existed) {
    std::string parent = fs::path(checkpoints_dir).parent_path().string();
    fsync_dir(parent.empty() ? "." : parent);
  }
  const std::string final_dir = checkpoints_dir + "/" + dir_name_for_step(c.step);
  const std::string tmp_dir = final_dir + ".tmp";
  fs::remove_all(tmp_dir, ec);
  if (ec) throw std::runtime_error(tmp_dir + ": cannot remove a stale partial checkpoint: " + ec.message());
  util::make_dirs(tmp_dir);

  std::vector<std::string> names;
  auto done = [&](const std::string& name) {
    names.push_back(name);
    if (after_file) after_file(tmp_dir + "/" + name);
  };
  models::write_state_dict(c.model, tmp_dir + "/" + kModel);
  done(kModel);
  if (!c.optimizer_bytes.empty()) {
    util::atomic_write_file(tmp_dir + "/" + kOptimizer, c.optimizer_bytes);
    done(kOptimizer);
  }
  json extra_names = json::array();
  for (const auto& [name, sd] : c.extra) {
    models::write_state_dict(sd, tmp_dir + "/" + name + ".pt");
    extra_names.push_back(name);
    done(name + ".pt");
  }
  util::atomic_write_file(tmp_dir + "/" + kState, c.state.dump(1) + "\n");
  done(kState);
  util::atomic_write_file(tmp_dir + "/" + kConfig, c.config_toml);
  done(kConfig);

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
  util::atomic_write_file(tmp_dir + "/" + kManifest, manifest.dump(1) + "\n");
  if (after_file) after_file(tmp_dir + "/" + kManifest);

  // An existing checkpoint of this step (e.g. a corrupt one a resume fell back past) is moved
  // aside so the rename can take its name; it is deleted once the new one is durable.
  std::string old_dir;
  if (fs::exists(final_dir, ec)) {
    old_dir = final_dir + ".old";
    fs::remove_all(old_dir, ec);
    fs::rename(final_dir, old_dir, ec);
    if (ec) throw std::runtime_error(final_dir + ": cannot move the existing checkpoint aside: " + ec.message());
  }
  util::durable_rename(tmp_dir, final_dir);  // fsyncs tmp_dir, renames, fsyncs checkpoints_dir
  if (!old_dir.empty()) fs::remove_all(old_dir, ec);
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
  const json& files = m["files"];
  c.model = models::read_state_dict(checkpoint_dir + "/" + kModel);
  if (files.contains(kOptimizer)) c.optimizer_bytes = read_file(checkpoint_dir + "/" + kOptimizer);
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
    if (in_last || kept.count(path) || keep.count(name) || keep.count(path)) continue;
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
    if (ends_with(".trash") || ends_with(".old")) {
      leftovers.push_back(entry.path().string());
    } else if (ends_with(".tmp")) {
      auto step = step_of_dir_name(name.substr(0, name.size() - 4));
      if (step && *step <= newest) leftovers.push_back(entry.path().string());
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

std::string optimizer_to_bytes(const torch::optim::Optimizer& opt) {
  torch::serialize::OutputArchive archive;
  opt.save(archive);
  std::ostringstream out(std::ios::binary);
  archive.save_to(out);
  return out.str();
}

void optimizer_from_bytes(torch::optim::Optimizer& opt, const std::string& bytes) {
  try {
    // The state goes onto the parameters' device (a checkpoint written on CPU resumes on CUDA).
    c10::optional<at::Device> device;  // c10::optional: 1.13's load_from takes it (std::optional in 2.x)
    for (const auto& g : opt.param_groups()) {
      if (!g.params().empty()) {
        device = g.params().front().device();
        break;
      }
    }
    torch::serialize::InputArchive archive;
    archive.load_from(bytes.data(), bytes.size(), device);
    opt.load(archive);
  } catch (const c10::Error& e) {
    throw std::runtime_error(std::string("optimizer state does not fit this optimizer: ") + e.what_without_backtrace());
  }
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
  c.optimizer_bytes = optimizer_to_bytes(opt);
  c.state["optimizer_param_groups"] = param_group_options(opt);
}

void restore_optimizer(const CheckpointContents& c, torch::optim::Optimizer& opt) {
  if (c.optimizer_bytes.empty()) throw std::runtime_error("checkpoint has no optimizer.pt (expected optimizer state)");
  if (!c.state.is_object() || !c.state.contains("optimizer_param_groups")) {
    throw std::runtime_error("checkpoint state.json has no optimizer_param_groups (expected param-group options)");
  }
  optimizer_from_bytes(opt, c.optimizer_bytes);
  restore_param_group_options(opt, c.state["optimizer_param_groups"]);
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
