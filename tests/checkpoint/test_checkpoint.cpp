// Checkpoint store tests: round trip (weights, JSON, optimizer state and options, RNG), corruption
// detection, newest-valid lookup, pruning and compatibility messages.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <type_traits>

#include <torch/script.h>
#include <torch/torch.h>

#include "keel/compat/torch_compat.h"
#include "keel/checkpoint/checkpoint.h"

namespace fs = std::filesystem;
namespace ckpt = keel::checkpoint;
using keel::models::StateDict;
using nlohmann::json;
using ::testing::HasSubstr;
using ::testing::Not;

namespace {

// A fresh, empty directory for one test under $KEEL_TEST_TMP (or /tmp); removed afterwards.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("KEEL_TEST_TMP");
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = std::string(base && *base ? base : "/tmp") + "/keel-ckpt-" + info->name() + "-" +
            std::to_string(::getpid());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

// Bitwise equality of two state dicts (names, order, dtype, shape, bytes).
void expect_same(const StateDict& a, const StateDict& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].first, b[i].first);
    EXPECT_EQ(a[i].second.scalar_type(), b[i].second.scalar_type()) << a[i].first;
    ASSERT_EQ(a[i].second.sizes(), b[i].second.sizes()) << a[i].first;
    EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << a[i].first;
  }
}

// A minimal checkpoint of a Linear(4, 3) for the store tests that do not look at the optimizer.
ckpt::CheckpointContents small(int64_t step) {
  torch::manual_seed(step);
  torch::nn::Linear lin(4, 3);
  ckpt::CheckpointContents c;
  c.model = keel::models::state_dict_of(*lin);
  c.state = {{"step", step}};
  c.config_toml = "[model]\nname = \"linear\"\n";
  c.step = step;
  c.epoch = step / 10;
  c.model_name = "linear";
  return c;
}

// The SGD momentum buffer the optimizer holds for parameter p (state is keyed by TensorImpl address).
torch::Tensor momentum_of(torch::optim::SGD& opt, const torch::Tensor& p) {
  auto it = opt.state().find(keel::compat::optimizer_state_key(p));
  if (it == opt.state().end()) return {};
  return static_cast<torch::optim::SGDParamState&>(*it->second).momentum_buffer();
}

// One SGD step of `lin` on a fixed batch.
void train_step(torch::nn::Linear& lin, torch::optim::Optimizer& opt) {
  torch::manual_seed(7);
  auto x = torch::randn({8, 4});
  auto y = torch::randn({8, 3});
  opt.zero_grad();
  torch::mse_loss(lin(x), y).backward();
  opt.step();
}

}  // namespace

TEST(Checkpoint, DirNames) {
  EXPECT_EQ(ckpt::dir_name_for_step(1234), "step-00001234");
  EXPECT_EQ(ckpt::dir_name_for_step(123456789), "step-123456789");
  EXPECT_EQ(ckpt::step_of_dir_name("step-00001234"), 1234);
  EXPECT_EQ(ckpt::step_of_dir_name("/a/b/step-00000000"), 0);
  EXPECT_EQ(ckpt::step_of_dir_name("step-123456789"), 123456789);
  EXPECT_FALSE(ckpt::step_of_dir_name("step-00001234.tmp"));
  EXPECT_FALSE(ckpt::step_of_dir_name("step-1234"));
  EXPECT_FALSE(ckpt::step_of_dir_name("step-012345678"));  // not canonical
  EXPECT_FALSE(ckpt::step_of_dir_name("step-0000x234"));
}

TEST(Checkpoint, Base64) {
  EXPECT_EQ(ckpt::base64_encode("foobar"), "Zm9vYmFy");
  EXPECT_EQ(ckpt::base64_encode("fooba"), "Zm9vYmE=");
  EXPECT_EQ(ckpt::base64_encode("foob"), "Zm9vYg==");
  std::string all;
  for (int i = 0; i < 256; ++i) all += static_cast<char>(i);
  for (size_t n = 0; n <= all.size(); n += 37) {
    EXPECT_EQ(ckpt::base64_decode(ckpt::base64_encode(all.substr(0, n))), all.substr(0, n));
  }
  EXPECT_THROW(ckpt::base64_decode("abc"), std::runtime_error);
  EXPECT_THROW(ckpt::base64_decode("ab!d"), std::runtime_error);
}

