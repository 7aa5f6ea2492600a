// Config schema (the one place every key is declared), TOML parsing, overrides, validation, output.
// One file, past 600 lines, on purpose: the schema is the one place every key is declared, checked and
// documented (docs/configuration.md is generated from it).
#include "keel/config/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <sstream>
#include <variant>

#include <toml++/toml.h>

#include "keel/memory/budget.h"

namespace keel::config {
namespace {

using Value = std::variant<int64_t, double, bool, std::string, std::vector<double>, std::vector<int64_t>,
                           std::vector<std::string>>;

// One configuration key: how to read, check, write and document it.
struct Field {
  std::string key;   // "section.name"
  std::string type;  // "integer" | "float" | "boolean" | "string" | "integer array" | "float array" | "string array"
  std::string doc;
  std::string range;  // human-readable constraint, e.g. ">= 1", "sgd | adamw"
  std::function<Value(const Config&)> get;
  std::function<void(Config&, const Value&)> set;
  std::function<std::string(const Value&)> check;  // empty string = ok, else what was expected
  bool auto_int = false;  // an integer that may also be the string "auto" (stored as config::kAuto)
};

std::string fmt_double(double v) {
  std::ostringstream os;
  os.precision(10);
  os << v;
  std::string s = os.str();
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

std::string to_text(const Value& v) {
  struct V {
    std::string operator()(int64_t i) const { return std::to_string(i); }
    std::string operator()(double d) const { return fmt_double(d); }
    std::string operator()(bool b) const { return b ? "true" : "false"; }
    std::string operator()(const std::string& s) const {
      std::ostringstream os;
      os << toml::value<std::string>(s);
      return os.str();
    }
    std::string operator()(const std::vector<int64_t>& a) const {
      std::string s = "[";
      for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
      return s + "]";
    }
    std::string operator()(const std::vector<std::string>& a) const {
      std::string s = "[";
      for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + (*this)(a[i]);
      return s + "]";
    }
    std::string operator()(const std::vector<double>& a) const {
      std::string s = "[";
      for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + fmt_double(a[i]);
      return s + "]";
    }
  };
  return std::visit(V{}, v);
}

// A field's value as TOML text ("auto" for an auto_int field holding kAuto).
std::string field_text(const Field& f, const Value& v) {
  if (f.auto_int && std::get<int64_t>(v) == kAuto) return "\"auto\"";
  return to_text(v);
}

template <class S, class T>
Field make_field(std::string key, S Config::*sec, T S::*mem, std::string doc, std::string range,
                 std::function<std::string(const T&)> check) {
  Field f;
  f.key = std::move(key);
  if constexpr (std::is_same_v<T, int64_t>) f.type = "integer";
  else if constexpr (std::is_same_v<T, double>) f.type = "float";
  else if constexpr (std::is_same_v<T, bool>) f.type = "boolean";
  else if constexpr (std::is_same_v<T, std::string>) f.type = "string";
  else if constexpr (std::is_same_v<T, std::vector<int64_t>>) f.type = "integer array";
  else if constexpr (std::is_same_v<T, std::vector<std::string>>) f.type = "string array";
  else f.type = "float array";
  f.doc = std::move(doc);
  f.range = std::move(range);
  f.get = [sec, mem](const Config& c) { return Value((c.*sec).*mem); };
  f.set = [sec, mem](Config& c, const Value& v) { (c.*sec).*mem = std::get<T>(v); };
  f.check = [check](const Value& v) { return check ? check(std::get<T>(v)) : std::string(); };
  return f;
}

std::function<std::string(const int64_t&)> int_at_least(int64_t lo) {
  return [lo](const int64_t& v) {
    return v >= lo ? "" : "an integer >= " + std::to_string(lo);
  };
}
std::function<std::string(const double&)> float_in(double lo, double hi) {
  return [lo, hi](const double& v) {
    return (std::isfinite(v) && v >= lo && v <= hi)
               ? ""
               : "a number in [" + fmt_double(lo) + ", " + fmt_double(hi) + "]";
  };
}
std::function<std::string(const std::string&)> one_of(std::vector<std::string> choices) {
  return [choices](const std::string& v) {
    if (std::find(choices.begin(), choices.end(), v) != choices.end()) return std::string();
    std::string s = "one of";
    for (const auto& c : choices) s += " \"" + c + "\"";
    return s;
  };
}
std::string choices_text(const std::vector<std::string>& c) {
  std::string s;
  for (const auto& x : c) s += (s.empty() ? "" : ", ") + x;
  return s;
}

// "0600" / "640" -> the bits; -1 unless 3 or 4 octal digits (a 4-digit one starting with 0) of
// read/write bits only that include the owner's read and write.
int parse_file_mode(const std::string& s) {
  if (s.size() < 3 || s.size() > 4 || (s.size() == 4 && s[0] != '0')) return -1;
  int v = 0;
  for (char ch : s) {
    if (ch < '0' || ch > '7') return -1;
    v = v * 8 + (ch - '0');
  }
  if ((v & 0111) != 0 || (v & 0600) != 0600) return -1;
  return v;
}

const std::vector<Field>& schema() {
  static const std::vector<Field> fields = [] {
    using C = Config;
    std::vector<Field> f;
    const double kInf = std::numeric_limits<double>::max();
    auto nonempty = [](const std::string& s) { return s.empty() ? "a non-empty string" : ""; };
    // run
    f.push_back(make_field<C::Run, std::string>("run.name", &C::run, &C::Run::name,
        "Run directory name: outputs go to `<run.dir>/<run.name>/`. One path component: no `/`, not `.` or `..` "
        "(a path would write outside run.dir).", "a single directory name",
        [](const std::string& s) -> std::string {
          if (s.empty() || s == "." || s == ".." || s.find('/') != std::string::npos || s.find('\0') != std::string::npos)
            return "a single directory name (non-empty, no '/', not '.' or '..'): outputs go to <run.dir>/<run.name>/";
          return "";
        }));
    f.push_back(make_field<C::Run, std::string>("run.dir", &C::run, &C::Run::dir,
        "Parent directory of run directories.", "non-empty", nonempty));
    f.push_back(make_field<C::Run, int64_t>("run.seed", &C::run, &C::Run::seed,
        "Seed of model initialisation, sampler order and augmentation.", ">= 0", int_at_least(0)));
    f.push_back(make_field<C::Run, int64_t>("run.threads", &C::run, &C::Run::threads,
        "Intra-op threads; 0 uses every core (LibTorch alone may pick fewer).", ">= 0", int_at_least(0)));
    f.push_back(make_field<C::Run, std::string>("run.device", &C::run, &C::Run::device,
        "Where the model trains: `auto` (the first CUDA GPU when this keel has CUDA and one is usable, else the "
        "CPU), `cpu`, `cuda` or `cuda:N`.", "auto, cpu, cuda, cuda:N", [](const std::string& s) {
          const bool ok = s == "auto" || s == "cpu" || s == "cuda" ||
                          (s.rfind("cuda:", 0) == 0 && s.size() > 5 &&
                           s.find_first_not_of("0123456789", 5) == std::string::npos);
          return ok ? "" : "auto, cpu, cuda or cuda:N";
        }));
    // data
    const std::vector<std::string> datasets = {"fashion-mnist", "mnist", "idx", "cifar10", "cifar100",
                                               "image_folder", "synthetic"};
    f.push_back(make_field<C::Data, std::string>("data.dataset", &C::data, &C::Data::dataset,
        "Dataset kind. `fashion-mnist`, `mnist` and `idx` read IDX files (gzipped or not) from `data.root`; "
        "`cifar10` / `cifar100` the binary batches (`data_batch_1..5.bin`, `test_batch.bin` / `train.bin`, "
        "`test.bin`; CIFAR-100 uses the fine labels) in `data.root` or its `cifar-10-batches-bin` / "
        "`cifar-100-binary` folder; `image_folder` JPEG/PNG files in `data.root/train/<class>/` and "
        "`data.root/val/<class>/` (ImageNet layout), decoded, cropped and resized to `data.image_size` with "
        "`model.in_channels` channels; `synthetic` generated images of `model.in_channels` x `data.image_size`^2 "
        "and `model.num_classes` classes (for benchmarks; no files).",
        choices_text(datasets), one_of(datasets)));
    f.push_back(make_field<C::Data, std::string>("data.root", &C::data, &C::Data::root,
        "Directory holding the dataset files.", "non-empty", nonempty));
    f.push_back(make_field<C::Data, int64_t>("data.workers", &C::data, &C::Data::workers,
        "Loader worker threads; -1 chooses from the cores (cores - 1, at least 1); 0 loads on the training thread.",
        ">= -1", int_at_least(-1)));
    f.push_back(make_field<C::Data, int64_t>("data.prefetch", &C::data, &C::Data::prefetch,
        "Ready batches queued ahead of training.", ">= 1", int_at_least(1)));
    auto stats_check = [](const std::vector<double>& v) -> std::string {
      if (v.empty()) return "a non-empty array of numbers";
      for (double x : v) if (!std::isfinite(x)) return "finite numbers";
      return "";
    };
    f.push_back(make_field<C::Data, std::vector<double>>("data.mean", &C::data, &C::Data::mean,
        "Per-channel mean of pixels scaled to [0, 1], subtracted before the model; one value or one per channel.",
        "non-empty", stats_check));
    f.push_back(make_field<C::Data, std::vector<double>>("data.std", &C::data, &C::Data::std,
        "Per-channel standard deviation used for normalisation; one value or one per channel.",
        "non-empty, > 0", [stats_check](const std::vector<double>& v) -> std::string {
          std::string e = stats_check(v);
          if (!e.empty()) return e;
          for (double x : v) if (x <= 0) return "positive numbers";
          return "";
        }));
    f.push_back(make_field<C::Data, int64_t>("data.train_limit", &C::data, &C::Data::train_limit,
        "Use only the first N training samples (0 = all). For quick experiments.", ">= 0", int_at_least(0)));
    f.push_back(make_field<C::Data, int64_t>("data.test_limit", &C::data, &C::Data::test_limit,
        "Use only the first N test samples (0 = all).", ">= 0", int_at_least(0)));
    f.push_back(make_field<C::Data, bool>("data.random_flip", &C::data, &C::Data::random_flip,
        "Random horizontal flip of training images (on the training device, per sample).", "", nullptr));
    f.push_back(make_field<C::Data, int64_t>("data.random_crop_padding", &C::data, &C::Data::random_crop_padding,
        "Pad training images by this many pixels and crop back at a random offset (0 = off).", ">= 0",
        int_at_least(0)));
    f.push_back(make_field<C::Data, int64_t>("data.image_size", &C::data, &C::Data::image_size,
        "`image_folder` and `synthetic`: height and width of every sample (IDX and CIFAR keep their own size).",
        ">= 1", int_at_least(1)));
    auto range_pair = [](double lo_min, double hi_max) {
      return [lo_min, hi_max](const std::vector<double>& v) -> std::string {
        if (v.size() != 2 || !(v[0] > lo_min) || !(v[0] <= v[1]) || !(v[1] <= hi_max))
          return "two numbers [lo, hi] with " + fmt_double(lo_min) + " < lo <= hi <= " + fmt_double(hi_max);
        return "";
      };
    };
    f.push_back(make_field<C::Data, std::vector<double>>("data.rrc_scale", &C::data, &C::Data::rrc_scale,
        "`image_folder` training: random-resized-crop area as a fraction of the image, [lo, hi] "
        "(torchvision's RandomResizedCrop scale).", "0 < lo <= hi <= 1", range_pair(0, 1)));
    f.push_back(make_field<C::Data, std::vector<double>>("data.rrc_ratio", &C::data, &C::Data::rrc_ratio,
        "`image_folder` training: random-resized-crop aspect ratio (width / height) range, drawn log-uniformly.",
        "0 < lo <= hi", range_pair(0, 1e9)));
    f.push_back(make_field<C::Data, int64_t>("data.eval_resize", &C::data, &C::Data::eval_resize,
        "`image_folder` evaluation: the shorter side is scaled to this before the centre `data.image_size` crop "
        "(0 = round(image_size * 256 / 224), i.e. 256 for 224).", "0 or >= data.image_size", int_at_least(0)));
    f.push_back(make_field<C::Data, int64_t>("data.synthetic_samples", &C::data, &C::Data::synthetic_samples,
        "`synthetic`: training samples (the test split has a tenth, at least 1).", ">= 1", int_at_least(1)));
    const std::vector<std::string> on_error = {"skip", "fail"};
    f.push_back(make_field<C::Data, std::string>("data.on_error", &C::data, &C::Data::on_error,
        "A sample that cannot be read (missing, zero-byte, truncated or undecodable file): `skip` logs it once "
        "with its path, counts it, and replaces it by the next readable sample of the epoch order (the epoch "
        "keeps its size; the epoch summary reports the count); `fail` stops the run with the path and the "
        "decoder's reason.", choices_text(on_error), one_of(on_error)));
    // augment
    f.push_back(make_field<C::Augment, bool>("augment.random_resized_crop", &C::augment,
        &C::Augment::random_resized_crop,
        "Random-resized crop on the training device, batched: each sample gets its own torchvision "
        "RandomResizedCrop box (`data.rrc_scale`, `data.rrc_ratio`) resampled back to its own size with "
        "antialiased bilinear filtering. For uniform-size datasets (CIFAR, MNIST, synthetic); `image_folder` "
        "crops in the loader workers instead.", "", nullptr));
    auto non_negative = [](const double& v) { return (std::isfinite(v) && v >= 0) ? "" : "a finite number >= 0"; };
    f.push_back(make_field<C::Augment, double>("augment.mixup_alpha", &C::augment, &C::Augment::mixup_alpha,
        "Mixup: a mixed batch is lambda x batch + (1 - lambda) x the batch rolled by one sample, with the "
        "one-hot targets mixed alike (soft-target cross-entropy), lambda ~ Beta(alpha, alpha). 0 = off.", ">= 0",
        non_negative));
    f.push_back(make_field<C::Augment, double>("augment.cutmix_alpha", &C::augment, &C::Augment::cutmix_alpha,
        "CutMix: a box of the batch rolled by one sample is pasted into every sample (sides sqrt(1 - lambda) of "
        "the image's, centre uniform), targets mixed by the kept area, lambda ~ Beta(alpha, alpha). 0 = off. "
        "With both alphas > 0, each mixed batch is CutMix or Mixup with probability 1/2.", ">= 0", non_negative));
    f.push_back(make_field<C::Augment, double>("augment.mix_prob", &C::augment, &C::Augment::mix_prob,
        "Probability that a training batch is mixed (Mixup or CutMix) when an alpha is > 0.", "[0, 1]",
        float_in(0, 1)));
    // model
    f.push_back(make_field<C::Model, std::string>("model.name", &C::model, &C::Model::name,
        "Registered model: resnet20/32/44/56/110 (CIFAR-style), resnet18/34/50/101/152 (torchvision layout), or a "
        "Vision Transformer vit_{tiny,small,base}_{16,32}, vit_large_16 (torchvision's vit_b_16, vit_b_32, vit_l_16 "
        "are the same models under torchvision's names).",
        "a registered name", nonempty));
    f.push_back(make_field<C::Model, int64_t>("model.in_channels", &C::model, &C::Model::in_channels,
        "Input image channels.", ">= 1", int_at_least(1)));
    f.push_back(make_field<C::Model, int64_t>("model.num_classes", &C::model, &C::Model::num_classes,
        "Output classes.", ">= 1", int_at_least(1)));
    f.push_back(make_field<C::Model, std::string>("model.weights", &C::model, &C::Model::weights,
        "Optional `torch.save(model.state_dict())` file (e.g. from torchvision) loaded by parameter name before training; every key and shape must match.",
        "path or empty", nullptr));
    f.push_back(make_field<C::Model, bool>("model.checkpoint_stages", &C::model, &C::Model::checkpoint_stages,
        "Activation checkpointing: each ResNet stage keeps only its input in the forward and recomputes its "
        "activations in the backward, trading about one extra forward of compute for activation memory "
        "(docs/memory.md has the measured cost).", "", nullptr));
    f.push_back(make_field<C::Model, int64_t>("model.image_size", &C::model, &C::Model::image_size,
        "ViTs: the input side the position embeddings are for (inputs must be this size; 0 = 224). `model.weights` "
        "saved at another size are interpolated bicubically, as torchvision's interpolate_embeddings does. "
        "ResNets ignore it.", ">= 0", int_at_least(0)));
    f.push_back(make_field<C::Model, int64_t>("model.patch_size", &C::model, &C::Model::patch_size,
        "ViTs: patch side (0 = the name's: 16 for vit_tiny_16); `model.image_size` must be a multiple of it. "
        "ResNets ignore it.", ">= 0", int_at_least(0)));
    const std::vector<std::string> attention = {"auto", "keel", "sdpa"};
    f.push_back(make_field<C::Model, std::string>("model.attention", &C::model, &C::Model::attention,
        "ViTs: attention kernel. `keel`: two batched GEMMs with the scale folded into the first and softmax in "
        "fp32 (every LibTorch); `sdpa`: at::scaled_dot_product_attention (LibTorch >= 2.0); `auto`: sdpa where "
        "it exists, else keel. ResNets ignore it.", choices_text(attention), one_of(attention)));
    f.push_back(make_field<C::Model, bool>("model.sync_bn", &C::model, &C::Model::sync_bn,
        "Data-parallel training: BatchNorm batch statistics (and their gradients) over the samples of every rank, "
        "as one process with the global batch computes them; false: each rank normalises with its own samples. "
        "Costs three small all-reduces per BatchNorm and step. No effect in a single process or on models "
        "without BatchNorm (ViTs).", "", nullptr));
    // train
    f.push_back(make_field<C::Train, int64_t>("train.epochs", &C::train, &C::Train::epochs,
        "Passes over the training set.", ">= 1", int_at_least(1)));
    f.push_back(make_field<C::Train, int64_t>("train.batch_size", &C::train, &C::Train::batch_size,
        "Samples per optimizer step.", ">= 1", int_at_least(1)));
    f.push_back(make_field<C::Train, int64_t>("train.eval_batch_size", &C::train, &C::Train::eval_batch_size,
        "Samples per forward pass during evaluation.", ">= 1", int_at_least(1)));
    f.push_back(make_field<C::Train, double>("train.label_smoothing", &C::train, &C::Train::label_smoothing,
        "Cross-entropy label smoothing.", "[0, 1)", [](const double& v) {
          return (v >= 0 && v < 1) ? "" : "a number in [0, 1)";
        }));
    f.push_back(make_field<C::Train, bool>("train.channels_last", &C::train, &C::Train::channels_last,
        "Run convolutions in NHWC (channels-last) memory format; faster with oneDNN on CPU.", "", nullptr));
    const std::vector<std::string> precisions = {"fp32", "bf16", "fp16"};
    f.push_back(make_field<C::Train, std::string>("train.precision", &C::train, &C::Train::precision,
        "Compute precision of forward/backward: fp32, bf16 autocast (CPU and CUDA), or fp16 autocast with the "
        "dynamic loss scaler (CUDA only). Weights and optimizer state stay fp32.",
        choices_text(precisions), one_of(precisions)));
    f.push_back(make_field<C::Train, int64_t>("train.micro_batch", &C::train, &C::Train::micro_batch,
        "Samples per forward/backward; the batch is split into micro-batches whose gradients accumulate into "
        "one optimizer step (0 = the whole batch). Must divide train.batch_size. `\"auto\"`: at start-up the "
        "planner (`keel plan-batch`) picks the largest divisor of train.batch_size whose full step fits "
        "memory.budget minus memory.plan_margin, and the largest evaluation micro-batch likewise.",
        ">= 0 or \"auto\"", int_at_least(0)));
    f.back().auto_int = true;
    f.back().type = "integer or \"auto\"";
    f.push_back(make_field<C::Train, double>("train.grad_clip_norm", &C::train, &C::Train::grad_clip_norm,
        "Clip gradients to this global L2 norm (0 = off); the norm before clipping is logged.", ">= 0",
        float_in(0, kInf)));
    f.push_back(make_field<C::Train, double>("train.grad_clip_value", &C::train, &C::Train::grad_clip_value,
        "Clip each gradient element to [-v, v] (0 = off).", ">= 0", float_in(0, kInf)));
    f.push_back(make_field<C::Train, int64_t>("train.log_every", &C::train, &C::Train::log_every,
        "Optimizer steps between progress lines; the loss is read back from the device only then.", ">= 1",
        int_at_least(1)));
    f.push_back(make_field<C::Train, int64_t>("train.max_steps", &C::train, &C::Train::max_steps,
        "Stop after this many optimizer steps (0 = run all epochs). The schedule spans the shorter of the two.",
        ">= 0", int_at_least(0)));
    f.push_back(make_field<C::Train, bool>("train.deterministic", &C::train, &C::Train::deterministic,
        "Bit-for-bit reproducible runs on CPU: deterministic algorithms only (an op without one is an error "
        "naming it), the intra-op thread count fixed for the whole run and restored from the checkpoint on "
        "resume (a different count partitions reductions differently). Its cost is measured in "
        "docs/checkpoints.md.", "", nullptr));
    // optim
    const std::vector<std::string> optims = {"sgd", "adamw"};
    f.push_back(make_field<C::Optim, std::string>("optim.name", &C::optim, &C::Optim::name,
        "Optimizer.", choices_text(optims), one_of(optims)));
    f.push_back(make_field<C::Optim, double>("optim.lr", &C::optim, &C::Optim::lr,
        "Peak learning rate (the schedule scales it).", "(0, 100]", [](const double& v) {
          return (v > 0 && v <= 100) ? "" : "a number in (0, 100]";
        }));
    f.push_back(make_field<C::Optim, double>("optim.momentum", &C::optim, &C::Optim::momentum,
        "SGD momentum.", "[0, 1)", [](const double& v) { return (v >= 0 && v < 1) ? "" : "a number in [0, 1)"; }));
    f.push_back(make_field<C::Optim, bool>("optim.nesterov", &C::optim, &C::Optim::nesterov,
        "SGD Nesterov momentum (needs momentum > 0).", "", nullptr));
    f.push_back(make_field<C::Optim, double>("optim.weight_decay", &C::optim, &C::Optim::weight_decay,
        "Weight decay (L2 for SGD, decoupled for AdamW); never applied to biases or normalisation weights.",
        ">= 0", float_in(0, kInf)));
    f.push_back(make_field<C::Optim, double>("optim.beta1", &C::optim, &C::Optim::beta1,
        "AdamW first-moment decay.", "[0, 1)", [](const double& v) { return (v >= 0 && v < 1) ? "" : "a number in [0, 1)"; }));
    f.push_back(make_field<C::Optim, double>("optim.beta2", &C::optim, &C::Optim::beta2,
        "AdamW second-moment decay.", "[0, 1)", [](const double& v) { return (v >= 0 && v < 1) ? "" : "a number in [0, 1)"; }));
    f.push_back(make_field<C::Optim, double>("optim.eps", &C::optim, &C::Optim::eps,
        "AdamW denominator epsilon.", "> 0", [](const double& v) { return v > 0 ? "" : "a number > 0"; }));
    f.push_back(make_field<C::Optim, double>("optim.no_decay_lr_factor", &C::optim, &C::Optim::no_decay_lr_factor,
        "Learning-rate multiplier of the no-decay parameter group (biases and normalisation weights, chosen by "
        "rule: parameters with fewer than 2 dimensions); the schedule scales both groups' rates alike.", "[0, 100]",
        float_in(0, 100)));
    const std::vector<std::string> scalings = {"none", "linear", "sqrt"};
    f.push_back(make_field<C::Optim, std::string>("optim.lr_scaling", &C::optim, &C::Optim::lr_scaling,
        "Scale `optim.lr` by the global batch: `linear` uses lr x batch / base, `sqrt` lr x sqrt(batch / base), "
        "with batch = `train.batch_size` and base = `optim.base_batch_size`; the resolved rate is printed and "
        "logged at the start of training.", choices_text(scalings), one_of(scalings)));
    f.push_back(make_field<C::Optim, int64_t>("optim.base_batch_size", &C::optim, &C::Optim::base_batch_size,
        "The global batch size `optim.lr` was tuned for (used by `optim.lr_scaling`).", ">= 1", int_at_least(1)));
    const std::vector<std::string> monitors = {"test_loss", "test_top1", "train_loss"};
    const std::vector<std::string> modes = {"auto", "min", "max"};
    // schedule
    const std::vector<std::string> schedules = {"onecycle", "warmup_cosine", "constant", "step",
                                                "multistep", "exponential", "reduce_on_plateau"};
    f.push_back(make_field<C::Schedule, std::string>("schedule.name", &C::schedule, &C::Schedule::name,
        "Learning-rate schedule over all optimizer steps: `onecycle` (linear warm-up, cosine anneal, as "
        "torch.optim.lr_scheduler.OneCycleLR with linear warm-up), `warmup_cosine` (linear warm-up then cosine), "
        "`constant`; `step`, `multistep`, `exponential` (as StepLR, MultiStepLR, ExponentialLR, counted in "
        "`schedule.interval` units) and `reduce_on_plateau` (as ReduceLROnPlateau on `schedule.plateau.monitor`, "
        "checked after each epoch's evaluation), each optionally after a linear warm-up of "
        "`schedule.warmup_steps`.",
        choices_text(schedules), one_of(schedules)));
    f.push_back(make_field<C::Schedule, double>("schedule.warmup_fraction", &C::schedule,
        &C::Schedule::warmup_fraction, "onecycle / warmup_cosine: share of all steps spent in warm-up.", "[0, 1)",
        [](const double& v) { return (v >= 0 && v < 1) ? "" : "a number in [0, 1)"; }));
    f.push_back(make_field<C::Schedule, double>("schedule.start_factor", &C::schedule, &C::Schedule::start_factor,
        "Learning rate at step 0 as a fraction of `optim.lr`.", "[0, 1]", float_in(0, 1)));
    f.push_back(make_field<C::Schedule, double>("schedule.final_factor", &C::schedule, &C::Schedule::final_factor,
        "onecycle / warmup_cosine: learning rate at the last step as a fraction of `optim.lr`.", "[0, 1]",
        float_in(0, 1)));
    f.push_back(make_field<C::Schedule, int64_t>("schedule.warmup_steps", &C::schedule, &C::Schedule::warmup_steps,
        "step / multistep / exponential / reduce_on_plateau: linear warm-up over this many optimizer steps from "
        "`start_factor` to 1 (LinearLR), multiplied with the decay, which counts from step 0 (as PyTorch's "
        "ChainedScheduler, or LinearLR stepped per step beside a per-epoch scheduler). 0 = none. onecycle and "
        "warmup_cosine warm up over `warmup_fraction` instead.", ">= 0", int_at_least(0)));
    const std::vector<std::string> intervals = {"epoch", "step"};
    f.push_back(make_field<C::Schedule, std::string>("schedule.interval", &C::schedule, &C::Schedule::interval,
        "Unit of `step_size`, `milestones` and exponential's per-unit `gamma`: `epoch` (as PyTorch users step "
        "these schedulers once per epoch; epoch = applied optimizer steps / steps per epoch, so the rate changes "
        "at epoch boundaries) or `step` (optimizer steps).", choices_text(intervals), one_of(intervals)));
    f.push_back(make_field<C::Schedule, int64_t>("schedule.step_size", &C::schedule, &C::Schedule::step_size,
        "step: multiply the rate by `gamma` every `step_size` intervals.", ">= 1", int_at_least(1)));
    f.push_back(make_field<C::Schedule, std::vector<int64_t>>("schedule.milestones", &C::schedule,
        &C::Schedule::milestones,
        "multistep: multiply the rate by `gamma` when this many intervals have passed, for each entry "
        "(ascending; a repeated entry decays twice, as MultiStepLR).", "ascending integers >= 1",
        [](const std::vector<int64_t>& v) -> std::string {
          for (size_t i = 0; i < v.size(); ++i) {
            if (v[i] < 1 || (i > 0 && v[i] < v[i - 1])) return "ascending integers >= 1";
          }
          return "";
        }));
    f.push_back(make_field<C::Schedule, double>("schedule.gamma", &C::schedule, &C::Schedule::gamma,
        "step / multistep / exponential: decay multiplier.", "(0, 1]",
        [](const double& v) { return (v > 0 && v <= 1) ? "" : "a number in (0, 1]"; }));
    f.push_back(make_field<C::Schedule, std::string>("schedule.plateau.monitor", &C::schedule,
        &C::Schedule::plateau_monitor,
        "reduce_on_plateau: metric fed to the rule after each epoch's evaluation (the choices of "
        "`early_stop.monitor`).", choices_text(monitors), one_of(monitors)));
    f.push_back(make_field<C::Schedule, std::string>("schedule.plateau.mode", &C::schedule, &C::Schedule::plateau_mode,
        "reduce_on_plateau: whether lower or higher is better; auto = max for accuracies, min for losses.",
        choices_text(modes), one_of(modes)));
    f.push_back(make_field<C::Schedule, double>("schedule.plateau.factor", &C::schedule,
        &C::Schedule::plateau_factor, "reduce_on_plateau: rate multiplier at each reduction.", "(0, 1)",
        [](const double& v) { return (v > 0 && v < 1) ? "" : "a number in (0, 1)"; }));
    f.push_back(make_field<C::Schedule, int64_t>("schedule.plateau.patience", &C::schedule,
        &C::Schedule::plateau_patience,
        "reduce_on_plateau: epochs without improvement tolerated; the rate drops after patience + 1 of them.",
        ">= 0", int_at_least(0)));
    f.push_back(make_field<C::Schedule, double>("schedule.plateau.threshold", &C::schedule,
        &C::Schedule::plateau_threshold, "reduce_on_plateau: margin an improvement must beat the best by.", ">= 0",
        float_in(0, kInf)));
    const std::vector<std::string> threshold_modes = {"rel", "abs"};
    f.push_back(make_field<C::Schedule, std::string>("schedule.plateau.threshold_mode", &C::schedule,
        &C::Schedule::plateau_threshold_mode,
        "reduce_on_plateau: `rel` = beat best x (1 - threshold) (min) or best x (1 + threshold) (max); "
        "`abs` = beat best -/+ threshold.", choices_text(threshold_modes), one_of(threshold_modes)));
    f.push_back(make_field<C::Schedule, int64_t>("schedule.plateau.cooldown", &C::schedule,
        &C::Schedule::plateau_cooldown, "reduce_on_plateau: epochs after a reduction in which bad epochs are not "
        "counted.", ">= 0", int_at_least(0)));
    f.push_back(make_field<C::Schedule, double>("schedule.plateau.min_lr", &C::schedule, &C::Schedule::plateau_min_lr,
        "reduce_on_plateau: floor of the learning rate (absolute, compared with the resolved `optim.lr` times "
        "the factors; the no-decay group keeps its `optim.no_decay_lr_factor` ratio).", ">= 0",
        float_in(0, kInf)));
    // amp
    const std::vector<std::string> scaler_modes = {"auto", "on", "off"};
    f.push_back(make_field<C::Amp, std::string>("amp.scaler", &C::amp, &C::Amp::scaler,
        "Dynamic loss scaling: `auto` = on for fp16 only; `on` forces it (e.g. to test it with fp32/bf16).",
        choices_text(scaler_modes), one_of(scaler_modes)));
    f.push_back(make_field<C::Amp, double>("amp.init_scale", &C::amp, &C::Amp::init_scale,
        "Initial loss scale (GradScaler's default).", "> 0", [](const double& v) { return v > 0 ? "" : "a number > 0"; }));
    f.push_back(make_field<C::Amp, double>("amp.growth_factor", &C::amp, &C::Amp::growth_factor,
        "Scale multiplier after growth_interval finite steps in a row.", "> 1",
        [](const double& v) { return v > 1 ? "" : "a number > 1"; }));
    f.push_back(make_field<C::Amp, double>("amp.backoff_factor", &C::amp, &C::Amp::backoff_factor,
        "Scale multiplier on a step with inf/NaN gradients (the step is skipped).", "(0, 1)",
        [](const double& v) { return (v > 0 && v < 1) ? "" : "a number in (0, 1)"; }));
    f.push_back(make_field<C::Amp, int64_t>("amp.growth_interval", &C::amp, &C::Amp::growth_interval,
        "Finite steps in a row before the scale grows.", ">= 1", int_at_least(1)));
    // guard
    f.push_back(make_field<C::Guard, bool>("guard.enabled", &C::guard, &C::Guard::enabled,
        "Non-finite guard: a non-finite loss or gradient skips the optimizer step (schedule, EMA and step counter "
        "do not advance). Off: a non-finite step stops the run.", "", nullptr));
    f.push_back(make_field<C::Guard, int64_t>("guard.max_consecutive_skips", &C::guard,
        &C::Guard::max_consecutive_skips,
        "K: after K skipped steps in a row, roll back to the last good in-memory state (weights, optimizer, "
        "scaler) and multiply the learning rate by guard.lr_factor.", ">= 1", int_at_least(1)));
    f.push_back(make_field<C::Guard, int64_t>("guard.max_rollbacks", &C::guard, &C::Guard::max_rollbacks,
        "R: after R rollbacks, stop with a report of every skip and where it started.", ">= 0", int_at_least(0)));
    f.push_back(make_field<C::Guard, double>("guard.lr_factor", &C::guard, &C::Guard::lr_factor,
        "Learning-rate multiplier applied at each rollback (cumulative).", "(0, 1]", [](const double& v) {
          return (v > 0 && v <= 1) ? "" : "a number in (0, 1]";
        }));
    f.push_back(make_field<C::Guard, int64_t>("guard.snapshot_every", &C::guard, &C::Guard::snapshot_every,
        "Applied steps between in-memory snapshots that a rollback returns to.", ">= 1", int_at_least(1)));
    f.push_back(make_field<C::Guard, bool>("guard.locate", &C::guard, &C::Guard::locate,
        "On a skip, replay the batch with every module output recorded and name the first module whose output "
        "(forward) or gradient (backward) went non-finite, with its finite abs-min/abs-max.", "", nullptr));
    f.push_back(make_field<C::Guard, double>("guard.spike_factor", &C::guard, &C::Guard::spike_factor,
        "Also treat a finite loss above this multiple of its running mean (after 20 healthy steps) as a failed "
        "step: divergence is caught while the weights are still good, before it turns into inf/NaN. 0 = off.",
        "0 or >= 2", [](const double& v) { return (v == 0 || v >= 2) ? "" : "0 (off) or a number >= 2"; }));
    // early_stop
    f.push_back(make_field<C::EarlyStop, bool>("early_stop.enabled", &C::early_stop, &C::EarlyStop::enabled,
        "Stop when the monitored metric has not improved for `patience` evaluations.", "", nullptr));
    f.push_back(make_field<C::EarlyStop, std::string>("early_stop.monitor", &C::early_stop,
        &C::EarlyStop::monitor, "Metric watched after each epoch's evaluation.", choices_text(monitors),
        one_of(monitors)));
    f.push_back(make_field<C::EarlyStop, std::string>("early_stop.mode", &C::early_stop, &C::EarlyStop::mode,
        "Whether lower or higher is better; auto = max for accuracies, min for losses.", choices_text(modes),
        one_of(modes)));
    f.push_back(make_field<C::EarlyStop, int64_t>("early_stop.patience", &C::early_stop, &C::EarlyStop::patience,
        "Evaluations without improvement before stopping.", ">= 1", int_at_least(1)));
    f.push_back(make_field<C::EarlyStop, double>("early_stop.min_delta", &C::early_stop, &C::EarlyStop::min_delta,
        "An improvement must beat the best value by more than this.", ">= 0", float_in(0, kInf)));
    f.push_back(make_field<C::EarlyStop, bool>("early_stop.restore_best", &C::early_stop,
        &C::EarlyStop::restore_best, "When stopping (or at the end), restore the weights of the best evaluation.", "",
        nullptr));
    // ema
    f.push_back(make_field<C::EmaCfg, bool>("ema.enabled", &C::ema, &C::EmaCfg::enabled,
        "Keep an exponential moving average of the weights, evaluated separately after each epoch.", "", nullptr));
    f.push_back(make_field<C::EmaCfg, double>("ema.decay", &C::ema, &C::EmaCfg::decay,
        "EMA decay per applied optimizer step.", "(0, 1)", [](const double& v) {
          return (v > 0 && v < 1) ? "" : "a number in (0, 1)";
        }));
    // memory
    f.push_back(make_field<C::Memory, std::string>("memory.budget", &C::memory, &C::Memory::budget,
        "Memory the run may allocate: bytes with a unit (`\"3GiB\"`, `\"512MiB\"`, `\"1.5GB\"`) or a fraction of "
        "the device's memory (`\"0.8\"`, `\"80%\"`); empty = no budget. On CPU it is enforced by keel's allocator, "
        "which throws the same out-of-memory error a GPU would; on CUDA through the caching allocator's memory "
        "fraction.", "empty or a size", nullptr));
    f.push_back(make_field<C::Memory, double>("memory.plan_margin", &C::memory, &C::Memory::plan_margin,
        "Safety margin of the batch planner (`train.micro_batch = \"auto\"`, `keel plan-batch`): a micro-batch "
        "is chosen only if its full step fits in (1 - margin) x the budget.", "[0, 0.9]", float_in(0, 0.9)));
    f.push_back(make_field<C::Memory, bool>("memory.oom_recovery", &C::memory, &C::Memory::oom_recovery,
        "On out-of-memory in forward/backward: free the partial step, halve train.micro_batch (doubling the "
        "accumulation steps) and replay the same samples; the effective batch never changes.", "", nullptr));
    // monitor
    f.push_back(make_field<C::Monitor, bool>("monitor.enabled", &C::monitor, &C::Monitor::enabled,
        "Measure the step-time breakdown every step and log a record every `train.log_every` steps (loss read-back, "
        "throughput, utilisation, memory: metrics.jsonl, steps.csv, TensorBoard). `false` leaves all of that out "
        "(epochs are still logged, but their breakdown, throughput and advice read 0); it exists to measure monitoring's own cost "
        "(bench/monitor_overhead.sh).", "", nullptr));
    // debug
    f.push_back(make_field<C::Debug, int64_t>("debug.stop_after_steps", &C::debug, &C::Debug::stop_after_steps,
        "Stop the run after this many optimizer steps as if it had been killed (no final checkpoint); the "
        "schedule still spans the whole run. For resume tests (0 = off).", ">= 0", int_at_least(0)));
    f.push_back(make_field<C::Debug, bool>("debug.log_sample_ids", &C::debug, &C::Debug::log_sample_ids,
        "Append every training batch's dataset indices (epoch, batch, step, applied) to "
        "<run.dir>/<run.name>/sample_ids.jsonl, to audit that each sample is used once per epoch.", "", nullptr));
    f.push_back(make_field<C::Debug, std::vector<int64_t>>("debug.inject_oom_steps", &C::debug,
        &C::Debug::inject_oom_steps,
        "Fault injection: the step attempts with these 1-based numbers throw an out-of-memory error after the "
        "forward of their last micro-batch (once each), to see the recovery work.", "positive integers",
        [](const std::vector<int64_t>& v) -> std::string {
          for (auto x : v) if (x < 1) return "positive step numbers";
          return "";
        }));
    f.push_back(make_field<C::Debug, int64_t>("debug.inject_oom_rank", &C::debug, &C::Debug::inject_oom_rank,
        "Data-parallel fault injection: only this rank throws the `debug.inject_oom_steps` errors (-1 = every "
        "rank), to see the ranks agree on the recovery.", ">= -1", int_at_least(-1)));
    f.push_back(make_field<C::Debug, std::vector<int64_t>>("debug.inject_nonfinite.steps", &C::debug,
        &C::Debug::inject_steps,
        "Fault injection: make the step attempts with these 1-based numbers (the Nth batch offered to the optimizer step, skipped ones counted) non-finite, to see the guard work. Written "
        "`inject_nonfinite = {steps = [10, 11], where = \"loss\"}` under [debug].", "positive integers",
        [](const std::vector<int64_t>& v) -> std::string {
          for (auto x : v) if (x < 1) return "positive step numbers";
          return "";
        }));
    f.push_back(make_field<C::Debug, std::string>("debug.inject_nonfinite.where", &C::debug, &C::Debug::inject_where,
        "What the injection makes NaN: `loss`, `grad` (the first parameter's gradient), or a module name such as "
        "`layer2.0.conv1` (its forward output).", "loss, grad or a module name", nonempty));
    f.push_back(make_field<C::Debug, int64_t>("debug.pause.step", &C::debug, &C::Debug::pause_at_step,
        "Fault injection for kill tests: at this optimizer step the process prints `keel: debug pause ...` and "
        "waits (up to 10 minutes, then exits with an error) to be killed from outside; where is "
        "`debug.pause.where`. Written `pause = {step = 7, where = \"step\"}` under [debug] (0 = off).", ">= 0",
        int_at_least(0)));
    const std::vector<std::string> pause_points = {"step", "epoch_end", "checkpoint_write", "checkpoint_rename"};
    f.push_back(make_field<C::Debug, std::string>("debug.pause.where", &C::debug, &C::Debug::pause_where,
        "Where `debug.pause.step` holds: `step` (after the step, its logging and any checkpoint due), "
        "`epoch_end` (after the epoch that ends at that step has been evaluated, logged and checkpointed), "
        "`checkpoint_write` (inside the checkpoint write of that step, after model.pt is in the temporary "
        "directory and before the manifest and the rename), `checkpoint_rename` (when that step's checkpoint "
        "already exists and is being replaced: after the old one was moved aside to `step-N.old/`, before the "
        "new one takes its name).", choices_text(pause_points), one_of(pause_points)));
    // checkpoint
    f.push_back(make_field<C::Checkpoint, bool>("checkpoint.save_final", &C::checkpoint,
        &C::Checkpoint::save_final,
        "Write `checkpoints/final.pt` (weights) and `checkpoints/final.toml` (resolved config) atomically at the end.",
        "", nullptr));
    f.push_back(make_field<C::Checkpoint, int64_t>("checkpoint.every_steps", &C::checkpoint,
        &C::Checkpoint::every_steps,
        "Write a full checkpoint (weights, optimizer, scaler, schedule, guard, EMA, early stopping, RNG streams, "
        "loader position, resolved config) every N optimizer steps and at each epoch end (0 = off). "
        "`keel train ... --resume auto` continues from the newest valid one.", ">= 0", int_at_least(0)));
    f.push_back(make_field<C::Checkpoint, double>("checkpoint.every_minutes", &C::checkpoint,
        &C::Checkpoint::every_minutes, "Also write one when this many minutes passed since the last (0 = off).",
        ">= 0", float_in(0, kInf)));
    f.push_back(make_field<C::Checkpoint, int64_t>("checkpoint.keep_last", &C::checkpoint, &C::Checkpoint::keep_last,
        "Keep the newest N step checkpoints; older ones are removed (the newest valid one is always kept, and so "
        "is the best one with `checkpoint.keep_best`).", ">= 1", int_at_least(1)));
    const std::vector<std::string> best_monitors = {"", "test_loss", "test_top1", "train_loss"};
    f.push_back(make_field<C::Checkpoint, std::string>("checkpoint.keep_best", &C::checkpoint,
        &C::Checkpoint::keep_best,
        "Also keep the epoch-end checkpoint with the best value of this metric (evaluated after each epoch), "
        "whatever `keep_last` says; pruning never removes it. Setting it writes a checkpoint at each epoch end "
        "even without `every_steps` / `every_minutes`. The best so far (value, step, directory) is in every "
        "checkpoint's state.json and in `checkpoint` events of metrics.jsonl (\"best\": true); "
        "`keel export RUN_DIR --from best` exports it. Empty = off.",
        "\"\" | test_loss | test_top1 | train_loss", one_of(best_monitors)));
    f.push_back(make_field<C::Checkpoint, std::string>("checkpoint.keep_best_mode", &C::checkpoint,
        &C::Checkpoint::keep_best_mode,
        "Whether lower or higher `keep_best` is better; auto = max for accuracies, min for losses. A tie keeps "
        "the earlier checkpoint.", choices_text(modes), one_of(modes)));
    f.push_back(make_field<C::Checkpoint, std::string>("checkpoint.file_mode", &C::checkpoint,
        &C::Checkpoint::file_mode,
        "Permission bits, in octal, of every file keel writes into a checkpoint directory (and of "
        "`checkpoints/final.pt`), set exactly (the umask does not apply); checkpoint directories get the same "
        "bits with search (x) wherever read is allowed (0600 -> 0700, 0640 -> 0750). The default keeps "
        "checkpoints to their owner; \"0640\" shares them with the group.",
        "octal read/write bits including 0600",
        [](const std::string& s) -> std::string {
          return parse_file_mode(s) < 0 ? "an octal file mode of read/write bits that includes the owner's (0600), "
                                          "as a string: \"0600\", \"0640\", \"0644\" or \"0660\""
                                        : "";
        }));
    // dist
    const std::vector<std::string> backends = {"auto", "gloo", "nccl"};
    f.push_back(make_field<C::Dist, std::string>("dist.backend", &C::dist, &C::Dist::backend,
        "Data-parallel communication backend (c10d): `gloo` (CPU tensors, TCP), `nccl` (CUDA tensors), `auto` = "
        "nccl when run.device is CUDA, else gloo. The job's shape comes from the launcher: RANK, WORLD_SIZE, "
        "LOCAL_RANK, MASTER_ADDR, MASTER_PORT (torchrun, or SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), or "
        "`keel train --nproc N` (docs/distributed.md).", choices_text(backends), one_of(backends)));
    const std::vector<std::string> stores = {"tcp", "file"};
    f.push_back(make_field<C::Dist, std::string>("dist.store", &C::dist, &C::Dist::store,
        "Rendezvous store: `tcp` = a TCPStore served by rank 0 at MASTER_ADDR:MASTER_PORT; `file` = a FileStore "
        "at `dist.store_path` (a shared filesystem; no open port needed).", choices_text(stores), one_of(stores)));
    f.push_back(make_field<C::Dist, std::string>("dist.store_path", &C::dist, &C::Dist::store_path,
        "`dist.store = \"file\"`: the store file, on a filesystem every rank sees; use a fresh path per job "
        "(e.g. with $SLURM_JOB_ID in it): a file left by an earlier job would be read as this job's.", "", nullptr));
    f.push_back(make_field<C::Dist, std::string>("dist.interface", &C::dist, &C::Dist::interface,
        "Gloo: the network interface to use (e.g. `eth0`, `ib0`, `lo`); empty = the address this host's name "
        "resolves to (loopback if it resolves to none).", "", nullptr));
    f.push_back(make_field<C::Dist, double>("dist.timeout_seconds", &C::dist, &C::Dist::timeout_seconds,
        "The longest any rank waits: for every rank to join, for each collective. A rank that dies or hangs makes "
        "the others stop within about this long (sooner when its connections close) with an error naming it.",
        "> 0", [](const double& v) { return std::isfinite(v) && v > 0 ? "" : "a number of seconds > 0"; }));
    f.push_back(make_field<C::Dist, double>("dist.bucket_mb", &C::dist, &C::Dist::bucket_mb,
        "Gradient all-reduce bucket cap in MiB: gradients are sent in buckets of at most this size, each as soon "
        "as backward has produced all of its gradients. Smaller: earlier overlap, more messages.", "> 0",
        [](const double& v) { return std::isfinite(v) && v > 0 ? "" : "a size in MiB > 0"; }));
    f.push_back(make_field<C::Dist, bool>("dist.overlap", &C::dist, &C::Dist::overlap,
        "Send gradient buckets from the gradient hooks while backward is still running (true), or all after "
        "backward (false: the baseline for measuring the overlap).", "", nullptr));
    // tune
    const std::vector<std::string> tune_allow = {"precision"};
    f.push_back(make_field<C::Tune, std::vector<std::string>>("tune.allow", &C::tune, &C::Tune::allow,
        "Settings `keel tune` may change although they change the training mathematics: `precision` (bf16, fp16 "
        "on CUDA). The global batch (train.batch_size) is never changed.", "each of " + choices_text(tune_allow),
        [tune_allow](const std::vector<std::string>& v) {
          for (const auto& x : v) {
            if (std::find(tune_allow.begin(), tune_allow.end(), x) == tune_allow.end()) return "each one of " + choices_text(tune_allow);
          }
          return std::string();
        }));
    f.push_back(make_field<C::Tune, double>("tune.budget_minutes", &C::tune, &C::Tune::budget_minutes,
        "Wall-clock budget of `keel tune` (trials and the final re-measurement); `--budget-minutes` overrides it.",
        "> 0", [](const double& v) { return v > 0 && std::isfinite(v) ? "" : "a number > 0"; }));
    f.push_back(make_field<C::Tune, int64_t>("tune.warmup_steps", &C::tune, &C::Tune::warmup_steps,
        "Steps each trial runs before it is measured (start-up, allocator and oneDNN warm-up).", ">= 1",
        int_at_least(1)));
    f.push_back(make_field<C::Tune, int64_t>("tune.measure_steps", &C::tune, &C::Tune::measure_steps,
        "Steps each trial is measured over after its warm-up (rounded up to a multiple of warmup_steps).", ">= 1",
        int_at_least(1)));
    f.push_back(make_field<C::Tune, double>("tune.min_gain", &C::tune, &C::Tune::min_gain,
        "A trial replaces the best settings only when it is this fraction faster (measurement noise guard).",
        "[0, 1]", float_in(0, 1)));
    return f;
  }();
  return fields;
}

const Field* find_field(const std::string& key) {
  for (const auto& f : schema()) if (f.key == key) return &f;
  return nullptr;
}

// Edit distance, for "did you mean" hints.
size_t distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string unknown_key_message(const std::string& key, const Origin& where) {
  std::string best;
  size_t best_d = 4;
  for (const auto& f : schema()) {
    size_t d = distance(key, f.key);
    if (d < best_d) { best_d = d; best = f.key; }
  }
  std::string msg = where.str() + ": unknown key '" + key + "'";
  if (!best.empty()) msg += " (did you mean '" + best + "'?)";
  return msg + "; see docs/configuration.md for every key";
}

std::string toml_type_name(const toml::node& n) {
  switch (n.type()) {
    case toml::node_type::integer: return "integer";
    case toml::node_type::floating_point: return "float";
    case toml::node_type::boolean: return "boolean";
    case toml::node_type::string: return "string";
    case toml::node_type::array: return "array";
    case toml::node_type::table: return "table";
    default: return "date/time";
  }
}

// Converts a TOML node to the field's type, or throws naming the key and where.
Value convert(const Field& f, const toml::node& n, const Origin& where) {
  auto wrong = [&](const std::string& got) {
    return ConfigError(where.str() + ": key '" + f.key + "' expects " + f.type + ", got " + got);
  };
  if (f.auto_int) {
    if (auto v = n.as_integer()) return Value(v->get());
    if (auto v = n.as_string(); v && v->get() == "auto") return Value(kAuto);
    throw wrong(n.is_string() ? "\"" + n.as_string()->get() + "\"" : toml_type_name(n));
  }
  if (f.type == "integer") {
    if (auto v = n.as_integer()) return Value(v->get());
    throw wrong(toml_type_name(n));
  }
  if (f.type == "float") {
    if (auto v = n.as_floating_point()) return Value(v->get());
    if (auto v = n.as_integer()) return Value(static_cast<double>(v->get()));
    throw wrong(toml_type_name(n));
  }
  if (f.type == "boolean") {
    if (auto v = n.as_boolean()) return Value(v->get());
    throw wrong(toml_type_name(n));
  }
  if (f.type == "string") {
    if (auto v = n.as_string()) return Value(v->get());
    throw wrong(toml_type_name(n));
  }
  if (f.type == "integer array") {
    std::vector<int64_t> ints;
    const auto* a = n.as_array();
    if (!a) throw wrong(toml_type_name(n));
    for (const auto& e : *a) {
      if (auto i = e.as_integer()) ints.push_back(i->get());
      else throw wrong("array containing " + toml_type_name(e));
    }
    return Value(ints);
  }
  if (f.type == "string array") {
    std::vector<std::string> strs;
    const auto* a = n.as_array();
    if (!a) throw wrong(toml_type_name(n));
    for (const auto& e : *a) {
      if (auto v = e.as_string()) strs.push_back(v->get());
      else throw wrong("array containing " + toml_type_name(e));
    }
    return Value(strs);
  }
  // float array: a single number is accepted as a one-element array
  std::vector<double> out;
  if (auto a = n.as_array()) {
    for (const auto& e : *a) {
      if (auto d = e.as_floating_point()) out.push_back(d->get());
      else if (auto i = e.as_integer()) out.push_back(static_cast<double>(i->get()));
      else throw wrong("array containing " + toml_type_name(e));
    }
    return Value(out);
  }
  if (auto d = n.as_floating_point()) return Value(std::vector<double>{d->get()});
  if (auto i = n.as_integer()) return Value(std::vector<double>{static_cast<double>(i->get())});
  throw wrong(toml_type_name(n));
}

void assign(Config& c, const Field& f, const toml::node& n, const Origin& where) {
  Value v = convert(f, n, where);
  std::string expected = f.auto_int && n.is_string() ? std::string() : f.check(v);  // "auto" needs no range
  if (!expected.empty()) {
    throw ConfigError(where.str() + ": key '" + f.key + "' = " + to_text(v) + " is out of range; expected " +
                      expected);
  }
  f.set(c, v);
}

void apply_table(Config& c, const toml::table& t, const std::string& prefix, const std::string& file) {
  for (const auto& [k, node] : t) {
    const std::string key = prefix.empty() ? std::string(k.str()) : prefix + "." + std::string(k.str());
    Origin where{file, static_cast<int64_t>(node.source().begin.line), ""};
    if (const auto* sub = node.as_table()) {
      bool is_section = false;
      for (const auto& f : schema()) is_section |= f.key.rfind(key + ".", 0) == 0;
      if (!is_section) throw ConfigError(unknown_key_message(key, where));
      apply_table(c, *sub, key, file);
      continue;
    }
    const Field* f = find_field(key);
    if (!f) throw ConfigError(unknown_key_message(key, where));
    assign(c, *f, node, where);
  }
}

void apply_override(Config& c, const std::string& arg) {
  Origin where{"", 0, arg};
  const auto eq = arg.find('=');
  if (eq == std::string::npos || eq == 0) {
    throw ConfigError(where.str() + ": expected key=value, e.g. --set train.epochs=3");
  }
  const std::string key = arg.substr(0, eq), text = arg.substr(eq + 1);
  const Field* f = find_field(key);
  if (!f) throw ConfigError(unknown_key_message(key, where));
  // Typed like the file: the value is parsed as a TOML value; a bare word is taken as a string
  // only for string keys, so `--set model.name=resnet56` works and `--set train.epochs=x` fails.
  toml::table parsed;
  try {
    parsed = toml::parse("v = " + text);
  } catch (const toml::parse_error&) {
    if (f->auto_int && text == "auto") {
      parsed = toml::table{{"v", text}};
    } else if (f->type != "string") {
      throw ConfigError(where.str() + ": key '" + key + "' expects " + f->type + ", got '" + text + "'");
    }
    parsed = toml::table{{"v", text}};
  }
  assign(c, *f, *parsed.get("v"), where);
}

// Cross-key constraints, checked after every value is in place.
void validate(const Config& c, const std::string& file) {
  const std::string where = file.empty() ? "config" : file;
  auto channels_ok = [&](const std::vector<double>& v, const char* key) {
    if (v.size() != 1 && static_cast<int64_t>(v.size()) != c.model.in_channels) {
      throw ConfigError(where + ": key '" + key + "' has " + std::to_string(v.size()) +
                        " values; expected 1 or model.in_channels = " + std::to_string(c.model.in_channels));
    }
  };
  channels_ok(c.data.mean, "data.mean");
  channels_ok(c.data.std, "data.std");
  if (c.data.eval_resize != 0 && c.data.eval_resize < c.data.image_size) {
    throw ConfigError(where + ": key 'data.eval_resize' = " + std::to_string(c.data.eval_resize) +
                      " must be 0 or >= data.image_size = " + std::to_string(c.data.image_size));
  }
  if (c.augment.random_resized_crop && c.data.dataset == "image_folder") {
    throw ConfigError(where + ": key 'augment.random_resized_crop' = true with data.dataset = \"image_folder\": the "
                      "loader workers already take a random-resized crop of every image (data.rrc_scale, "
                      "data.rrc_ratio); set augment.random_resized_crop = false");
  }
  if (c.data.dataset == "image_folder" && c.model.in_channels != 1 && c.model.in_channels != 3) {
    throw ConfigError(where + ": data.dataset = \"image_folder\" decodes to 1 (gray) or 3 (RGB) channels, but "
                      "model.in_channels = " + std::to_string(c.model.in_channels));
  }
  if (!c.memory.budget.empty()) {
    // Parsed here so that a bad budget is a config error naming the key.
    try {
      memory::parse_cpu_budget(c.memory.budget);
    } catch (const std::exception& e) {
      throw ConfigError(where + ": key 'memory.budget' = \"" + c.memory.budget + "\": " + e.what());
    }
  }
  if (c.train.micro_batch > 0 && c.train.batch_size % c.train.micro_batch != 0) {
    throw ConfigError(where + ": key 'train.micro_batch' = " + std::to_string(c.train.micro_batch) +
                      " must divide train.batch_size = " + std::to_string(c.train.batch_size));
  }
  const auto& sc = c.schedule;
  const bool step_family = sc.name == "step" || sc.name == "multistep" || sc.name == "exponential" ||
                           sc.name == "reduce_on_plateau";
  if (sc.warmup_steps > 0 && !step_family) {
    throw ConfigError(where + ": key 'schedule.warmup_steps' = " + std::to_string(sc.warmup_steps) +
                      " applies to step | multistep | exponential | reduce_on_plateau; schedule.name = \"" + sc.name +
                      "\" warms up over schedule.warmup_fraction");
  }
  if (sc.name == "multistep" && sc.milestones.empty()) {
    throw ConfigError(where + ": key 'schedule.milestones' is empty; schedule.name = \"multistep\" needs at "
                      "least one, e.g. milestones = [30, 60, 80]");
  }
  if (c.optim.nesterov && c.optim.name == "sgd" && c.optim.momentum <= 0) {
    throw ConfigError(where + ": key 'optim.nesterov' = true needs optim.momentum > 0 (got " +
                      fmt_double(c.optim.momentum) + ")");
  }
}

}  // namespace

unsigned Config::Checkpoint::file_mode_bits() const {
  const int v = parse_file_mode(file_mode);
  if (v < 0) throw ConfigError("key 'checkpoint.file_mode' = \"" + file_mode + "\" is not an octal file mode");
  return static_cast<unsigned>(v);
}

std::string Origin::str() const {
  if (!set_arg.empty()) return "--set " + set_arg;
  if (file.empty()) return "<defaults>";
  return line > 0 ? file + ":" + std::to_string(line) : file;
}

Config parse(const std::string& toml_text, const std::string& name, const std::vector<std::string>& overrides) {
  Config c;
  toml::table t;
  try {
    t = toml::parse(toml_text, name);
  } catch (const toml::parse_error& e) {
    throw ConfigError(name + ":" + std::to_string(e.source().begin.line) + ": TOML syntax error: " +
                      std::string(e.description()));
  }
  apply_table(c, t, "", name);
  for (const auto& o : overrides) apply_override(c, o);
  validate(c, name);
  return c;
}

Config load(const std::string& path, const std::vector<std::string>& overrides) {
  if (path.empty()) return parse("", "<defaults>", overrides);
  std::ifstream in(path);
  if (!in) throw ConfigError(path + ": cannot open config file");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse(ss.str(), path, overrides);
}

std::string to_toml(const Config& c) {
  std::string out = "# keel resolved configuration: every key, defaults included\n";
  std::string section;
  for (const auto& f : schema()) {
    const std::string sec = f.key.substr(0, f.key.find('.'));
    if (sec != section) {
      out += "\n[" + sec + "]\n";
      section = sec;
    }
    out += f.key.substr(sec.size() + 1) + " = " + field_text(f, f.get(c)) + "\n";
  }
  return out;
}

std::string reference_markdown() {
  const Config defaults;
  std::string out =
      "# keel configuration reference\n\n"
      "Generated by `keel config --reference` from the schema in `src/keel/config/config.cpp`; a test keeps "
      "this file in step with it.\n\n"
      "A config file is TOML with the sections below. Any key can be overridden on the command line with "
      "`--set section.key=value`; the value is parsed as TOML (`--set train.epochs=3`, "
      "`--set data.mean=[0.5]`), and a bare word is accepted for string keys (`--set model.name=resnet56`).\n"
      "An unknown key, a wrong type or an out-of-range value is an error naming the key and the file and line "
      "(or the `--set` argument). The resolved configuration, every key included, is written to "
      "`<run.dir>/<run.name>/config.resolved.toml`.\n";
  std::string section;
  for (const auto& f : schema()) {
    const std::string sec = f.key.substr(0, f.key.find('.'));
    if (sec != section) {
      out += "\n## [" + sec + "]\n\n| key | type | default | allowed | meaning |\n|---|---|---|---|---|\n";
      section = sec;
    }
    std::string def = field_text(f, f.get(defaults));
    out += "| `" + f.key + "` | " + f.type + " | `" + def + "` | " + f.range + " | " + f.doc + " |\n";
  }
  return out;
}

}  // namespace keel::config
