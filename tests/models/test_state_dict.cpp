// Tests for state-dict I/O: reading real torch.save() files, writing files Python reads,
// strict load_state_dict errors, and golden logits of torchvision ResNets loaded into keel's.
#include "keel/models/state_dict.h"

#include <caffe2/serialize/inline_container.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "keel/models/registry.h"

namespace fs = std::filesystem;
using keel::models::StateDict;

namespace {

// A fresh directory under $KEEL_TEST_TMP (or /tmp), removed when the test ends.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name) {
    const char* base = std::getenv("KEEL_TEST_TMP");
    path = fs::path(base && *base ? base : "/tmp") / ("keel_state_dict_" + name + "_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& f) const { return (path / f).string(); }
};

// Runs `code` with /usr/bin/python3 (Debian's, which has torch) and returns its exit status.
int run_python(const TempDir& dir, const std::string& code, const std::string& args = "") {
  const std::string script = dir / "snippet.py";
  std::ofstream(script) << code;
  const std::string cmd = "/usr/bin/python3 " + script + " " + args;
  int rc = std::system(cmd.c_str());
  return rc == -1 ? -1 : WEXITSTATUS(rc);
}

const at::Tensor& find(const StateDict& sd, const std::string& name) {
  for (const auto& [k, v] : sd)
    if (k == name) return v;
  throw std::runtime_error("no key " + name);
}

// Expects `fn` to throw std::runtime_error whose message contains every one of `parts`.
template <typename Fn>
void expect_error(Fn fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "expected std::runtime_error";
  } catch (const std::runtime_error& e) {
    std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  }
}

// A tiny module: fc (Linear 3->2) + a buffer + a child BatchNorm.
struct TinyImpl : torch::nn::Module {
  TinyImpl() {
    fc = register_module("fc", torch::nn::Linear(3, 2));
    scale = register_buffer("scale", torch::ones({2}));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(2));
  }
  torch::nn::Linear fc{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr};
  at::Tensor scale;
};
TORCH_MODULE(Tiny);

}  // namespace

TEST(StateDict, StateDictOfUsesTorchvisionOrderAndNames) {
  Tiny m;
  StateDict sd = keel::models::state_dict_of(*m);
  std::vector<std::string> names;
  for (const auto& [k, v] : sd) names.push_back(k);
  // Python orders a module's own parameters, then its own buffers, then its children.
  std::vector<std::string> python_order = {"scale", "fc.weight", "fc.bias", "bn1.weight", "bn1.bias",
                                           "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"};
  EXPECT_EQ(names, python_order);
  for (const auto& [k, v] : sd) EXPECT_FALSE(v.requires_grad()) << k;
}

TEST(StateDict, WriteThenReadRoundTrips) {
  TempDir dir("roundtrip");
  at::Tensor base = torch::arange(12, torch::kFloat).reshape({3, 4});
  StateDict sd = {{"f32", torch::randn({2, 3})},
                  {"f64", torch::randn({4}, torch::kDouble)},
                  {"f16", torch::randn({5}).to(torch::kHalf)},
                  {"i64", torch::tensor({7, -3}, torch::kLong)},
                  {"i32", torch::tensor({1, 2, 3}, torch::kInt)},
                  {"u8", torch::tensor({0, 255}, torch::kByte)},
                  {"b", torch::tensor({true, false})},
                  {"scalar", torch::tensor(3.5)},
                  {"view_t", base.t()},
                  {"view_slice", base.select(1, 2)}};
  const std::string path = dir / "sd.pt";
  keel::models::write_state_dict(sd, path);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  StateDict back = keel::models::read_state_dict(path);
  ASSERT_EQ(back.size(), sd.size());
  for (size_t i = 0; i < sd.size(); ++i) {
    EXPECT_EQ(back[i].first, sd[i].first);
    EXPECT_EQ(back[i].second.scalar_type(), sd[i].second.scalar_type()) << sd[i].first;
    EXPECT_EQ(back[i].second.sizes(), sd[i].second.sizes()) << sd[i].first;
    EXPECT_TRUE(torch::equal(back[i].second, sd[i].second)) << sd[i].first;
  }
}