TEST(Checkpoint, RoundTripWithOptimizer) {
  TempDir tmp;
  torch::manual_seed(1);
  torch::nn::Linear lin(4, 3);
  torch::optim::SGD opt(lin->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9).nesterov(true).weight_decay(1e-4));
  train_step(lin, opt);

  ckpt::CheckpointContents c;
  c.model = keel::models::state_dict_of(*lin);
  c.extra["ema"] = {{"weight", torch::arange(12, torch::kFloat64).reshape({3, 4})},
                    {"count", torch::tensor(int64_t{5})}};
  c.state = {{"step", 1}, {"scaler", {{"scale", 65536.0}, {"growth_tracker", 3}}}, {"losses", {0.5, 0.25}}};
  c.state["rng"] = ckpt::rng_state_json();
  ckpt::capture_optimizer(c, opt);
  c.config_toml = "[model]\nname = \"linear\"\nnum_classes = 3\n";
  c.step = 1;
  c.epoch = 0;
  c.model_name = "linear";
  const std::string dir = ckpt::save(tmp.path() + "/checkpoints", c);
  EXPECT_EQ(dir, tmp.path() + "/checkpoints/step-00000001");
  EXPECT_FALSE(fs::exists(dir + ".tmp"));
  for (const char* f : {"model.pt", "optimizer.pt", "ema.pt", "state.json", "config.toml", "manifest.json"}) {
    EXPECT_TRUE(fs::is_regular_file(dir + "/" + f)) << f;
  }
  auto v = ckpt::verify(dir);
  EXPECT_TRUE(v.ok) << v.problem;

  ckpt::CheckpointContents back = ckpt::load(dir);
  expect_same(back.model, c.model);
  ASSERT_EQ(back.extra.size(), 1u);
  expect_same(back.extra.at("ema"), c.extra.at("ema"));
  EXPECT_EQ(back.state, c.state);
  EXPECT_EQ(back.config_toml, c.config_toml);
  ASSERT_TRUE(back.optimizer && c.optimizer);
  expect_same(*back.optimizer, *c.optimizer);
  EXPECT_EQ(back.step, 1);
  EXPECT_EQ(back.epoch, 0);
  EXPECT_EQ(back.model_name, "linear");
  EXPECT_EQ(ckpt::compatibility_problem(back, "linear", keel::models::state_dict_of(*lin), c.config_toml), "");

  // A fresh model + optimizer (different options) restored from the checkpoint.
  torch::manual_seed(99);
  torch::nn::Linear lin2(4, 3);
  torch::optim::SGD opt2(lin2->parameters(), torch::optim::SGDOptions(0.5));
  keel::models::load_state_dict(*lin2, back.model);
  ckpt::restore_optimizer(back, opt2);
  auto& o2 = static_cast<torch::optim::SGDOptions&>(opt2.param_groups()[0].options());
  EXPECT_EQ(o2.lr(), 0.1);
  EXPECT_EQ(o2.momentum(), 0.9);
  EXPECT_TRUE(o2.nesterov());
  EXPECT_EQ(o2.weight_decay(), 1e-4);
  auto p1 = lin->parameters(), p2 = lin2->parameters();
  ASSERT_EQ(p1.size(), p2.size());
  for (size_t i = 0; i < p1.size(); ++i) {
    auto m1 = momentum_of(opt, p1[i]), m2 = momentum_of(opt2, p2[i]);
    ASSERT_TRUE(m1.defined() && m2.defined()) << "param " << i;
    EXPECT_TRUE(torch::equal(m1, m2)) << "param " << i;
  }
  // Continuing both gives bitwise the same weights: the checkpoint held everything SGD needs.
  train_step(lin, opt);
  train_step(lin2, opt2);
  expect_same(keel::models::state_dict_of(*lin2), keel::models::state_dict_of(*lin));
}

