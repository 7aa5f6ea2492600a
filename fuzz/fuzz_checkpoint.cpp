// libFuzzer target: the checkpoint readers. The first input byte picks what the rest is:
//   0  a whole torch.save() zip file       -> models::read_state_dict_bytes (zip reader + unpickler)
//   1  the pickle program (data.pkl) only  -> wrapped in a valid zip with storages data/0..data/15,
//                                             then read as in 0 (mutations reach the unpickler directly;
//                                             a mutated zip mostly fails its CRC-32 check)
//   2  a checkpoint's manifest.json        -> checkpoint::verify, and checkpoint::load when it verifies,
//                                             on a real checkpoint directory written at start-up
//   3  a state.json document               -> checkpoint::restore_rng_state and
//                                             restore_param_group_options (SGD and Adam optimizers)
//   4  an optimizer.pt file                -> checkpoint::read_optimizer_bytes (keel's restricted reader;
//                                             a TorchScript archive is refused unread), load_optimizer_state
//                                             into SGD (momentum) and Adam (amsgrad), then one step of each
//   5  any file of a checkpoint directory  -> the next byte picks one of the real checkpoint's files (every
//                                             file save() writes: model.pt, optimizer.pt, ema.pt, state.json,
//                                             config.toml, manifest.json); the rest replaces it, the manifest
//                                             is resealed (size, CRC-32) so verify() passes, then load(),
//                                             restore_optimizer, compatibility_problem (the config.toml
//                                             reader) and the state.json restorers run as a resume would
// Any input must be read or refused with std::runtime_error; anything else (another exception, a
// crash, a sanitizer report, a leak) is a finding.
//
// Seeds are real files written at start-up (not committed): with $KEEL_FUZZ_SEEDS set to a directory,
// LLVMFuzzerInitialize writes there a keel-written model.pt and its data.pkl, a Python torch.save()
// file (OrderedDict with _metadata, shared storage; when /usr/bin/python3 has torch), a real
// checkpoint's manifest.json and state.json, its optimizer.pt (mode 4), and every file of it (mode 5).
// ctest passes that directory as a corpus (CMakeLists.txt).
#include <caffe2/serialize/inline_container.h>
#include <torch/optim/adam.h>
#include <torch/optim/sgd.h>

#include <sys/wait.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "keel/checkpoint/checkpoint.h"
#include "keel/models/state_dict.h"

namespace fs = std::filesystem;
using keel::models::StateDict;

