// Fit's checkpoint phases (fit.h): which checkpoint to resume from, the one list of what a checkpoint holds
// (RunState), writing one, and resuming from one.
#include "keel/run/fit.h"

#include <thread>

#include <fmt/format.h>
#include <torch/torch.h>

#include "keel/models/state_dict.h"

namespace keel::run {
namespace {

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

}  // namespace

// debug.pause: at the configured step and place, announce it and wait to be killed (kill tests).
void debug_pause(const config::Config& c, const char* where, int64_t step) {
  if (c.debug.pause_at_step != step || c.debug.pause_where != where) return;
  fmt::print("keel: debug pause at step {} ({}); waiting to be killed\n", step, where);
  std::fflush(stdout);
  std::this_thread::sleep_for(std::chrono::minutes(10));
  throw std::runtime_error(fmt::format("debug.pause: step {} ({}): not killed within 10 minutes", step, where));
}

void Fit::open_checkpoint(const std::string& resume) {
  ckpt_dir_ = t_.run_dir_ + "/checkpoints";
  // Resume: the newest checkpoint that verifies ("auto"), or the one named.
  if (resume == "auto") {
    std::vector<std::string> skipped;
    if (auto p = checkpoint::find_latest_valid(ckpt_dir_, &skipped)) resume_dir_ = *p;
    for (const auto& why : skipped) fmt::print("checkpoint: skipped {}\n", why);
    if (resume_dir_.empty() && !skipped.empty()) {
      // Starting afresh would overwrite the run's logs and, at the next save, prune what is left.
      throw std::runtime_error(fmt::format(
          "--resume auto: none of the {} checkpoints in {} verifies (listed above); refusing to start from scratch "
          "over them: move the directory away to start afresh, or name a checkpoint with --resume DIR",
          skipped.size(), ckpt_dir_));
    }
    if (resume_dir_.empty()) fmt::print("checkpoint: no valid checkpoint in {}; starting from scratch\n", ckpt_dir_);
  } else if (!resume.empty()) {
    resume_dir_ = resume;
  }
  if (!resume_dir_.empty()) ckpt_ = checkpoint::load(resume_dir_);
}

// Everything a checkpoint holds, each part next to its owner's state()/load_state(). Saving and resuming
// walk this list (RunState): a new checkpointed part is one more entry here.
void Fit::register_state() {
  models::Net& model = *t_.model_;
  state_.add(
      "model", [&model](checkpoint::CheckpointContents& c) { c.model = models::state_dict_of(model); },
      [&model](const checkpoint::CheckpointContents& c) { models::load_state_dict(model, c.model); });
  state_.add(
      "optimizer", [this](checkpoint::CheckpointContents& c) { checkpoint::capture_optimizer(c, *t_.optimizer_); },
      [this](const checkpoint::CheckpointContents& c) { checkpoint::restore_optimizer(c, *t_.optimizer_); });
  // The step runner: applied steps, guard counters, loss scaler, resolved micro-batch.
  state_.add_json(
      "runner", [this] { return runner_->state(); }, [this](const nlohmann::json& s) { runner_->load_state(s); });
  state_.add_json(
      "schedule", [this] { return schedule_->state(); }, [this](const nlohmann::json& s) { schedule_->load_state(s); },
      /*required=*/false);
  state_.add_json(
      "rng", [] { return checkpoint::rng_state_json(); },
      [](const nlohmann::json& s) {
        for (const auto& note : checkpoint::restore_rng_state(s)) fmt::print("checkpoint: {}\n", note);
      });
  // The augmentation stream (one process; data-parallel runs reseed it per batch instead).
  state_.add_json(
      "augment_rng",
      [this] {
        at::Tensor ag = aug_->rng_state().contiguous();
        return checkpoint::base64_encode(std::string(reinterpret_cast<const char*>(ag.data_ptr<uint8_t>()),
                                                     static_cast<size_t>(ag.numel())));
      },
      [this](const nlohmann::json& s) {
        if (t_.world_ != 1) return;
        const std::string a = checkpoint::base64_decode(s.get<std::string>());
        aug_->set_rng_state(
            at::from_blob(const_cast<char*>(a.data()), {static_cast<int64_t>(a.size())}, at::kByte).clone());
      });
  state_.add_json(
      "early_stop", [this] { return stopper_ ? stopper_->state() : nlohmann::json(); },
      [this](const nlohmann::json& s) {
        if (stopper_) stopper_->load_state(s);
      },
      /*required=*/false);
  state_.add_json(
      "best_epoch", [this] { return nlohmann::json(res_.best_epoch); },
      [this](const nlohmann::json& s) { res_.best_epoch = s.get<int64_t>(); }, /*required=*/false);
  state_.add_json(
      "eval_micro_batch", [this] { return nlohmann::json(eval_micro_); },
      [this](const nlohmann::json& s) { eval_micro_ = s.get<int64_t>(); }, /*required=*/false);
  // The EMA weights and the early-stopping best weights, as extra state dicts (ema.pt, best.pt).
  state_.add(
      "ema",
      [this](checkpoint::CheckpointContents& c) {
        if (ema_) c.extra["ema"] = models::state_dict_of(ema_->model());
      },
      [this](const checkpoint::CheckpointContents& c) {
        if (ema_) models::load_state_dict(ema_->model(), c.extra.at("ema"));
      });
  state_.add(
      "best",
      [this](checkpoint::CheckpointContents& c) {
        if (!best_weights_.empty()) c.extra["best"] = best_weights_;
      },
      [this](const checkpoint::CheckpointContents& c) {
        if (c.extra.count("best")) best_weights_ = c.extra.at("best");
      });
  state_.add_json(
      "best_checkpoint", [this] { return best_ckpt_; }, [this](const nlohmann::json& s) { best_ckpt_ = s; },
      /*required=*/false);
  // Where the loop stands: the epoch, the batches consumed in it, the epoch's sums, the training time.
  state_.add_json(
      "epoch", [this] { return nlohmann::json(pos_epoch_); },
      [this](const nlohmann::json& s) { start_epoch_ = s.get<int64_t>(); });
  state_.add_json(
      "batch_in_epoch", [this] { return nlohmann::json(pos_batch_); },
      [this](const nlohmann::json& s) { skip_batches_ = s.get<int64_t>(); });
  state_.add_json(
      "accumulators",
      [this] {
        return nlohmann::json{
            {"loss_sum", pos_sums_.loss_sum}, {"correct", pos_sums_.correct}, {"seen", pos_sums_.seen}};
      },
      [this](const nlohmann::json& s) {
        resumed_sums_ = {s.at("loss_sum").get<double>(), s.at("correct").get<int64_t>(), s.at("seen").get<int64_t>()};
      });
  state_.add_json(
      "train_seconds", [this] { return nlohmann::json(train_seconds_); },
      [this](const nlohmann::json& s) { train_seconds_ = s.get<double>(); });
  // The advice rules already printed: each piece of advice reaches the console once per run, resumes included.
  state_.add_json(
      "advised", [this] { return nlohmann::json(advised_); },
      [this](const nlohmann::json& s) { advised_ = s.get<std::set<std::string>>(); }, /*required=*/false);
  // Read before the run is built (open_checkpoint / prepare: train.deterministic keeps the thread count).
  state_.add_json(
      "threads", [] { return nlohmann::json(at::get_num_threads()); }, [](const nlohmann::json&) {},
      /*required=*/false);
}

void Fit::restore() {
  if (!ckpt_) return;
  const std::string problem = checkpoint::compatibility_problem(*ckpt_, cfg_.model.name,
                                                                models::state_dict_of(*t_.model_), config::to_toml(cfg_));
  if (!problem.empty()) throw std::runtime_error(resume_dir_ + ": cannot resume this run from it: " + problem);
  state_.load(*ckpt_);
  fmt::print("keel: resumed from {} (step {}, epoch {}, batch {} of the epoch)\n", resume_dir_, runner_->steps(),
             start_epoch_ + 1, skip_batches_);
  ckpt_.reset();  // free its tensors
}

void Fit::save_checkpoint(int64_t epoch, int64_t batch, const train::HostSums& sums, bool is_best) {
  if (t_.rank_ != 0) return;  // rank 0 alone writes checkpoints (the ranks' states are identical)
  pos_epoch_ = epoch;
  pos_batch_ = batch;
  pos_sums_ = sums;
  checkpoint::CheckpointContents c;
  state_.save(c);
  c.config_toml = config::to_toml(cfg_);
  c.step = runner_->steps();
  c.epoch = epoch;
  c.model_name = cfg_.model.name;
  const int64_t step = runner_->steps();
  const std::string written = checkpoint::save(
      ckpt_dir_, c,
      [&](const std::string& path) {
        if (ends_with(path, "/model.pt")) debug_pause(cfg_, "checkpoint_write", step);
        if (ends_with(path, ".old")) debug_pause(cfg_, "checkpoint_rename", step);
      },
      cfg_.checkpoint.file_mode_bits());
  std::set<std::string> keep;
  if (!best_ckpt_.is_null()) keep.insert(best_ckpt_.at("dir").get<std::string>());
  checkpoint::prune(ckpt_dir_, cfg_.checkpoint.keep_last, keep);
  nlohmann::json ev = {{"event", "checkpoint"}, {"step", step}, {"path", written}};
  if (is_best) ev["best"] = true;
  log_->event(ev);
  last_save_ = Clock::now();
}

}  // namespace keel::run