TEST(Checkpoint, RngRoundTrip) {
  torch::manual_seed(3);
  json state = ckpt::rng_state_json();
  ASSERT_TRUE(state["cpu"].is_string());
  auto a = torch::rand({16});
  torch::manual_seed(12345);
  auto notes = ckpt::restore_rng_state(state);
  auto b = torch::rand({16});
  EXPECT_TRUE(torch::equal(a, b));
  if (!torch::cuda::is_available()) {
    EXPECT_TRUE(state["cuda"].empty());
    EXPECT_TRUE(notes.empty());
    // States saved on a CUDA machine are skipped here with a note, the CPU state still restored.
    state["cuda"] = json::array({"AAAA"});
    notes = ckpt::restore_rng_state(state);
    ASSERT_EQ(notes.size(), 1u);
    EXPECT_THAT(notes[0], HasSubstr("CUDA RNG state of device 0 not restored"));
  }
  EXPECT_THROW(ckpt::restore_rng_state(json{{"cpu", "AAAA"}}), std::runtime_error);  // wrong size
  EXPECT_THROW(ckpt::restore_rng_state(json::object()), std::runtime_error);
}

TEST(Checkpoint, ParamGroupOptionsSgd) {
  auto a = torch::zeros({2}, torch::requires_grad()), b = torch::zeros({3}, torch::requires_grad());
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{a},
                      std::make_unique<torch::optim::SGDOptions>(torch::optim::SGDOptions(0.123).momentum(0.8).dampening(0.1).weight_decay(0.01).nesterov(false)));
  groups.emplace_back(std::vector<torch::Tensor>{b},
                      std::make_unique<torch::optim::SGDOptions>(torch::optim::SGDOptions(0.0456).momentum(0.9).nesterov(true)));
  torch::optim::SGD opt(groups, torch::optim::SGDOptions(1.0));
  json saved = ckpt::param_group_options(opt);
  ASSERT_EQ(saved.size(), 2u);

  torch::optim::SGD fresh({torch::optim::OptimizerParamGroup({a}), torch::optim::OptimizerParamGroup({b})},
                          torch::optim::SGDOptions(1.0));
  ckpt::restore_param_group_options(fresh, saved);
  for (size_t i = 0; i < 2; ++i) {
    auto& want = static_cast<torch::optim::SGDOptions&>(opt.param_groups()[i].options());
    auto& got = static_cast<torch::optim::SGDOptions&>(fresh.param_groups()[i].options());
    EXPECT_EQ(got.lr(), want.lr());
    EXPECT_EQ(got.momentum(), want.momentum());
    EXPECT_EQ(got.dampening(), want.dampening());
    EXPECT_EQ(got.weight_decay(), want.weight_decay());
    EXPECT_EQ(got.nesterov(), want.nesterov());
  }
  EXPECT_EQ(ckpt::param_group_options(fresh), saved);

  // Wrong group count and wrong optimizer type are refused with what was found.
  torch::optim::SGD one(std::vector<torch::Tensor>{a, b}, torch::optim::SGDOptions(1.0));
  try {
    ckpt::restore_param_group_options(one, saved);
    FAIL() << "expected a group-count error";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("checkpoint has 2 groups, the optimizer has 1"));
  }
  torch::optim::AdamW adamw({torch::optim::OptimizerParamGroup({a}), torch::optim::OptimizerParamGroup({b})});
  try {
    ckpt::restore_param_group_options(adamw, saved);
    FAIL() << "expected a type error";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("checkpoint options are of type 'sgd', the optimizer's are 'adamw'"));
  }
}

