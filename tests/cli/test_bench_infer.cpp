// keel bench infer: latency percentiles and a batch sweep per optimisation setting, as text and --json, from a
// config or from a trained checkpoint (a ViT trained by the ordinary trainer); keel export on a ViT run loads
// into torchvision's VisionTransformer; bad settings are errors naming them.
#include <gtest/gtest.h>
#include <gmock/gmock.h>

#include <cstdlib>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "../test_util.h"
#include "keel/compat/torch_compat.h"
#include "cli_util.h"

using keel::test::last_line;
using testing::HasSubstr;
namespace fs = std::filesystem;

namespace {

// Checks the JSON of `keel bench infer --json`: every setting asked for, ordered percentiles, every batch size.
void expect_result(const nlohmann::json& j, const std::vector<std::string>& settings, const std::vector<int>& batches) {
  ASSERT_EQ(j.at("settings").size(), settings.size()) << j.dump();
  for (size_t i = 0; i < settings.size(); ++i) {
    const auto& s = j["settings"][i];
    EXPECT_EQ(s.at("setting"), settings[i]);
    const auto& l = s.at("latency_ms");
    EXPECT_GT(l.at("p50").get<double>(), 0);
    EXPECT_LE(l.at("p50").get<double>(), l.at("p90").get<double>());
    EXPECT_LE(l.at("p90").get<double>(), l.at("p99").get<double>());
    EXPECT_LE(l.at("p99").get<double>(), l.at("max").get<double>());
    for (int b : batches) EXPECT_GT(s.at("images_per_second").at(std::to_string(b)).get<double>(), 0) << b;
    EXPECT_GT(s.at("param_bytes").get<int64_t>(), 0);
    EXPECT_GT(s.at("peak_extra_bytes").get<int64_t>(), 0);
  }
}

}  // namespace

TEST(BenchInfer, ConfigResNetWithFoldingAndJson) {
  auto r = keel::test::run_keel(
      "bench infer configs/default.toml --settings plain,im+fold+cl,im+fold+cl+bf16 --batches 1,4 "
      "--latency-iters 4 --sweep-iters 1 --warmup 1 --threads 2 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_THAT(r.out, HasSubstr("p50 ms"));
  const auto j = nlohmann::json::parse(last_line(r.out));
  EXPECT_EQ(j.at("model"), "resnet20");
  EXPECT_EQ(j.at("size"), 28);  // Fashion-MNIST's side
  EXPECT_EQ(j.at("threads"), 2);
  expect_result(j, {"plain", "im+fold+cl", "im+fold+cl+bf16"}, {1, 4});
  EXPECT_EQ(j["settings"][0].at("batchnorms_folded"), 0);
  EXPECT_EQ(j["settings"][1].at("batchnorms_folded"), 21);
  EXPECT_EQ(j["settings"][0].at("latency_ms").at("samples").size(), 4u);
}

TEST(BenchInfer, TrainedViTCheckpointAndExport) {
  const std::string dir = keel::test::fresh_dir("bench-infer-vit");
  // A ViT-Tiny/16 at 32 px trained by the ordinary trainer (AdamW, warmup-cosine, label smoothing) for 2 steps.
  auto t = keel::test::run_keel(
      "train configs/default.toml --set run.dir=" + dir +
      " --set run.name=vit --set model.name=vit_tiny_16 --set model.image_size=32 --set model.in_channels=3"
      " --set data.dataset=synthetic --set data.image_size=32 --set data.synthetic_samples=32 --set data.mean=0.5"
      " --set data.std=0.25 --set train.batch_size=16 --set train.eval_batch_size=16 --set train.epochs=1"
      " --set optim.name=adamw --set optim.lr=0.001 --set optim.weight_decay=0.05 --set schedule.name=warmup_cosine"
      " --set train.label_smoothing=0.1 --set checkpoint.every_steps=2");
  ASSERT_EQ(t.code, 0) << t.out;
  const std::string ckpt = dir + "/vit/checkpoints/step-00000002";
  ASSERT_TRUE(fs::is_directory(ckpt)) << t.out;
  auto r = keel::test::run_keel("bench infer --checkpoint " + ckpt +
                                " --settings plain,im+cl,im+cl+pack+bf16m --batches 2 --latency-iters 3 --sweep-iters 1 --warmup 1 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  const auto j = nlohmann::json::parse(last_line(r.out));
  EXPECT_EQ(j.at("model"), "vit_tiny_16");
  EXPECT_EQ(j.at("size"), 32);
  EXPECT_THAT(j.at("weights").get<std::string>(), HasSubstr("step 2"));
  expect_result(j, {"plain", "im+cl", "im+cl+pack+bf16m"}, {2});
  // Every block's 4 linears and the head, packed where this LibTorch has oneDNN's packed linears (2.x).
  EXPECT_EQ(j["settings"][1].at("linears_packed"), 0);
  EXPECT_EQ(j["settings"][2].at("linears_packed"), keel::compat::has_packed_linear() ? 4 * 12 + 1 : 0);
  // The run's weights: the result is kept in the run directory, and its report shows it.
  EXPECT_THAT(r.out, HasSubstr("written to " + fs::absolute(dir + "/vit/bench/infer.json").lexically_normal().string()));
  EXPECT_EQ(nlohmann::json::parse(keel::test::read_file(dir + "/vit/bench/infer.json")), j);
  auto rep = keel::test::run_keel("report " + dir + "/vit");
  ASSERT_EQ(rep.code, 0) << rep.out;
  const std::string html = keel::test::read_file(dir + "/vit/report.html");
  EXPECT_THAT(html, HasSubstr("Inference benchmark (keel bench infer)"));
  EXPECT_THAT(html, HasSubstr("<td class=\"l\">im+cl</td>"));
  EXPECT_THAT(html, HasSubstr("<th>batch 2 images/s</th>"));

  auto e = keel::test::run_keel("export " + dir + "/vit --format pt --output " + dir + "/vit.pt");
  ASSERT_EQ(e.code, 0) << e.out;
  if (std::system("/usr/bin/python3 -c 'import torchvision' >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "/usr/bin/python3 has no torchvision: the export was not loaded into torchvision";
  }
  const std::string py =
      "/usr/bin/python3 -c \"import torch; from torchvision.models.vision_transformer import VisionTransformer as V; "
      "m = V(32, 16, 12, 3, 192, 768, num_classes=10); m.load_state_dict(torch.load('" + dir + "/vit.pt'), "
      "strict=True); print('loaded')\"";
  EXPECT_EQ(std::system(py.c_str()), 0) << "torchvision could not load keel's exported ViT: " << py;
}

TEST(BenchInfer, BadArgumentsAreErrors) {
  auto r = keel::test::run_keel("bench infer --model resnet20 --channels 1 --classes 10 --size 28 --settings im+jit");
  EXPECT_NE(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("'jit'"));
  r = keel::test::run_keel("bench infer --model resnet20 --channels 1 --classes 10 --size 28 --settings im+pack+bf16w");
  EXPECT_NE(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("'im+pack+bf16w': pack keeps the weights in one dtype"));
  r = keel::test::run_keel("bench infer --model vit_tiny_16 --size 40 --settings plain");
  EXPECT_NE(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("patch size"));
  r = keel::test::run_keel("bench infer --checkpoint /nonexistent/weights.pt");
  EXPECT_NE(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("/nonexistent/weights.pt"));
}
