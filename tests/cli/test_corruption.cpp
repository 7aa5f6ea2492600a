// What `keel train --resume` does with damaged checkpoints, end to end (docs/checkpoints.md lists these
// behaviours): a truncated file, a flipped byte and a missing manifest in the newest checkpoint are each
// reported with the file and the reason and the previous valid checkpoint is used; with every checkpoint
// damaged the run refuses to start over them; a checkpoint of another model, or a named damaged one, is
// refused with what differs or what is wrong.
#include <gtest/gtest.h>

#include "../test_util.h"
#include "cli_util.h"
#include <gmock/gmock.h>

#include <filesystem>
#include <fstream>

using testing::HasSubstr;
namespace fs = std::filesystem;

namespace {

std::string train_cmd(const std::string& dir, const std::string& extra) {
  return "train configs/default.toml --set run.dir=" + dir + " --set run.name=r --set data.train_limit=256"
         " --set data.test_limit=100 --set train.batch_size=32 --set train.epochs=2 --set checkpoint.every_steps=3"
         " --set checkpoint.keep_last=5 " + extra;
}

std::string read_bytes(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}
void write_bytes(const std::string& p, const std::string& b) { std::ofstream(p, std::ios::binary) << b; }

class Corruption : public ::testing::Test {
 protected:
  // One interrupted run (checkpoints at steps 3 and 6) kept pristine in base/; each case works on a copy.
  void SetUp() override {
    dir_ = keel::test::fresh_dir(std::string("corrupt-") +
                                 ::testing::UnitTest::GetInstance()->current_test_info()->name());
    auto r = keel::test::run_keel(train_cmd(dir_ + "/base", "--set debug.stop_after_steps=7"));
    ASSERT_EQ(r.code, 0) << r.out;
    ckpts_ = dir_ + "/r/checkpoints";
  }
  // A fresh copy of the pristine run as dir_/r.
  void restore() {
    fs::remove_all(dir_ + "/r");
    fs::copy(dir_ + "/base/r", dir_ + "/r", fs::copy_options::recursive);
    ASSERT_TRUE(fs::exists(ckpts_ + "/step-00000006/manifest.json"));
  }
  // Resumes and stops at step 4 (nothing newer is written, so the damage stays for the next look).
  keel::test::RunResult resume(const std::string& extra = "") {
    return keel::test::run_keel(train_cmd(dir_, "--set debug.stop_after_steps=4 --resume auto " + extra));
  }
  std::string dir_, ckpts_;
};

}  // namespace

// The newest checkpoint damaged three ways: each time reported (file, reason) and step 3 used instead.
TEST_F(Corruption, DamagedNewestIsReportedAndThePreviousUsed) {
  {
    SCOPED_TRACE("truncated model.pt");
    restore();
    const std::string f = ckpts_ + "/step-00000006/model.pt";
    fs::resize_file(f, fs::file_size(f) / 2);
    auto r = resume();
    EXPECT_EQ(r.code, 0) << r.out;
    EXPECT_THAT(r.out, HasSubstr("checkpoint: skipped " + ckpts_ + "/step-00000006: " + f + ": size"));
    EXPECT_THAT(r.out, HasSubstr("(truncated or overwritten)"));
    EXPECT_THAT(r.out, HasSubstr("resumed from " + ckpts_ + "/step-00000003 (step 3"));
  }
  {
    SCOPED_TRACE("flipped byte in optimizer.pt");
    restore();
    const std::string f = ckpts_ + "/step-00000006/optimizer.pt";
    std::string b = read_bytes(f);
    b[b.size() / 2] ^= 0x10;
    write_bytes(f, b);
    auto r = resume();
    EXPECT_EQ(r.code, 0) << r.out;
    EXPECT_THAT(r.out, HasSubstr("checkpoint: skipped " + ckpts_ + "/step-00000006: " + f + ": crc32"));
    EXPECT_THAT(r.out, HasSubstr("(contents corrupted)"));
    EXPECT_THAT(r.out, HasSubstr("resumed from " + ckpts_ + "/step-00000003 (step 3"));
  }
  {
    SCOPED_TRACE("missing manifest");
    restore();
    fs::remove(ckpts_ + "/step-00000006/manifest.json");
    auto r = resume();
    EXPECT_EQ(r.code, 0) << r.out;
    EXPECT_THAT(r.out, HasSubstr("checkpoint: skipped " + ckpts_ + "/step-00000006: " + ckpts_ +
                                 "/step-00000006/manifest.json: missing (expected the manifest written last; the "
                                 "checkpoint is incomplete)"));
    EXPECT_THAT(r.out, HasSubstr("resumed from " + ckpts_ + "/step-00000003 (step 3"));
  }
}

// What is refused, saying why: every checkpoint damaged, another model, a damaged checkpoint named.
TEST_F(Corruption, RefusalsSayWhy) {
  {
    SCOPED_TRACE("every checkpoint damaged");
    restore();
    fs::remove(ckpts_ + "/step-00000006/manifest.json");
    fs::resize_file(ckpts_ + "/step-00000003/state.json", 3);
    const std::string metrics_before = read_bytes(dir_ + "/r/metrics.jsonl");
    auto r = resume();
    EXPECT_EQ(r.code, 1) << r.out;
    EXPECT_THAT(r.out, HasSubstr("none of the 2 checkpoints in " + ckpts_ + " verifies"));
    EXPECT_THAT(r.out, HasSubstr("refusing to start from scratch"));
    EXPECT_EQ(read_bytes(dir_ + "/r/metrics.jsonl"), metrics_before) << "the run's log is left alone";
    EXPECT_TRUE(fs::exists(ckpts_ + "/step-00000003/model.pt"));
  }
  {
    SCOPED_TRACE("another model");
    restore();
    auto r = resume("--set model.name=resnet32 --set model.num_classes=12");
    EXPECT_EQ(r.code, 1) << r.out;
    EXPECT_THAT(r.out, HasSubstr(ckpts_ + "/step-00000006: cannot resume this run from it"));
    EXPECT_THAT(r.out, HasSubstr("model name: checkpoint 'resnet20', current 'resnet32'"));
    EXPECT_THAT(r.out, HasSubstr("model.num_classes: checkpoint 10, current 12"));
  }
  {
    SCOPED_TRACE("named damaged checkpoint");
    restore();
    const std::string f = ckpts_ + "/step-00000006/state.json";
    fs::resize_file(f, 10);
    auto r = keel::test::run_keel(train_cmd(dir_, "--resume " + ckpts_ + "/step-00000006"));
    EXPECT_EQ(r.code, 1) << r.out;
    EXPECT_THAT(r.out, HasSubstr("checkpoint " + ckpts_ + "/step-00000006 is not valid: " + f + ": size 10 bytes"));
  }
}