namespace {

std::string g_ckpt_dir;  // a real checkpoint; mode 2 rewrites its manifest.json
std::string g_manifest;  // the real manifest, restored after each mode-2 input
std::vector<std::pair<std::string, std::string>> g_files;  // every file of the checkpoint: name, bytes (sorted)

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A small state dict with a shared storage (a view), integer and float tensors.
StateDict tiny_state_dict() {
  at::Tensor w = at::arange(12, at::kFloat).reshape({3, 4});
  return {{"fc.weight", w},
          {"fc.bias", at::zeros({3})},
          {"bn.running_mean", at::ones({3}, at::kDouble)},
          {"bn.num_batches_tracked", at::tensor(int64_t{7})},
          {"empty", at::empty({0, 3})}};
}

// data.pkl of a torch.save zip held in memory.
std::string pickle_of(const std::string& zip) {
  std::istringstream in(zip, std::ios::binary);
  caffe2::serialize::PyTorchStreamReader reader(&in);
  auto [ptr, n] = reader.getRecord("data.pkl");
  return std::string(static_cast<const char*>(ptr.get()), n);
}

// A valid zip holding `pickle` as data.pkl and 16 storages data/0..data/15 of 4096 bytes each.
std::string wrap_pickle(const std::string& pickle) {
  std::string out;
  {
    caffe2::serialize::PyTorchStreamWriter writer([&out](const void* p, size_t n) {
      out.append(static_cast<const char*>(p), n);
      return n;
    });
    writer.writeRecord("data.pkl", pickle.data(), pickle.size());
    writer.writeRecord("byteorder", "little", 6);
    static const std::string storage(4096, '\x01');
    for (int k = 0; k < 16; ++k) writer.writeRecord("data/" + std::to_string(k), storage.data(), storage.size());
    writer.writeEndOfFile();
  }
  return out;
}

void write_seeds(const std::string& dir) {
  fs::create_directories(dir);
  const std::string tmp = dir + "/.model.pt";
  keel::models::write_state_dict(tiny_state_dict(), tmp);
  const std::string zip = read_file(tmp);
  fs::remove(tmp);
  write_file(dir + "/keel-model-pt", std::string(1, '\0') + zip);
  write_file(dir + "/keel-data-pkl", std::string(1, '\1') + pickle_of(zip));
  // Python's torch.save: an OrderedDict with _metadata, tensors sharing one storage, protocol 2.
  const std::string py = dir + "/.python.pt";
  const std::string cmd =
      "/usr/bin/python3 -c \"import torch, collections; s = torch.arange(12.).reshape(3, 4); "
      "d = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).state_dict(); "
      "d['view'] = s[1]; d['whole'] = s; torch.save(d, '" + py + "')\" 2>/dev/null";
  int rc = std::system(cmd.c_str());
  if (rc != -1 && WIFEXITED(rc) && WEXITSTATUS(rc) == 0 && fs::exists(py)) {
    const std::string pzip = read_file(py);
    write_file(dir + "/python-model-pt", std::string(1, '\0') + pzip);
    write_file(dir + "/python-data-pkl", std::string(1, '\1') + pickle_of(pzip));
    fs::remove(py);
  } else {
    std::cerr << "fuzz_checkpoint: no Python torch.save seed (/usr/bin/python3 without torch)\n";
  }
  write_file(dir + "/manifest-json", std::string(1, '\2') + g_manifest);
  write_file(dir + "/state-json", std::string(1, '\3') + read_file(g_ckpt_dir + "/state.json"));
  write_file(dir + "/optimizer-pt", std::string(1, '\4') + read_file(g_ckpt_dir + "/optimizer.pt"));
  for (size_t k = 0; k < g_files.size(); ++k) {
    write_file(dir + "/file-" + g_files[k].first, std::string(1, '\5') + std::string(1, static_cast<char>(k)) +
                                                      g_files[k].second);
  }
}

// A real checkpoint (model, optimizer, an extra state dict, state with RNG and param groups).
void make_checkpoint() {
  const char* base = std::getenv("KEEL_TEST_TMP");
  fs::path root = fs::path(base && *base ? base : fs::temp_directory_path().string()) /
                  ("keel_fuzz_checkpoint_" + std::to_string(::getpid()));
  fs::remove_all(root);
  keel::checkpoint::CheckpointContents c;
  c.model = tiny_state_dict();
  c.extra["ema"] = tiny_state_dict();
  c.step = 3;
  c.epoch = 1;
  c.model_name = "tiny";
  c.config_toml = "[model]\nname = \"tiny\"\n";
  at::Tensor p = at::zeros({3}, at::requires_grad());
  torch::optim::SGD opt({p}, torch::optim::SGDOptions(0.1).momentum(0.9));
  p.mutable_grad() = at::ones({3});
  opt.step();  // so that optimizer.pt holds a momentum buffer
  c.state["rng"] = keel::checkpoint::rng_state_json();
  keel::checkpoint::capture_optimizer(c, opt);
  g_ckpt_dir = keel::checkpoint::save(root.string(), c);
  g_manifest = read_file(g_ckpt_dir + "/manifest.json");
  for (const auto& e : fs::directory_iterator(g_ckpt_dir)) {
    g_files.emplace_back(e.path().filename().string(), read_file(e.path().string()));
  }
  std::sort(g_files.begin(), g_files.end());
  std::atexit([] {
    std::error_code ec;
    fs::remove_all(fs::path(g_ckpt_dir).parent_path(), ec);
  });
}

void read_json_state(const std::string& text) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return;
  try {
    keel::checkpoint::restore_rng_state(j.contains("rng") ? j["rng"] : j);
  } catch (const std::runtime_error&) {
  }
  at::Tensor p = at::zeros({3}, at::requires_grad());
  torch::optim::SGD sgd({p}, torch::optim::SGDOptions(0.1));
  torch::optim::Adam adam({p}, torch::optim::AdamOptions(0.1));
  const nlohmann::json& groups = j.is_object() && j.contains("optimizer_param_groups") ? j["optimizer_param_groups"] : j;
  for (torch::optim::Optimizer* opt : {static_cast<torch::optim::Optimizer*>(&sgd),
                                       static_cast<torch::optim::Optimizer*>(&adam)}) {
    try {
      keel::checkpoint::restore_param_group_options(*opt, groups);
    } catch (const std::runtime_error&) {
    }
  }
}

// The optimizers modes 4 and 5 restore into: one parameter of 3 elements, as in make_checkpoint().
struct Optimizers {
  at::Tensor p = at::zeros({3}, at::requires_grad());
  torch::optim::SGD sgd{std::vector<at::Tensor>{p}, torch::optim::SGDOptions(0.1).momentum(0.9)};
  torch::optim::Adam adam{std::vector<at::Tensor>{p}, torch::optim::AdamOptions(0.1).amsgrad(true)};
};

