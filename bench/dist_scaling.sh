#!/usr/bin/env bash
# Data-parallel scaling on one machine (issue 9): the default recipe (ResNet-20, Fashion-MNIST, global batch
# 128) as 1 rank x 2 intra-op threads against 2 ranks x 1 thread (Gloo over loopback), with the gradient
# all-reduce overlapping backward (dist.overlap = true; one 25 MiB bucket, and 0.25 MiB buckets) and sent
# after backward (false, the baseline).
#   bench/dist_scaling.sh [BUILD_DIR]        STEPS=100 by default (~8 x 30 s on 2 quiet cores)
# Prints the machine load before each run, each run's training images/s, and for the 2-rank runs rank 0's
# all-reduce time, how much of it overlapped backward, and the time the step waited for it after backward.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$repo/build}"
steps="${STEPS:-100}"
dir="${RUN_DIR:-$build/bench-dist}"
rm -rf "$dir"
mkdir -p "$dir"
common=(--set "run.dir=\"$dir\"" --set train.max_steps="$steps" --set train.epochs=1 --set data.test_limit=1000
        --set data.workers=1 --set train.log_every=50 --set checkpoint.save_final=false --json)
echo "machine: $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
run() {  # name, args...: the load average just before, the exit status
  local name="$1"; shift
  "$build/keel" train "$repo/configs/default.toml" "${common[@]}" --set "run.name=\"$name\"" "$@" >"$dir/$name.log" 2>&1
  echo "$name: exit $?, load $(cut -d' ' -f1 /proc/loadavg) before"
}
# Two rounds in alternating order, so a change of machine load shows as a difference between rounds.
for round in 1 2; do
  run "single_$round" --set run.threads=2
  run "ranks2_$round" --set run.threads=1 --nproc 2
  # ResNet-20's gradients are 1.04 MiB: one 25 MiB bucket, sent when the last gradient (conv1's) is ready;
  # buckets of <= 0.25 MiB start while backward still runs.
  run "ranks2_b025_$round" --set run.threads=1 --nproc 2 --set dist.bucket_mb=0.25
  run "ranks2_no_overlap_$round" --set run.threads=1 --nproc 2 --set dist.overlap=false --set dist.bucket_mb=0.25
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
/usr/bin/python3 - "$dir" <<'PY'
import json, sys, os
d = sys.argv[1]
def summary(name):
    lines = [l for l in open(os.path.join(d, name + ".log")) if l.startswith("{")]
    return json.loads(lines[-1]) if lines else None
print(f"{'run':24s} {'img/s':>7s} {'vs 1x2':>7s} {'train s':>8s} {'allreduce s':>12s} {'overlapped':>11s} {'waited after bwd s':>19s}")
for rnd in (1, 2):
    base = summary(f"single_{rnd}")
    for kind in ("single", "ranks2", "ranks2_b025", "ranks2_no_overlap"):
        name = f"{kind}_{rnd}"
        s = summary(name)
        if s is None:
            print(f"{name:24s} (no summary; see {d}/{name}.log)"); continue
        ratio = s["images_per_second"] / base["images_per_second"] if base else float("nan")
        dd = s.get("dist") or {}
        ar = "%.2f" % dd["allreduce_seconds"] if dd else "-"
        ov = "%.0f%%" % (100 * dd["overlap_share"]) if dd else "-"
        ex = "%.2f" % dd["exposed_seconds"] if dd else "-"
        extra = f"  ({dd['buckets']} buckets)" if dd else ""
        print(f"{name:24s} {s['images_per_second']:7.0f} {ratio:7.2f} {s['train_seconds']:8.1f} {ar:>12s} {ov:>11s} {ex:>19s}{extra}")
PY