TEST(Checkpoint, ParamGroupOptionsAdamW) {
  auto a = torch::zeros({2}, torch::requires_grad()), b = torch::zeros({3}, torch::requires_grad());
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{a},
                      std::make_unique<torch::optim::AdamWOptions>(
                          torch::optim::AdamWOptions(3e-4).betas({0.85, 0.95}).eps(1e-7).weight_decay(0.05).amsgrad(true)));
  groups.emplace_back(std::vector<torch::Tensor>{b},
                      std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(1e-3).weight_decay(0.0)));
  torch::optim::AdamW opt(groups);
  json saved = ckpt::param_group_options(opt);
  torch::optim::AdamW fresh({torch::optim::OptimizerParamGroup({a}), torch::optim::OptimizerParamGroup({b})});
  ckpt::restore_param_group_options(fresh, saved);
  for (size_t i = 0; i < 2; ++i) {
    auto& want = static_cast<torch::optim::AdamWOptions&>(opt.param_groups()[i].options());
    auto& got = static_cast<torch::optim::AdamWOptions&>(fresh.param_groups()[i].options());
    EXPECT_EQ(got.lr(), want.lr());
    EXPECT_EQ(got.betas(), want.betas());
    EXPECT_EQ(got.eps(), want.eps());
    EXPECT_EQ(got.weight_decay(), want.weight_decay());
    EXPECT_EQ(got.amsgrad(), want.amsgrad());
  }
  EXPECT_EQ(ckpt::param_group_options(fresh), saved);
}

TEST(Checkpoint, AdamWStateRoundTrip) {
  torch::manual_seed(1);
  torch::nn::Linear lin(4, 3);
  torch::optim::AdamW opt(lin->parameters(), torch::optim::AdamWOptions(1e-2));
  train_step(lin, opt);
  const StateDict state = ckpt::optimizer_state(opt);
  torch::nn::Linear lin2(4, 3);
  keel::models::load_state_dict(*lin2, keel::models::state_dict_of(*lin));
  torch::optim::AdamW opt2(lin2->parameters(), torch::optim::AdamWOptions(1e-2));
  ckpt::load_optimizer_state(opt2, state, "optimizer.pt");
  train_step(lin, opt);
  train_step(lin2, opt2);
  expect_same(keel::models::state_dict_of(*lin2), keel::models::state_dict_of(*lin));
  // State of a different parameter layout is refused.
  torch::nn::Linear other(torch::nn::LinearOptions(4, 3).bias(false));
  torch::optim::AdamW opt3(other->parameters());
  try {
    ckpt::load_optimizer_state(opt3, state, "optimizer.pt");
    ADD_FAILURE() << "expected a layout error";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("optimizer.pt: the checkpoint's optimizer has 1 param groups of [2] parameters, "
                                    "this optimizer 1 param groups of [1] parameters"));
  }
}

// verify() and load() report truncation, a flipped byte, a missing manifest and an unknown version.
TEST(Checkpoint, VerifyDetectsCorruption) {
  TempDir tmp;
  const std::string root = tmp.path() + "/checkpoints";

  std::string dir = ckpt::save(root, small(10));
  fs::resize_file(dir + "/model.pt", fs::file_size(dir + "/model.pt") - 10);
  auto v = ckpt::verify(dir);
  EXPECT_FALSE(v.ok);
  EXPECT_THAT(v.problem, HasSubstr("model.pt: size"));
  EXPECT_THAT(v.problem, HasSubstr("truncated"));
  try {
    ckpt::load(dir);
    FAIL() << "load of a truncated checkpoint must throw";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("model.pt"));
  }

  dir = ckpt::save(root, small(20));
  std::string bytes = read_bytes(dir + "/model.pt");
  bytes[bytes.size() / 2] ^= 0x01;
  write_bytes(dir + "/model.pt", bytes);
  v = ckpt::verify(dir);
  EXPECT_FALSE(v.ok);
  EXPECT_THAT(v.problem, HasSubstr("model.pt: crc32"));
  EXPECT_THAT(v.problem, HasSubstr("corrupted"));

  dir = ckpt::save(root, small(30));
  fs::remove(dir + "/manifest.json");
  v = ckpt::verify(dir);
  EXPECT_FALSE(v.ok);
  EXPECT_THAT(v.problem, HasSubstr("manifest.json: missing"));

  dir = ckpt::save(root, small(40));
  json m = json::parse(read_bytes(dir + "/manifest.json"));
  m["format_version"] = 2;
  write_bytes(dir + "/manifest.json", m.dump());
  v = ckpt::verify(dir);
  EXPECT_FALSE(v.ok);
  EXPECT_THAT(v.problem, HasSubstr("format_version 2 is not supported (expected 1)"));

  dir = ckpt::save(root, small(50));
  fs::remove(dir + "/state.json");
  v = ckpt::verify(dir);
  EXPECT_FALSE(v.ok);
  EXPECT_THAT(v.problem, HasSubstr("state.json: missing"));

  dir = ckpt::save(root, small(60));
  write_bytes(dir + "/manifest.json", "{\"format_version\": 1, \"files\": ");
  v = ckpt::verify(dir);
  EXPECT_FALSE(v.ok);
  EXPECT_THAT(v.problem, HasSubstr("not valid JSON"));

  dir = ckpt::save(root, small(70));
  m = json::parse(read_bytes(dir + "/manifest.json"));
  m["files"]["../escape.pt"] = {{"size", 0}, {"crc32", "00000000"}};
  write_bytes(dir + "/manifest.json", m.dump());
  v = ckpt::verify(dir);
  EXPECT_FALSE(v.ok);
  EXPECT_THAT(v.problem, HasSubstr("not a plain file name"));
}

