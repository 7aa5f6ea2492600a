#!/usr/bin/env bash
# Memory acceptance bench (#5): ResNet-50 at 128x128 px, train.batch_size 256, memory.budget 3GiB on CPU.
#   plain : fixed micro-batch 256, no out-of-memory recovery -> must fail with a clear out-of-memory error
#   auto  : train.micro_batch = "auto" -> the planner picks the micro-batch; trains through
#   ckpt  : auto + model.checkpoint_stages = true (activation checkpointing; larger micro-batch, more compute)
#   bf16  : auto + train.precision = bf16
# Prints one line per setting: outcome, micro-batch, peak memory, images/s (median of the run's steps as
# keel reports them). Usage: bench/memory/run.sh [BUILD_DIR] [STEPS]   (keel binary in BUILD_DIR, default build)
set -u
build=${1:-build}
steps=${2:-3}
keel="$build/keel"
out=$(mktemp -d /tmp/keel-bench-memory.XXXXXX)
common=(--set run.dir="\"$out\"" --set data.dataset=synthetic --set data.image_size=128 --set data.synthetic_samples=1024
        --set model.name=resnet50 --set model.in_channels=3 --set model.num_classes=10 --set data.mean=[0.5]
        --set data.std=[0.25] --set train.batch_size=256 --set train.eval_batch_size=256 --set train.max_steps="$steps"
        --set train.log_every=1 --set memory.budget=3GiB --set checkpoint.save_final=false)
run() {  # name, extra --set args...
  local name=$1; shift
  local log="$out/$name.log"
  "$keel" train configs/default.toml "${common[@]}" --set run.name="$name" "$@" --json >"$log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    printf '%-6s FAILED (exit %d): %s\n' "$name" "$rc" "$(grep -m1 -i 'error' "$log" | cut -c1-220)"
    return
  fi
  tail -1 "$log" | python3 -c '
import json, sys
j = json.loads(sys.stdin.read())
print("%-6s trained: micro-batch %d, peak memory %.2f GiB, %.1f images/s, %d OOM recoveries" % (
    sys.argv[1], j["micro_batch"], j["peak_memory_bytes"] / 2**30, j["images_per_second"], j["oom_recoveries"]))' "$name"
  grep -A12 "planned" "$log" | grep -E "planned|micro-batch" | sed 's/^/         /' | head -12
}
echo "keel memory bench: ResNet-50 128px, batch 256, budget 3GiB, $steps steps; logs in $out"
run plain --set train.micro_batch=256 --set memory.oom_recovery=false
run auto --set train.micro_batch=auto
run ckpt --set train.micro_batch=auto --set model.checkpoint_stages=true
run bf16 --set train.micro_batch=auto --set train.precision=bf16
