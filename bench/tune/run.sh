#!/usr/bin/env bash
# keel tune acceptance (#10). Usage: bench/tune/run.sh [BUILD_DIR] [CASES]   (default build, "default bad resnet50")
#   default  : the default recipe (configs/default.toml) as it is, budget ${BUDGET_DEFAULT:-8} min
#   bad      : the default recipe made deliberately bad (1 worker, prefetch 1, fp32, micro-batch 8), budget
#              ${BUDGET_BAD:-8} min; then the tuned file is trained to the end (test top-1 vs the default's)
#   resnet50 : ResNet-50 at 128 px, batch 64, memory.budget 1.5GiB (synthetic data), budget ${BUDGET_R50:-15} min
# WARMUP / MEASURE (default 5 / 20): tune.warmup_steps / measure_steps of the default and bad cases;
# WARMUP_R50 / MEASURE_R50 (default 2 / 6) those of the resnet50 case (a step there takes seconds on 2 cores).
# Each prints keel tune's table and speed-up (start vs tuned, re-measured alternately in the same run).
set -u
repo="$(cd "$(dirname "$0")/../.." && pwd)"
build=${1:-$repo/build}
cases=${2:-default bad resnet50}
out=${OUT:-$(mktemp -d /tmp/keel-bench-tune.XXXXXX)}
keel="$build/keel"
echo "keel tune bench: logs and configs in $out ($(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg))"
for c in $cases; do
  case $c in
    default)
      sed "s|^name = \"default\"|name = \"tune-default\"\ndir = \"$out/runs\"|" "$repo/configs/default.toml" >"$out/default.toml"
      printf '\n[tune]\nwarmup_steps = %s\nmeasure_steps = %s\n' "${WARMUP:-5}" "${MEASURE:-20}" >>"$out/default.toml"
      "$keel" tune "$out/default.toml" --budget-minutes "${BUDGET_DEFAULT:-8}" --json >"$out/default.log" 2>&1
      echo "== default: exit $?"; grep -A40 "^  #\|^ *# *group" "$out/default.log" | grep -v '^{' ;;
    bad)
      sed -e "s|^name = \"default\"|name = \"tune-bad\"\ndir = \"$out/runs\"|" \
          -e "s|^\[data\]|[data]\nworkers = 1\nprefetch = 1|" \
          -e "s|^\[train\]|[train]\nmicro_batch = 8|" "$repo/configs/default.toml" >"$out/bad.toml"
      printf '\n[tune]\nwarmup_steps = %s\nmeasure_steps = %s\n' "${WARMUP:-5}" "${MEASURE:-20}" >>"$out/bad.toml"
      "$keel" tune "$out/bad.toml" --budget-minutes "${BUDGET_BAD:-8}" --json >"$out/bad.log" 2>&1
      echo "== bad: exit $?"; grep -A40 "^ *# *group" "$out/bad.log" | grep -v '^{'
      if [ "${TRAIN_TUNED:-1}" = 1 ]; then
        "$keel" train "$out/bad.tuned.toml" --set 'run.name="tuned-full"' --json >"$out/bad-tuned-train.log" 2>&1
        echo "tuned config trained: exit $? $(tail -1 "$out/bad-tuned-train.log" | /usr/bin/python3 -c \
          'import json,sys; j=json.load(sys.stdin); print("test top-1 %.2f%%, %.0f img/s" % (100*j["test_top1"], j["images_per_second"]))')"
      fi ;;
    resnet50)
      cat >"$out/resnet50.toml" <<TOML
[run]
name = "tune-resnet50"
dir = "$out/runs"
[data]
dataset = "synthetic"
synthetic_samples = 2048
image_size = 128
mean = [0.5]
std = [0.25]
[model]
name = "resnet50"
in_channels = 3
num_classes = 10
[train]
batch_size = 64
eval_batch_size = 64
micro_batch = 8
[memory]
budget = "1.5GiB"
[tune]
warmup_steps = ${WARMUP_R50:-2}
measure_steps = ${MEASURE_R50:-6}
TOML
      "$keel" tune "$out/resnet50.toml" --budget-minutes "${BUDGET_R50:-15}" --json >"$out/resnet50.log" 2>&1
      echo "== resnet50: exit $?"; grep -A40 "^ *# *group" "$out/resnet50.log" | grep -v '^{' ;;
  esac
done
