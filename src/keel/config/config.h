// Typed run configuration: TOML file + `--set key=value` overrides -> validated Config.
// Every key lives in one schema (config.cpp); docs/configuration.md is generated from it.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace keel::config {

// The stored value of an integer key written as "auto" (train.micro_batch).
inline constexpr int64_t kAuto = -1;

// A configuration error a user can act on: names the key, where it came from and what was expected.
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Config {
  struct Run {
    std::string name = "default";   // run directory name under dir
    std::string dir = "runs";       // parent of run directories
    int64_t seed = 0;               // seeds model init, sampler and augmentation
    int64_t threads = 0;            // intra-op threads; 0 = all cores
    std::string device = "auto";    // auto | cpu | cuda | cuda:N
  } run;
  struct Data {
    std::string dataset = "fashion-mnist";  // idx | fashion-mnist | mnist | cifar10 | cifar100 | image_folder | synthetic
    std::string root = "/usr/share/datasets/fashion-mnist";
    int64_t workers = -1;   // loader threads; -1 = chosen from cores
    int64_t prefetch = 2;   // ready batches queued ahead
    std::vector<double> mean = {0.2860};  // per-channel normalisation of [0,1] pixels
    std::vector<double> std = {0.3530};
    int64_t train_limit = 0;  // use only the first N training samples (0 = all); for quick runs
    int64_t test_limit = 0;   // likewise for the test split
    bool random_flip = true;  // horizontal flip augmentation (training only)
    int64_t random_crop_padding = 2;  // pad-and-crop augmentation (0 = off)
    int64_t image_size = 224;         // image_folder / synthetic: output side
    std::vector<double> rrc_scale = {0.08, 1.0};  // image_folder training crop: area fraction range
    std::vector<double> rrc_ratio = {3.0 / 4.0, 4.0 / 3.0};  // and aspect ratio range
    int64_t eval_resize = 0;          // image_folder eval: shorter side before centre crop (0 = size*256/224)
    int64_t synthetic_samples = 10000;  // synthetic: training samples (test split: a tenth)
    std::string on_error = "skip";    // skip | fail: unreadable samples
  } data;
  struct Augment {  // batched on the training device (data/augment.h)
    bool random_resized_crop = false;  // per-sample RRC back to the sample's size (uniform datasets)
    double mixup_alpha = 0.0;          // Mixup, lambda ~ Beta(a, a); 0 = off
    double cutmix_alpha = 0.0;         // CutMix, lambda ~ Beta(a, a); 0 = off
    double mix_prob = 1.0;             // share of batches mixed when an alpha is > 0
  } augment;
  struct Model {
    std::string name = "resnet20";
    int64_t in_channels = 1;
    int64_t num_classes = 10;
    std::string weights;  // optional torch.save() state dict to start from
    bool checkpoint_stages = false;  // activation checkpointing per ResNet stage
    int64_t image_size = 0;          // ViTs: input side (0 = 224)
    int64_t patch_size = 0;          // ViTs: patch side (0 = the name's, e.g. 16 for vit_tiny_16)
    std::string attention = "auto";  // ViTs: auto | keel | sdpa
    bool sync_bn = false;            // data-parallel: BatchNorm statistics over every rank's samples
  } model;
  struct Train {
    int64_t epochs = 2;
    int64_t batch_size = 128;
    int64_t eval_batch_size = 500;
    double label_smoothing = 0.0;
    bool channels_last = true;
    std::string precision = "fp32";  // fp32 | bf16 | fp16
    int64_t micro_batch = 0;         // samples per forward/backward (0 = batch_size; kAuto = planned)
    double grad_clip_norm = 0.0;     // 0 = off
    double grad_clip_value = 0.0;    // 0 = off
    int64_t log_every = 50;          // steps between progress lines (and loss read-backs)
    int64_t max_steps = 0;           // stop after this many optimizer steps (0 = no limit)
    bool deterministic = false;      // deterministic algorithms + fixed intra-op threads: bit-for-bit runs
  } train;
  struct Optim {
    std::string name = "sgd";  // sgd | adamw
    double lr = 0.2;           // peak learning rate
    double momentum = 0.9;
    bool nesterov = true;
    double weight_decay = 5e-4;  // not applied to biases and norm weights
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double no_decay_lr_factor = 1.0;  // lr of the no-decay group (biases, norm weights) = lr x this
    std::string lr_scaling = "none";  // none | linear | sqrt: scale lr by train.batch_size / base_batch_size
    int64_t base_batch_size = 256;    // the batch size optim.lr was tuned for
  } optim;
  struct Schedule {
    // onecycle | warmup_cosine | constant | step | multistep | exponential | reduce_on_plateau
    std::string name = "onecycle";
    double warmup_fraction = 0.15;  // onecycle / warmup_cosine: share of all steps spent warming up
    double start_factor = 0.04;     // lr at step 0 = lr * start_factor
    double final_factor = 0.001;    // onecycle / warmup_cosine: lr at the last step = lr * final_factor
    int64_t warmup_steps = 0;       // step / multistep / exponential / reduce_on_plateau: warm-up steps
    std::string interval = "epoch";  // epoch | step: unit of step_size, milestones, exponential decay
    int64_t step_size = 30;          // step: decay every step_size intervals
    std::vector<int64_t> milestones;  // multistep: decay at these interval counts
    double gamma = 0.1;               // step / multistep / exponential: decay multiplier
    std::string plateau_monitor = "test_loss";  // schedule.plateau.monitor
    std::string plateau_mode = "auto";          // schedule.plateau.mode: auto | min | max
    double plateau_factor = 0.1;                // schedule.plateau.factor
    int64_t plateau_patience = 10;              // schedule.plateau.patience
    double plateau_threshold = 1e-4;            // schedule.plateau.threshold
    std::string plateau_threshold_mode = "rel";  // schedule.plateau.threshold_mode: rel | abs
    int64_t plateau_cooldown = 0;               // schedule.plateau.cooldown
    double plateau_min_lr = 0.0;                // schedule.plateau.min_lr
  } schedule;
  struct Amp {
    std::string scaler = "auto";  // auto (on for fp16) | on | off
    double init_scale = 65536.0;
    double growth_factor = 2.0;
    double backoff_factor = 0.5;
    int64_t growth_interval = 2000;
  } amp;
  struct Guard {
    bool enabled = true;
    int64_t max_consecutive_skips = 3;
    int64_t max_rollbacks = 5;
    double lr_factor = 0.5;
    int64_t snapshot_every = 50;
    bool locate = true;
    double spike_factor = 10.0;
  } guard;
  struct EarlyStop {
    bool enabled = false;
    std::string monitor = "test_loss";  // test_loss | test_top1 | train_loss
    std::string mode = "auto";          // auto (max for accuracies) | min | max
    int64_t patience = 3;
    double min_delta = 0.0;
    bool restore_best = true;
  } early_stop;
  struct EmaCfg {
    bool enabled = false;
    double decay = 0.999;
  } ema;
  struct Memory {
    std::string budget;        // "" = none; "3GiB", "512MiB", "0.8", "80%"
    bool oom_recovery = true;  // halve the micro-batch and replay on out-of-memory
    double plan_margin = 0.1;  // the planner keeps this fraction of the budget free
  } memory;
  struct Monitor {
    bool enabled = true;  // step-time breakdown, per-window logging; false only to measure their overhead
  } monitor;
  struct Debug {
    int64_t stop_after_steps = 0;           // simulate an interruption (0 = off)
    bool log_sample_ids = false;            // write <run>/sample_ids.jsonl (sample audit)
    std::vector<int64_t> inject_oom_steps;  // attempts whose first forward throws out-of-memory
    int64_t inject_oom_rank = -1;           // data-parallel: only this rank injects them (-1 = every rank)
    std::vector<int64_t> inject_steps;     // debug.inject_nonfinite.steps
    std::string inject_where = "loss";     // debug.inject_nonfinite.where
    int64_t pause_at_step = 0;             // debug.pause.step: hold the process there (kill tests); 0 = off
    std::string pause_where = "step";      // debug.pause.where: step | epoch_end | checkpoint_write
  } debug;
  struct Checkpoint {
    bool save_final = true;
    int64_t every_steps = 0;    // 0 = off
    double every_minutes = 0;   // 0 = off
    int64_t keep_last = 3;
    std::string keep_best;              // "" (off) | test_loss | test_top1 | train_loss
    std::string keep_best_mode = "auto";  // auto | min | max
    std::string file_mode = "0600";       // octal permission bits of checkpoint files
    // file_mode as bits (0600 -> 384); the schema has validated it.
    unsigned file_mode_bits() const;
  } checkpoint;
  struct Dist {                      // data-parallel training (src/keel/dist; docs/distributed.md)
    std::string backend = "auto";    // auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    std::string store = "tcp";       // tcp (MASTER_ADDR:MASTER_PORT) | file (store_path)
    std::string store_path;          // file store path, fresh per job, on a filesystem every rank sees
    std::string interface;           // Gloo network interface ("" = the host name's address)
    double timeout_seconds = 120.0;  // every wait: rendezvous, each collective
    double bucket_mb = 25.0;         // gradient all-reduce bucket cap (MiB)
    bool overlap = true;             // send buckets from gradient hooks during backward
  } dist;
  struct Tune {                                // keel tune (src/keel/tune/tune.h)
    std::vector<std::string> allow;            // settings that change the mathematics: "precision"
    double budget_minutes = 10.0;
    int64_t warmup_steps = 5;
    int64_t measure_steps = 20;
    double min_gain = 0.03;
  } tune;
};

// Where a value came from, for error messages.
struct Origin {
  std::string file;  // config file path, or empty for --set
  int64_t line = 0;
  std::string set_arg;  // the --set argument, when it came from the command line
  std::string str() const;
};

// Parses `path` (may be empty: all defaults) then applies each "key=value" override in order.
// Throws ConfigError naming key + file:line (or the --set argument) for unknown keys, wrong
// types, out-of-range values and violated cross-key constraints.
Config load(const std::string& path, const std::vector<std::string>& overrides = {});

// Parses TOML text (for tests); `name` is used as the file name in errors.
Config parse(const std::string& toml_text, const std::string& name,
             const std::vector<std::string>& overrides = {});

// Every key with its resolved value, as TOML.
std::string to_toml(const Config& c);

// The configuration reference (Markdown): every key, type, default, allowed range, meaning.
std::string reference_markdown();

}  // namespace keel::config
