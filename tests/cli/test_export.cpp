// keel export: a trained resnet18's weights load into torchvision (strict) in /usr/bin/python3 and give
// keel's logits; the newest valid checkpoint is exported when there are no final weights; bad input is an
// error naming it.
#include <gtest/gtest.h>

#include "../test_util.h"
#include "cli_util.h"
#include <gmock/gmock.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "keel/checkpoint/checkpoint.h"
#include "keel/models/registry.h"
#include "keel/models/state_dict.h"

using testing::HasSubstr;
namespace fs = std::filesystem;

namespace {

// A resnet18 on 32x32 synthetic RGB images: 4 steps of batch 16, a checkpoint every 2 steps.
std::string resnet18_run(const std::string& dir, const std::string& name, const std::string& extra = "") {
  return "train configs/default.toml --set run.dir=" + dir + " --set run.name=" + name +
         " --set model.name=resnet18 --set model.in_channels=3 --set model.num_classes=10"
         " --set data.dataset=synthetic --set data.image_size=32 --set data.synthetic_samples=64"
         " --set data.mean=0.5 --set data.std=0.25 --set train.batch_size=16 --set train.eval_batch_size=16"
         " --set train.epochs=1 --set optim.lr=0.02 --set checkpoint.every_steps=2 " + extra;
}

using keel::test::last_line;

bool python_has_torchvision() {
  return std::system("/usr/bin/python3 -c 'import torch, torchvision' >/dev/null 2>&1") == 0;
}

void expect_same(const keel::models::StateDict& a, const keel::models::StateDict& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].first, b[i].first);
    EXPECT_TRUE(at::equal(a[i].second.contiguous(), b[i].second.contiguous())) << a[i].first;
  }
}

}  // namespace

TEST(Export, Resnet18LoadsIntoTorchvisionWithKeelLogits) {
  if (!python_has_torchvision()) {
    GTEST_SKIP() << "/usr/bin/python3 cannot import torch and torchvision (Debian: apt-get install "
                    "python3-torchvision); the round trip needs them";
  }
  const std::string dir = keel::test::fresh_dir("export-tv");
  auto t = keel::test::run_keel(resnet18_run(dir, "r18"));
  ASSERT_EQ(t.code, 0) << t.out;
  const std::string out = dir + "/r18.pt";
  auto e = keel::test::run_keel("export " + dir + "/r18 --format pt --output " + out + " --json");
  ASSERT_EQ(e.code, 0) << e.out;
  EXPECT_THAT(e.out, HasSubstr("torchvision.models.resnet18(num_classes=10)"));
  nlohmann::json j = nlohmann::json::parse(last_line(e.out));
  EXPECT_EQ(j["source"], dir + "/r18/checkpoints/final.pt");
  EXPECT_EQ(j["model"], "resnet18");
  EXPECT_EQ(j["tensors"], 122);  // torchvision resnet18's state_dict(): 62 parameters, 60 BatchNorm buffers

  // keel's logits from the run's own final weights (trained BatchNorm statistics), eval mode.
  auto net = keel::models::create({"resnet18", 3, 10});
  keel::models::load_state_dict(*net, keel::models::read_state_dict(dir + "/r18/checkpoints/final.pt"));
  net->eval();
  torch::manual_seed(3);
  at::Tensor x = torch::randn({4, 3, 32, 32});  // (N, C, H, W)
  at::Tensor logits;
  {
    torch::NoGradGuard ng;
    logits = net->forward(x);  // (N, 10)
  }
  ASSERT_GT(logits.abs().max().item<double>(), 1e-3) << "logits must not be trivially zero";
  keel::models::write_state_dict({{"x", x}, {"logits", logits}}, dir + "/io.pt");

  const std::string script = dir + "/check.py";
  std::ofstream(script) << R"PY(
import sys, torch, torchvision
sd = torch.load(sys.argv[1])
m = torchvision.models.resnet18(num_classes=10)
m.load_state_dict(sd, strict=True)
m.eval()
io = torch.load(sys.argv[2])
with torch.no_grad():
    y = m(io['x'])
d = (y - io['logits']).abs().max().item()
print(f'max |torchvision - keel| logits {d:.3g} (|logits| max {io["logits"].abs().max().item():.3g})')
sys.exit(0 if d < 1e-4 else 1)
)PY";
  const std::string cmd = "/usr/bin/python3 " + script + " " + out + " " + dir + "/io.pt > " + dir + "/py.txt 2>&1";
  const int rc = std::system(cmd.c_str());
  std::ifstream pin(dir + "/py.txt");
  const std::string py((std::istreambuf_iterator<char>(pin)), std::istreambuf_iterator<char>());
  EXPECT_EQ(rc, 0) << py;
  EXPECT_THAT(py, HasSubstr("max |torchvision - keel| logits"));
}