// One step with a gradient: a loaded state that passed the checks must not break the optimizer.
void step(torch::optim::Optimizer& opt, const at::Tensor& p) {
  p.mutable_grad() = at::ones({3});
  opt.step();
}

void read_optimizer(const std::string& bytes) {
  StateDict sd;
  try {
    sd = keel::checkpoint::read_optimizer_bytes(bytes, "fuzz/optimizer.pt");
  } catch (const std::runtime_error&) {
    return;
  }
  Optimizers o;
  for (torch::optim::Optimizer* opt : {static_cast<torch::optim::Optimizer*>(&o.sgd),
                                       static_cast<torch::optim::Optimizer*>(&o.adam)}) {
    try {
      keel::checkpoint::load_optimizer_state(*opt, sd, "fuzz/optimizer.pt");
    } catch (const std::runtime_error&) {
      continue;
    }
    step(*opt, o.p);
  }
}

// Mode 5: `bytes` replace file `index` of the real checkpoint; the manifest is resealed unless it is
// the file replaced; then everything a resume reads is read. The real files are put back afterwards.
void read_checkpoint_file(size_t index, const std::string& bytes) {
  const std::string name = g_files[index % g_files.size()].first;
  write_file(g_ckpt_dir + "/" + name, bytes);
  if (name != "manifest.json") {
    nlohmann::json m = nlohmann::json::parse(g_manifest);
    char crc[9];
    std::snprintf(crc, sizeof crc, "%08x", keel::checkpoint::file_crc32(g_ckpt_dir + "/" + name));
    m["files"][name] = {{"size", bytes.size()}, {"crc32", crc}};
    write_file(g_ckpt_dir + "/manifest.json", m.dump(1));
  }
  if (keel::checkpoint::verify(g_ckpt_dir).ok) {
    try {
      keel::checkpoint::CheckpointContents c = keel::checkpoint::load(g_ckpt_dir);
      for (const auto& [key, t] : c.model) (void)t.sum();
      for (const auto& [extra, sd] : c.extra)
        for (const auto& [key, t] : sd) (void)t.sum();
      (void)keel::checkpoint::compatibility_problem(c, "tiny", tiny_state_dict(), "[model]\nname = \"tiny\"\n",
                                                    {"model.name", "model.num_classes"});
      Optimizers o;
      try {
        keel::checkpoint::restore_optimizer(c, o.sgd);
        step(o.sgd, o.p);
      } catch (const std::runtime_error&) {
      }
      read_json_state(c.state.dump());
    } catch (const std::runtime_error&) {
    }
  }
  for (const auto& [n, b] : g_files) write_file(g_ckpt_dir + "/" + n, b);
}

}  // namespace

// LibTorch's PyTorchStreamReader leaks the miniz reader state (~800 bytes) when its constructor throws on a
// damaged archive: mz_zip_reader_init allocated it, and the destructor that would call mz_zip_reader_end never
// runs for a constructor that threw (seen in 1.13; not keel's code: read_state_dict only constructs it).
// LibTorch has no frame pointers, so the fast unwinder's stack of such a leak ends in an unnamed
// libtorch_cpu.so frame: the suppression can only name the library. keel's own leaks are allocated from
// keel frames and still reported (the unpickler's memo cycle was, before its arena; fuzz/README.md).
extern "C" const char* __lsan_default_suppressions() { return "leak:libtorch_cpu.so\n"; }
extern "C" const char* __lsan_default_options() { return "print_suppressions=0"; }

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  make_checkpoint();
  if (const char* dir = std::getenv("KEEL_FUZZ_SEEDS")) write_seeds(dir);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 6) {
    case 0:
    case 1:
      try {
        StateDict sd = keel::models::read_state_dict_bytes(data[0] % 6 == 0 ? rest : wrap_pickle(rest), "fuzz.pt");
        for (const auto& [name, t] : sd) (void)t.sum();  // touch every element of every view
      } catch (const std::runtime_error&) {
      }
      break;
    case 2:
      write_file(g_ckpt_dir + "/manifest.json", rest);
      if (keel::checkpoint::verify(g_ckpt_dir).ok) {
        try {
          (void)keel::checkpoint::load(g_ckpt_dir);
        } catch (const std::runtime_error&) {
        }
      }
      write_file(g_ckpt_dir + "/manifest.json", g_manifest);
      break;
    case 3:
      read_json_state(rest);
      break;
    case 4:
      read_optimizer(rest);
      break;
    case 5:
      if (!rest.empty()) read_checkpoint_file(static_cast<uint8_t>(rest[0]), rest.substr(1));
      break;
  }
  return 0;
}