TEST(Checkpoint, FindLatestValidSkipsCorruptAndTmp) {
  TempDir tmp;
  const std::string root = tmp.path() + "/checkpoints";
  std::vector<std::string> skipped;
  EXPECT_FALSE(ckpt::find_latest_valid(root, &skipped));  // no directory yet
  EXPECT_TRUE(skipped.empty());

  ckpt::save(root, small(100));
  const std::string d200 = ckpt::save(root, small(200));
  const std::string d300 = ckpt::save(root, small(300));
  fs::resize_file(d300 + "/model.pt", 5);
  // A killed write: a newer .tmp directory, complete but never renamed.
  ckpt::save(root + "/scratch", small(400));
  fs::rename(root + "/scratch/step-00000400", root + "/step-00000400.tmp");

  auto latest = ckpt::find_latest_valid(root, &skipped);
  ASSERT_TRUE(latest);
  EXPECT_EQ(*latest, d200);
  ASSERT_EQ(skipped.size(), 1u);
  EXPECT_THAT(skipped[0], HasSubstr("step-00000300"));
  EXPECT_THAT(skipped[0], HasSubstr("model.pt: size 5 bytes"));
}

TEST(Checkpoint, SaveReplacesSameStepAndCleansStaleTmp) {
  TempDir tmp;
  const std::string root = tmp.path() + "/checkpoints";
  std::string dir = ckpt::save(root, small(5));
  fs::resize_file(dir + "/model.pt", 5);
  fs::create_directories(root + "/step-00000005.tmp");
  write_bytes(root + "/step-00000005.tmp/junk", "x");
  auto c = small(5);
  c.state["second"] = true;
  EXPECT_EQ(ckpt::save(root, c), dir);
  EXPECT_TRUE(ckpt::verify(dir).ok);
  EXPECT_EQ(ckpt::load(dir).state, c.state);
  EXPECT_FALSE(fs::exists(dir + ".tmp"));
  EXPECT_FALSE(fs::exists(dir + ".old"));

  c.extra["bad/name"] = {};
  EXPECT_THROW(ckpt::save(root, c), std::runtime_error);
}

TEST(Checkpoint, PruneKeepsLastAndKeptSet) {
  TempDir tmp;
  const std::string root = tmp.path() + "/checkpoints";
  for (int64_t s = 1; s <= 6; ++s) ckpt::save(root, small(s));
  fs::create_directories(root + "/step-00000003.tmp");  // leftover of a killed write: removed
  fs::create_directories(root + "/step-00000009.tmp");  // newer than every checkpoint: left alone
  auto removed = ckpt::prune(root, 2, {"step-00000002"});
  EXPECT_EQ(removed.size(), 4u);  // steps 1, 3, 4 and the step-3 .tmp
  std::set<std::string> left;
  for (const auto& e : fs::directory_iterator(root)) left.insert(e.path().filename().string());
  EXPECT_EQ(left, (std::set<std::string>{"step-00000002", "step-00000005", "step-00000006", "step-00000009.tmp"}));
}

