#!/usr/bin/env bash
# Data-parallel scaling on one machine (issue 9): the default recipe (ResNet-20, Fashion-MNIST, global batch
# 128) as 1 rank x 2 intra-op threads against 2 ranks x 1 thread (Gloo over loopback), with the gradient
# all-reduce overlapping backward (dist.overlap = true) and sent after backward (false, the baseline).
#   bench/dist_scaling.sh [BUILD_DIR]        STEPS=150 by default (~3 x 1 min on 2 quiet cores)
# Prints the machine load before/after, each run's training images/s, and for the 2-rank runs rank 0's
# all-reduce time, how much of it overlapped backward, and the time the step waited for it after backward.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$repo/build}"
steps="${STEPS:-150}"
dir="${RUN_DIR:-$build/bench-dist}"
rm -rf "$dir"
mkdir -p "$dir"
common=(--set "run.dir=\"$dir\"" --set train.max_steps="$steps" --set train.epochs=1 --set data.test_limit=1000
        --set data.workers=1 --set train.log_every=50 --set checkpoint.save_final=false --json)
echo "machine: $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
run() {  # name, args...
  local name="$1"; shift
  "$build/keel" train "$repo/configs/default.toml" "${common[@]}" --set "run.name=\"$name\"" "$@" >"$dir/$name.log" 2>&1
  echo "$name: exit $?"
}
run single --set run.threads=2
run ranks2 --set run.threads=1 --nproc 2
run ranks2_no_overlap --set run.threads=1 --nproc 2 --set dist.overlap=false
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
/usr/bin/python3 - "$dir" <<'PY'
import json, sys, os
d = sys.argv[1]
def summary(name):
    lines = [l for l in open(os.path.join(d, name + ".log")) if l.startswith("{")]
    return json.loads(lines[-1]) if lines else None
base = summary("single")
print(f"{'run':20s} {'img/s':>8s} {'vs 1x2':>7s} {'train s':>8s} {'allreduce s':>12s} {'overlapped':>11s} {'waited after bwd s':>19s}")
for name in ("single", "ranks2", "ranks2_no_overlap"):
    s = summary(name)
    if s is None:
        print(f"{name:20s} (no summary; see {d}/{name}.log)"); continue
    ratio = s["images_per_second"] / base["images_per_second"] if base else float("nan")
    dd = s.get("dist") or {}
    ar = "%.2f" % dd["allreduce_seconds"] if dd else "-"
    ov = "%.0f%%" % (100 * dd["overlap_share"]) if dd else "-"
    ex = "%.2f" % dd["exposed_seconds"] if dd else "-"
    print(f"{name:20s} {s['images_per_second']:8.0f} {ratio:7.2f} {s['train_seconds']:8.1f} {ar:>12s} {ov:>11s} {ex:>19s}")
    if dd:
        print(f"{'':20s} {dd['buckets']} buckets, {dd['bytes_per_step'] / 2**20:.2f} MiB per step, {dd['steps']} steps")
PY