TEST(StateDict, WrittenFileLoadsInPythonWithSameValues) {
  TempDir dir("to_python");
  StateDict sd = {{"layer.weight", torch::arange(6, torch::kFloat).reshape({2, 3}) / 4},
                  {"bn.num_batches_tracked", torch::tensor(42, torch::kLong)},
                  {"half", torch::tensor({0.5, -2.0}).to(torch::kHalf)},
                  {"transposed", torch::arange(6, torch::kDouble).reshape({2, 3}).t()}};
  const std::string path = dir / "for_python.pt";
  keel::models::write_state_dict(sd, path);
  const std::string code = R"PY(
import sys, torch
sd = torch.load(sys.argv[1])
assert list(sd.keys()) == ['layer.weight', 'bn.num_batches_tracked', 'half', 'transposed'], list(sd.keys())
assert torch.equal(sd['layer.weight'], torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4)
assert sd['bn.num_batches_tracked'].dtype == torch.int64 and sd['bn.num_batches_tracked'].item() == 42
assert torch.equal(sd['half'], torch.tensor([0.5, -2.0], dtype=torch.float16))
assert torch.equal(sd['transposed'], torch.arange(6, dtype=torch.float64).reshape(2, 3).t())
m = torch.nn.Linear(3, 2)
m.load_state_dict({'weight': sd['layer.weight'], 'bias': torch.zeros(2)})
print('python torch.load ok')
)PY";
  EXPECT_EQ(run_python(dir, code, path), 0) << "/usr/bin/python3 could not load " << path;
}