TEST(Checkpoint, PruneNeverRemovesNewestValid) {
  TempDir tmp;
  const std::string root = tmp.path() + "/checkpoints";
  for (int64_t s = 1; s <= 4; ++s) ckpt::save(root, small(s));
  fs::remove(root + "/step-00000004/manifest.json");
  fs::resize_file(root + "/step-00000003/state.json", 1);
  ckpt::prune(root, 1);
  std::set<std::string> left;
  for (const auto& e : fs::directory_iterator(root)) left.insert(e.path().filename().string());
  EXPECT_EQ(left, (std::set<std::string>{"step-00000002", "step-00000004"}));
  EXPECT_EQ(ckpt::find_latest_valid(root), root + "/step-00000002");
  // keep_last <= 0 keeps everything.
  EXPECT_TRUE(ckpt::prune(root, 0).empty());
}

TEST(Checkpoint, CompatibilityNamesDifferences) {
  torch::manual_seed(0);
  torch::nn::Linear three(4, 3), five(4, 5);
  auto c = small(1);
  c.model = keel::models::state_dict_of(*three);
  c.model_name = "resnet20";
  c.config_toml = "[model]\nname = \"resnet20\"\nin_channels = 1\nnum_classes = 3\n[optim]\nname = \"sgd\"\n";
  EXPECT_EQ(ckpt::compatibility_problem(c, "resnet20", keel::models::state_dict_of(*three), c.config_toml), "");

  const std::string current = "[model]\nname = \"resnet32\"\nin_channels = 1\nnum_classes = 5\n[optim]\nname = \"sgd\"\n";
  std::string msg = ckpt::compatibility_problem(c, "resnet32", keel::models::state_dict_of(*five), current);
  EXPECT_THAT(msg, HasSubstr("model name: checkpoint 'resnet20', current 'resnet32'"));
  EXPECT_THAT(msg, HasSubstr("model.num_classes: checkpoint 3, current 5"));
  EXPECT_THAT(msg, HasSubstr("weight checkpoint [3, 4], current [5, 4]"));
  EXPECT_THAT(msg, HasSubstr("bias checkpoint [3], current [5]"));
  EXPECT_THAT(msg, Not(HasSubstr("in_channels")));

  torch::nn::Linear nobias(torch::nn::LinearOptions(4, 3).bias(false));
  msg = ckpt::compatibility_problem(c, "resnet20", keel::models::state_dict_of(*nobias));
  EXPECT_THAT(msg, HasSubstr("weights in the checkpoint but not in the model (1): bias"));
}

// ---- issue 20 items 6 and 7: what optimizer.pt is read with, file modes, temporary names, fsync
// errors and the window between the two renames of a re-saved step.

namespace {

// Rewrites the manifest entry of `name` in checkpoint `dir` to the file's current size and CRC-32, so
// that verify() passes and the file reaches its reader (a hostile checkpoint is self-consistent).
void reseal(const std::string& dir, const std::string& name) {
  json m = json::parse(read_bytes(dir + "/manifest.json"));
  char crc[9];
  std::snprintf(crc, sizeof crc, "%08x", ckpt::file_crc32(dir + "/" + name));
  m["files"][name] = {{"size", static_cast<uint64_t>(fs::file_size(dir + "/" + name))}, {"crc32", crc}};
  write_bytes(dir + "/manifest.json", m.dump(1));
}

// A checkpoint of one SGD step with momentum (so optimizer.pt holds momentum buffers).
ckpt::CheckpointContents with_sgd(int64_t step, torch::nn::Linear& lin, torch::optim::SGD& opt) {
  train_step(lin, opt);
  ckpt::CheckpointContents c = small(step);
  c.model = keel::models::state_dict_of(*lin);
  ckpt::capture_optimizer(c, opt);
  return c;
}

// Permission bits of a path.
unsigned mode_of(const std::string& path) {
  return static_cast<unsigned>(fs::status(path).permissions()) & 0777u;
}

}  // namespace

// fsync interposed for this test executable: with g_fail_dir_fsync set, fsync of a directory fails
// with EIO (a full or failing disk), so that the tests see whether the error is reported.
static bool g_fail_dir_fsync = false;
extern "C" int fsync(int fd) {
  struct stat st;
  if (g_fail_dir_fsync && ::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
    errno = EIO;
    return -1;
  }
  return static_cast<int>(::syscall(SYS_fsync, fd));
}

