#!/usr/bin/env bash
# Monitoring overhead and breakdown closure on the default recipe (docs/monitoring.md, "Overhead").
#
# Runs `keel train configs/default.toml` for STEPS steps with monitor.enabled = true and = false, alternating the
# order each repeat (on,off / off,on) so that drifts in machine load hit both alike, REPEATS times. Step time =
# the training loop's wall time / steps (FitResult.train_seconds: host clock around the loop, independent of the
# step timer). Prints the medians and their ratio (monitoring overhead), and, for the monitored runs, how the sum
# of the step-time breakdown compares with that measured step time (closure; the issue asks for 5%).
#
# usage: bench/monitor_overhead.sh [REPEATS=5] [STEPS=150]     (KEEL=path/to/keel, default build/keel)
set -euo pipefail
REPEATS=${1:-5}
STEPS=${2:-150}
KEEL=${KEEL:-build/keel}
OUT=$(mktemp -d /tmp/keel-monitor-overhead.XXXXXX)
trap 'rm -rf "$OUT"' EXIT

run() {  # mode repeat
  local flag=$([ "$1" = on ] && echo true || echo false)
  "$KEEL" train configs/default.toml --json --set train.max_steps="$STEPS" --set data.test_limit=500 \
    --set checkpoint.save_final=false --set monitor.enabled="$flag" --set run.dir="$OUT" --set run.name="$1-$2" \
    | tail -n 1 | sed "s/^/$1 /" >> "$OUT/results.txt"
}

for r in $(seq 1 "$REPEATS"); do
  if [ $((r % 2)) -eq 1 ]; then run on "$r"; run off "$r"; else run off "$r"; run on "$r"; fi
  echo "monitor_overhead: repeat $r/$REPEATS done" >&2
done

python3 - "$OUT/results.txt" "$STEPS" "$REPEATS" <<'PY'
import json, statistics, sys
rows = [l.split(" ", 1) for l in open(sys.argv[1]) if l.strip()]
per = {"on": [], "off": []}
closure = []
for mode, js in rows:
    j = json.loads(js)
    step = j["train_seconds"] / j["steps"]
    per[mode].append(step)
    if mode == "on":
        parts = sum(j["breakdown_seconds"].values())
        closure.append(parts / j["train_seconds"])
on, off = statistics.median(per["on"]), statistics.median(per["off"])
print(f"steps per run {sys.argv[2]}, repeats {sys.argv[3]} (default recipe, ResNet-20, batch 128)")
print("step time, monitoring on  (ms):", " ".join(f"{1000*x:.1f}" for x in per["on"]), f"-> median {1000*on:.2f}")
print("step time, monitoring off (ms):", " ".join(f"{1000*x:.1f}" for x in per["off"]), f"-> median {1000*off:.2f}")
print(f"overhead: on/off = {on/off:.4f} ({100*(on/off-1):+.2f}% of step time)")
# Each repeat runs on and off back to back, so their ratio cancels slow drifts in machine load; the median of
# these per-repeat ratios is the less noisy estimate.
pairs = [a / b for a, b in zip(per["on"], per["off"])]
paired = statistics.median(pairs)
print("per-repeat on/off:", " ".join(f"{x:.4f}" for x in pairs), f"-> median {paired:.4f} ({100*(paired-1):+.2f}%)")
print("breakdown sum / measured step time:", " ".join(f"{x:.4f}" for x in closure),
      f"-> median {statistics.median(closure):.4f} (farthest from 1: {max(closure, key=lambda c: abs(1-c)):.4f})")
print(json.dumps({"on_ms": 1000*on, "off_ms": 1000*off, "ratio": on/off, "paired_ratio": paired,
                  "closure_median": statistics.median(closure),
                  "closure_worst": max(closure, key=lambda c: abs(1-c))}))
PY