TEST(StateDict, ReadsPythonFileWithSharedStorageAndOrderedDict) {
  TempDir dir("from_python");
  const std::string code = R"PY(
import sys, torch
x = torch.arange(10.)
torch.save({'a': x[2:5], 'b': x.view(2, 5).t(), 'h': torch.tensor([1.5, -2.], dtype=torch.half),
            'p': torch.nn.Parameter(torch.full((2,), 3.)), 'n': torch.tensor(5),
            'bf': torch.tensor([1.25], dtype=torch.bfloat16), 'empty': torch.zeros(0, 3)}, sys.argv[1] + '/shared.pt')
m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
torch.save(m.state_dict(), sys.argv[1] + '/ordered.pt')
)PY";
  ASSERT_EQ(run_python(dir, code, dir.path.string()), 0) << "/usr/bin/python3 failed to write the fixtures";

  StateDict sd = keel::models::read_state_dict(dir / "shared.pt");
  std::vector<std::string> names;
  for (const auto& [k, v] : sd) names.push_back(k);
  EXPECT_EQ(names, (std::vector<std::string>{"a", "b", "h", "p", "n", "bf", "empty"}));
  at::Tensor x = torch::arange(10, torch::kFloat);
  EXPECT_TRUE(torch::equal(find(sd, "a"), x.slice(0, 2, 5)));
  EXPECT_TRUE(torch::equal(find(sd, "b"), x.view({2, 5}).t()));
  // One storage, read once: writing through one view shows in the other.
  EXPECT_TRUE(find(sd, "a").is_alias_of(find(sd, "b")));
  find(sd, "a")[0].fill_(100.f);
  EXPECT_EQ(find(sd, "b")[2][0].item<float>(), 100.f);
  EXPECT_EQ(find(sd, "h").scalar_type(), torch::kHalf);
  EXPECT_TRUE(torch::equal(find(sd, "h"), torch::tensor({1.5, -2.0}).to(torch::kHalf)));
  EXPECT_TRUE(torch::equal(find(sd, "p"), torch::full({2}, 3.f)));
  EXPECT_EQ(find(sd, "n").scalar_type(), torch::kLong);
  EXPECT_EQ(find(sd, "n").dim(), 0);
  EXPECT_EQ(find(sd, "n").item<int64_t>(), 5);
  EXPECT_EQ(find(sd, "bf").scalar_type(), torch::kBFloat16);
  EXPECT_EQ(find(sd, "bf").item<float>(), 1.25f);
  EXPECT_EQ(find(sd, "empty").sizes(), (std::vector<int64_t>{0, 3}));

  StateDict od = keel::models::read_state_dict(dir / "ordered.pt");
  names.clear();
  for (const auto& [k, v] : od) names.push_back(k);
  EXPECT_EQ(names, (std::vector<std::string>{"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                                             "1.running_var", "1.num_batches_tracked"}));
  EXPECT_EQ(find(od, "0.weight").sizes(), (std::vector<int64_t>{2, 1, 1, 1}));
  EXPECT_TRUE(torch::equal(find(od, "1.running_var"), torch::ones({2})));
}

TEST(StateDict, LoadStateDictListsEveryProblemAndLeavesModuleUnchanged) {
  Tiny m;
  StateDict sd = keel::models::state_dict_of(*m);
  at::Tensor before = m->fc->weight.detach().clone();
  StateDict bad;
  for (auto& [k, v] : sd) {
    if (k == "fc.bias" || k == "bn1.running_var") continue;                 // missing
    if (k == "fc.weight") bad.emplace_back(k, torch::zeros({4, 3}));        // shape mismatch
    else if (k == "scale") bad.emplace_back(k, torch::zeros({2, 1}));       // shape mismatch
    else bad.emplace_back(k, torch::zeros_like(v));
  }
  bad.emplace_back("fc.extra", torch::zeros({1}));  // unexpected
  bad.emplace_back("bn2.weight", torch::zeros({1}));  // unexpected
  expect_error([&] { keel::models::load_state_dict(*m, bad); },
               {"missing", "fc.bias", "bn1.running_var", "unexpected", "fc.extra", "bn2.weight",
                "fc.weight: expected [2, 3], got [4, 3]", "scale: expected [2], got [2, 1]"});
  EXPECT_TRUE(torch::equal(m->fc->weight.detach(), before));
}

TEST(StateDict, LoadStateDictCopiesByNameAndConvertsDtype) {
  Tiny src, dst;
  StateDict sd = keel::models::state_dict_of(*src);
  // Shuffle order and change dtype: loading goes by name and converts to the parameter's dtype.
  std::reverse(sd.begin(), sd.end());
  for (auto& [k, v] : sd)
    if (v.is_floating_point()) v = (v + 0.25).to(torch::kDouble);
  keel::models::load_state_dict(*dst, sd);
  EXPECT_EQ(dst->fc->weight.scalar_type(), torch::kFloat);
  EXPECT_TRUE(dst->fc->weight.requires_grad());
  EXPECT_TRUE(torch::allclose(dst->fc->weight, src->fc->weight + 0.25));
  EXPECT_TRUE(torch::allclose(dst->bn1->running_var, torch::full({2}, 1.25f)));
}

TEST(StateDict, BadFilesThrowNamingThePath) {
  TempDir dir("bad");
  const std::string missing = dir / "does_not_exist.pt";
  expect_error([&] { keel::models::read_state_dict(missing); }, {missing});

  const std::string garbage = dir / "garbage.pt";
  std::ofstream(garbage) << "this is not a zip archive, just some text that goes on for a while.....";
  expect_error([&] { keel::models::read_state_dict(garbage); }, {garbage, "zip"});

  const std::string empty = dir / "empty.pt";
  std::ofstream{empty};
  expect_error([&] { keel::models::read_state_dict(empty); }, {empty});

  const std::string good = dir / "good.pt";
  keel::models::write_state_dict({{"w", torch::randn({64, 64})}}, good);
  std::ifstream in(good, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (size_t keep : {bytes.size() / 2, bytes.size() - 30, size_t{100}}) {
    const std::string truncated = dir / ("truncated_" + std::to_string(keep) + ".pt");
    std::ofstream(truncated, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(keep));
    expect_error([&] { keel::models::read_state_dict(truncated); }, {truncated});
  }
}

using namespace std::string_literals;

namespace {

// A torch.save-style zip holding `pickle` as data.pkl, "little" as byteorder and one storage data/0
// of `storage_bytes` bytes: damaged pickle programs without Python.
std::string zip_with_pickle(const std::string& pickle, size_t storage_bytes = 64) {
  std::string out;
  caffe2::serialize::PyTorchStreamWriter writer([&out](const void* p, size_t n) {
    out.append(static_cast<const char*>(p), n);
    return n;
  });
  writer.writeRecord("data.pkl", pickle.data(), pickle.size());
  writer.writeRecord("byteorder", "little", 6);
  const std::string storage(storage_bytes, '\x01');
  writer.writeRecord("data/0", storage.data(), storage.size());
  writer.writeEndOfFile();
  return out;
}

std::string bin_unicode(const std::string& s) {  // pickle BINUNICODE
  std::string out = "X";
  for (int k = 0; k < 4; ++k) out += static_cast<char>((s.size() >> (8 * k)) & 0xff);
  return out + s;
}

std::string long1(int64_t v) {  // pickle LONG1 of 8 bytes
  std::string out = "\x8a\x08"s;
  for (int k = 0; k < 8; ++k) out += static_cast<char>((static_cast<uint64_t>(v) >> (8 * k)) & 0xff);
  return out;
}

// {'w': _rebuild_tensor_v2(<FloatStorage '0' of numel>, 0, (size,), (stride,), False, {})}
std::string one_tensor_pickle(int64_t numel, int64_t size, int64_t stride) {
  return std::string("\x80\x02}") + bin_unicode("w") + "ctorch._utils\n_rebuild_tensor_v2\n((" +
         bin_unicode("storage") + "ctorch\nFloatStorage\n" + bin_unicode("0") + bin_unicode("cpu") + long1(numel) +
         "tQK\x00"s + long1(size) + "\x85" + long1(stride) + "\x85\x89}tRs.";
}

}  // namespace

// Found by fuzz_checkpoint's review (fuzz/README.md): damaged files that the reader must refuse with a
// std::runtime_error naming the file, without reading out of bounds, overflowing or leaking.
TEST(StateDict, DamagedPicklesAreRefusedSafely) {
  TempDir dir("damaged");
  auto read = [&](const std::string& name, const std::string& zip) {
    const std::string path = dir / name;
    std::ofstream(path, std::ios::binary).write(zip.data(), static_cast<std::streamsize>(zip.size()));
    return keel::models::read_state_dict(path);
  };
  // The well-formed program reads (16 floats in a 64-byte storage).
  auto sd = read("ok.pt", zip_with_pickle(one_tensor_pickle(16, 4, 2)));
  ASSERT_EQ(sd.size(), 1u);
  EXPECT_EQ(sd[0].second.sizes(), at::IntArrayRef({4}));
  // A list that contains itself (memo + APPEND): was a shared_ptr cycle, leaked on the error.
  expect_error([&] { read("cycle.pt", zip_with_pickle("\x80\x02]q\x00h\x00" "a."s)); },  // "\x00a" would be one hex escape
               {dir / "cycle.pt", "list", "expected a dict"});
  // numel * element size beyond 64 bits: the size check wrapped around and allocated 2^62 floats.
  expect_error([&] { read("numel.pt", zip_with_pickle(one_tensor_pickle(int64_t{1} << 62, 1, 1))); },
               {dir / "numel.pt", "data/0", "has 64 bytes"});
  // (size - 1) * stride beyond int64: the bound check overflowed (undefined) and let a view reach past
  // its storage.
  expect_error([&] { read("view.pt", zip_with_pickle(one_tensor_pickle(16, 3, int64_t{1} << 62))); },
               {dir / "view.pt", "beyond int64"});
  // A record failing its CRC-32: LibTorch's c10::Error escaped instead of a std::runtime_error.
  std::string zip = zip_with_pickle(one_tensor_pickle(16, 4, 2));
  const size_t at = zip.find("little");
  ASSERT_NE(at, std::string::npos);
  zip[at] = 'b';
  expect_error([&] { read("crc.pt", zip); }, {dir / "crc.pt"});
  // The in-memory reader (the fuzz target's) behaves as the file reader.
  EXPECT_THROW(keel::models::read_state_dict_bytes(zip, "crc bytes"), std::runtime_error);
  EXPECT_EQ(keel::models::read_state_dict_bytes(zip_with_pickle(one_tensor_pickle(16, 4, 2)), "ok").size(), 1u);
}

TEST(StateDict, UnsupportedContentIsNamed) {
  TempDir dir("content");
  const std::string code = R"PY(
import sys, torch
d = sys.argv[1]
torch.save({'w': torch.ones(1), 'lr': 0.1}, d + '/float_value.pt')
torch.save({'w': torch.ones(1), 's': {1, 2}}, d + '/set_p4.pt', pickle_protocol=4)
torch.save({'w': torch.ones(1), 's': {1, 2}}, d + '/set_p2.pt')
torch.save([torch.ones(1)], d + '/list.pt')
import zipfile
def rewrite(dst, edit):  # copies a valid file's records, edited by edit(name, bytes) -> bytes or None (drop)
    src = zipfile.ZipFile(d + '/float_value.pt')
    with zipfile.ZipFile(d + '/' + dst, 'w') as out:
        for n in src.namelist():
            b = edit(n, src.read(n))
            if b is not None: out.writestr(n, b)
rewrite('short_pkl.pt', lambda n, b: b[:len(b) // 2] if n.endswith('data.pkl') else b)
rewrite('no_storage.pt', lambda n, b: None if n.endswith('data/0') else b)
)PY";
  ASSERT_EQ(run_python(dir, code, dir.path.string()), 0) << "/usr/bin/python3 failed to write the fixtures";
  expect_error([&] { keel::models::read_state_dict(dir / "float_value.pt"); },
               {dir / "float_value.pt", "'lr'", "float", "expected a tensor"});
  expect_error([&] { keel::models::read_state_dict(dir / "set_p4.pt"); },
               {dir / "set_p4.pt", "unsupported pickle opcode 0x93", "offset"});
  expect_error([&] { keel::models::read_state_dict(dir / "set_p2.pt"); },
               {dir / "set_p2.pt", "unsupported global '__builtin__.set'"});
  expect_error([&] { keel::models::read_state_dict(dir / "short_pkl.pt"); },
               {dir / "short_pkl.pt", "data.pkl", "truncated"});
  expect_error([&] { keel::models::read_state_dict(dir / "no_storage.pt"); },
               {dir / "no_storage.pt", "missing record 'data/0'"});
  expect_error([&] { keel::models::read_state_dict(dir / "list.pt"); }, {dir / "list.pt", "list", "expected a dict"});
}

// torchvision ResNets (random weights, randomised BatchNorm) loaded into keel's: same logits.
class TorchvisionGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(TorchvisionGolden, LogitsMatchTorchvision) {
  const std::string name = GetParam();
  TempDir dir("golden_" + name);
  const std::string cmd = std::string("/usr/bin/python3 ") + KEEL_SOURCE_DIR + "/scripts/golden_torchvision.py " +
                          dir.path.string() + " " + name;
  int rc = std::system(cmd.c_str());
  ASSERT_EQ(rc, 0) << "golden script failed: " << cmd;

  StateDict weights = keel::models::read_state_dict(dir / (name + ".pt"));
  StateDict io = keel::models::read_state_dict(dir / (name + "_io.pt"));
  auto net = keel::models::create({name, 3, 1000});
  keel::models::load_state_dict(*net, weights);
  // The file's values arrived, BatchNorm buffers included.
  StateDict loaded = keel::models::state_dict_of(*net);
  ASSERT_EQ(loaded.size(), weights.size());
  for (const auto& [k, v] : weights) EXPECT_TRUE(torch::equal(find(loaded, k), v)) << k;
  EXPECT_EQ(find(loaded, "bn1.num_batches_tracked").item<int64_t>(), 7);

  net->eval();
  torch::NoGradGuard no_grad;
  at::Tensor logits = net->forward(find(io, "x"));
  const at::Tensor& expected = find(io, "logits");
  ASSERT_EQ(logits.sizes(), expected.sizes());
  double max_diff = (logits - expected).abs().max().item<double>();
  EXPECT_LT(max_diff, 1e-4) << name << ": max |keel - torchvision| logits, |logits| max "
                            << expected.abs().max().item<double>();
}

INSTANTIATE_TEST_SUITE_P(Resnets, TorchvisionGolden, ::testing::Values("resnet18", "resnet50"));

// write_state_dict writes through a fresh, uniquely named temporary file (O_EXCL): a symlink planted
// at the old fixed name `<path>.tmp` does not redirect the write, and the result is the owner's alone.
TEST(StateDict, WriteIgnoresAPlantedTmpSymlinkAndIsOwnerOnly) {
  TempDir dir("symlink");
  const std::string victim = dir / "victim.txt";
  std::ofstream(victim) << "precious";
  const std::string out = dir / "final.pt";
  fs::create_symlink(victim, out + ".tmp");
  StateDict sd = {{"w", torch::arange(6, torch::kFloat).reshape({2, 3})}};
  keel::models::write_state_dict(sd, out);
  std::ifstream in(victim);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "precious") << "the write followed the planted symlink";
  EXPECT_FALSE(fs::is_symlink(out));
  EXPECT_TRUE(torch::equal(find(keel::models::read_state_dict(out), "w"), sd[0].second));
  EXPECT_EQ(static_cast<unsigned>(fs::status(out).permissions()) & 0777u, 0600u);
  for (const auto& e : fs::directory_iterator(dir.path)) {  // no temporary left behind
    const std::string name = e.path().filename().string();
    EXPECT_TRUE(name == "victim.txt" || name == "final.pt" || name == "final.pt.tmp") << name;
  }
}