TEST(Export, NewestValidCheckpointWhenNoFinalWeights) {
  const std::string dir = keel::test::fresh_dir("export-ckpt");
  // Interrupted after step 3: checkpoints at step 2 only, no final.pt.
  auto t = keel::test::run_keel(resnet18_run(dir, "cut", "--set debug.stop_after_steps=3"));
  ASSERT_EQ(t.code, 0) << t.out;
  ASSERT_FALSE(fs::exists(dir + "/cut/checkpoints/final.pt"));
  auto e = keel::test::run_keel("export " + dir + "/cut --format pt --json");
  ASSERT_EQ(e.code, 0) << e.out;
  EXPECT_THAT(e.out, HasSubstr("newest valid checkpoint (step 2)"));
  const std::string out = dir + "/cut/export/resnet18.pt";
  ASSERT_TRUE(fs::exists(out));
  auto exported = keel::models::read_state_dict(out);
  expect_same(exported, keel::models::read_state_dict(dir + "/cut/checkpoints/step-00000002/model.pt"));
  for (const auto& [k, v] : exported) EXPECT_TRUE(v.is_contiguous()) << k;

  // --from final: there is none, and the message says what to do.
  auto f = keel::test::run_keel("export " + dir + "/cut --from final");
  EXPECT_NE(f.code, 0);
  EXPECT_THAT(f.out, HasSubstr("final.pt: missing"));
  EXPECT_THAT(f.out, HasSubstr("--from latest"));
  // --from best without checkpoint.keep_best.
  auto b = keel::test::run_keel("export " + dir + "/cut --from best");
  EXPECT_NE(b.code, 0);
  EXPECT_THAT(b.out, HasSubstr("records no best checkpoint"));
  // A corrupt newest checkpoint is skipped with the reason; with none valid, the error names the directory.
  const std::string ck = dir + "/cut/checkpoints/step-00000002";
  fs::resize_file(ck + "/model.pt", 100);
  auto c = keel::test::run_keel("export " + dir + "/cut");
  EXPECT_NE(c.code, 0);
  EXPECT_THAT(c.out, HasSubstr("step-00000002/model.pt: size 100 bytes, expected"));
  EXPECT_THAT(c.out, HasSubstr("no final.pt and no valid step checkpoint"));
}

TEST(Export, BadArgumentsAreErrors) {
  const std::string dir = keel::test::fresh_dir("export-bad");
  auto r = keel::test::run_keel("export " + dir + "/nothing --format pt");
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.out, HasSubstr(dir + "/nothing: no such run directory"));
  r = keel::test::run_keel("export " + dir + " --format onnx");
  EXPECT_NE(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("onnx"));
  r = keel::test::run_keel("export " + dir + " --from bestt");
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.out, HasSubstr("--from bestt: neither auto, final, latest, best nor a checkpoint directory"));
  // Weights that do not fit the model their config names (a resnet20 file under a resnet18 config).
  auto t = keel::test::run_keel(resnet18_run(dir, "mixed", "--set debug.stop_after_steps=1 --set checkpoint.save_final=false"));
  ASSERT_EQ(t.code, 0) << t.out;
  fs::create_directories(dir + "/mixed/checkpoints");
  keel::models::write_state_dict(keel::models::state_dict_of(*keel::models::create({"resnet20", 3, 10})),
                                 dir + "/mixed/checkpoints/final.pt");
  r = keel::test::run_keel("export " + dir + "/mixed");
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.out, HasSubstr("the weights do not fit resnet18"));
  EXPECT_THAT(r.out, HasSubstr("missing keys"));
}