// optimizer.pt is a torch.save() dict of tensors that keel's own restricted reader reads (no
// TorchScript archive), and it holds every momentum buffer bit for bit.
TEST(Checkpoint, OptimizerFileIsAPlainStateDictForKeelsReader) {
  TempDir tmp;
  torch::manual_seed(1);
  torch::nn::Linear lin(4, 3);
  torch::optim::SGD opt(lin->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  const std::string dir = ckpt::save(tmp.path() + "/checkpoints", with_sgd(1, lin, opt));
  StateDict sd;
  ASSERT_NO_THROW(sd = keel::models::read_state_dict(dir + "/optimizer.pt"));
  size_t buffers = 0;
  auto params = lin->parameters();
  for (const auto& [name, t] : sd) {
    for (size_t i = 0; i < params.size(); ++i) {
      if (name == "state.0." + std::to_string(i) + ".momentum_buffer") {
        EXPECT_TRUE(torch::equal(t, momentum_of(opt, params[i]))) << name;
        ++buffers;
      }
    }
  }
  EXPECT_EQ(buffers, params.size());
}

// An optimizer.pt in LibTorch's TorchScript archive format (what keel wrote before) is refused with an
// error naming the file, and TorchScript code inside it (a __setstate__ that raises) never runs.
TEST(Checkpoint, TorchScriptOptimizerFileIsRefusedWithoutRunningIt) {
  TempDir tmp;
  torch::manual_seed(1);
  torch::nn::Linear lin(4, 3);
  torch::optim::SGD opt(lin->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  const std::string root = tmp.path() + "/checkpoints";

  // (a) a hostile archive: loading it with torch::jit::load runs its __setstate__.
  torch::jit::Module evil("Evil");
  evil.register_attribute("x", c10::IntType::get(), c10::IValue(int64_t{1}));
  evil.define(R"JIT(
def __getstate__(self) -> int:
    return self.x

def __setstate__(self, state: int) -> None:
    self.x = state
    assert state < 0, "code from the checkpoint ran"
)JIT");
  std::ostringstream evil_bytes(std::ios::binary);
  evil.save(evil_bytes);
  {
    // The input is live: LibTorch's loader (what keel used for optimizer.pt) runs its __setstate__.
    std::istringstream in(evil_bytes.str(), std::ios::binary);
    try {
      torch::jit::load(in);
      ADD_FAILURE() << "torch::jit::load was expected to run __setstate__ and raise";
    } catch (const std::exception& e) {  // torch::jit::JITException
      EXPECT_THAT(e.what(), HasSubstr("code from the checkpoint ran"));
    }
  }
  // (b) the old format proper: Optimizer::save into a torch::serialize::OutputArchive.
  torch::serialize::OutputArchive archive;
  opt.save(archive);
  std::ostringstream old_bytes(std::ios::binary);
  archive.save_to(old_bytes);

  int64_t step = 1;
  for (const std::string& bytes : {evil_bytes.str(), old_bytes.str()}) {
    const std::string dir = ckpt::save(root, with_sgd(step++, lin, opt));
    write_bytes(dir + "/optimizer.pt", bytes);
    reseal(dir, "optimizer.pt");
    ASSERT_TRUE(ckpt::verify(dir).ok) << ckpt::verify(dir).problem;
    torch::optim::SGD fresh(lin->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    try {
      ckpt::CheckpointContents back = ckpt::load(dir);
      ckpt::restore_optimizer(back, fresh);
      ADD_FAILURE() << "a TorchScript optimizer.pt must be refused";
    } catch (const std::runtime_error& e) {
      EXPECT_THAT(e.what(), HasSubstr(dir + "/optimizer.pt"));
      EXPECT_THAT(e.what(), HasSubstr("TorchScript"));
      EXPECT_THAT(e.what(), Not(HasSubstr("code from the checkpoint ran")));
    }
  }
}

// Every file of a checkpoint is the owner's alone (0600) and its directory 0700, whatever the umask.
TEST(Checkpoint, FilesAreOwnerOnlyByDefault) {
  TempDir tmp;
  const mode_t old_umask = ::umask(0);
  torch::manual_seed(1);
  torch::nn::Linear lin(4, 3);
  torch::optim::SGD opt(lin->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  auto c = with_sgd(3, lin, opt);
  c.extra["ema"] = c.model;
  const std::string dir = ckpt::save(tmp.path() + "/checkpoints", c);
  ::umask(old_umask);
  EXPECT_EQ(mode_of(dir), 0700u) << dir;
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    EXPECT_EQ(mode_of(e.path().string()), 0600u) << e.path();
    ++files;
  }
  EXPECT_EQ(files, 6u);  // model, optimizer, ema, state, config, manifest
}

// A failed fsync of the directory after write_state_dict's rename is an error naming the directory.
TEST(Checkpoint, DirectoryFsyncFailureIsReported) {
  TempDir tmp;
  const std::string path = tmp.path() + "/final.pt";
  g_fail_dir_fsync = true;
  try {
    keel::models::write_state_dict(small(1).model, path);
    ADD_FAILURE() << "a failed directory fsync must be reported";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr(tmp.path()));
    EXPECT_THAT(e.what(), HasSubstr("fsync"));
  }
  try {
    ckpt::save(tmp.path() + "/checkpoints", small(2));
    ADD_FAILURE() << "a failed directory fsync must be reported";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("fsync"));
  }
  g_fail_dir_fsync = false;
}

// A crash between the two renames of a re-saved step (the old copy moved aside to step-N.old, the new
// one complete in its temporary directory, not yet renamed) leaves step N findable and loadable, and
// pruning does not remove that only copy.
TEST(Checkpoint, CrashBetweenRenamesKeepsTheStep) {
  TempDir tmp;
  const std::string root = tmp.path() + "/checkpoints";
  ckpt::save(root, small(2));
  const std::string d5 = ckpt::save(root, small(5));
  // What a kill between the renames leaves (the same names as the store's own save).
  fs::rename(d5, d5 + ".old");
  ckpt::save(root + "/scratch", small(5));
  fs::rename(root + "/scratch/step-00000005", d5 + ".tmp");
  fs::remove_all(root + "/scratch");

  auto latest = ckpt::find_latest_valid(root);
  ASSERT_TRUE(latest) << "no checkpoint found";
  EXPECT_EQ(ckpt::load(*latest).step, 5);
  ckpt::prune(root, 1);
  latest = ckpt::find_latest_valid(root);
  ASSERT_TRUE(latest) << "pruning removed the only copy of step 5";
  EXPECT_EQ(ckpt::load(*latest).step, 5);
}

// save() of a step that already exists calls its hook between the two renames (the kill test's point);
// a crash there (the hook throws) still leaves a valid step, and the next save of it cleans up.
TEST(Checkpoint, ResaveHookBetweenRenamesAndRecovery) {
  TempDir tmp;
  const std::string root = tmp.path() + "/checkpoints";
  const std::string d5 = ckpt::save(root, small(5));
  bool between = false;
  try {
    ckpt::save(root, small(5), [&](const std::string& path) {
      if (path == d5 + ".old") {
        between = true;
        EXPECT_FALSE(fs::exists(d5));
        throw std::runtime_error("killed between the renames");
      }
    });
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("killed between the renames"));
  }
  ASSERT_TRUE(between) << "save() never called its hook between the two renames";
  auto latest = ckpt::find_latest_valid(root);
  ASSERT_TRUE(latest);
  EXPECT_EQ(ckpt::load(*latest).step, 5);
  auto c = small(5);
  c.state["again"] = true;
  EXPECT_EQ(ckpt::save(root, c), d5);
  ckpt::prune(root, 1);
  EXPECT_EQ(ckpt::find_latest_valid(root), d5);
  EXPECT_EQ(ckpt::load(d5).state, c.state);
  std::set<std::string> left;
  for (const auto& e : fs::directory_iterator(root)) left.insert(e.path().filename().string());
  EXPECT_EQ(left, (std::set<std::string>{"step-00000005"}));
}
