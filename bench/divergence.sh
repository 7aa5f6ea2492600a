#!/usr/bin/env bash
# Divergence acceptance (issue 4): ResNet-20 on Fashion-MNIST at lr 40 (200x the default recipe's 0.2).
#   bench/divergence.sh [BUILD_DIR]            (default build; ~3 min + ~6 min on 2 quiet cores)
# 1. guard off: the run goes non-finite and stops (exit != 0, the step is printed);
# 2. guard on (rollback cuts the lr 10x, snapshots every 20 steps, up to 8 rollbacks): the run
#    finishes; prints its test top-1 and every guard event (skips with the located module, rollbacks).
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$repo/build}"
dir="${RUN_DIR:-$build/bench-divergence}"
common=(--set optim.lr=40 --set "run.dir=\"$dir\"")
echo "== guard off (guard.enabled = false)"
"$build/keel" train "$repo/configs/default.toml" "${common[@]}" --set 'run.name="plain"' --set guard.enabled=false \
  >"$dir-plain.log" 2>&1
echo "exit $?: $(grep -m1 -o 'non-finite[^"]*' "$dir-plain.log" || tail -1 "$dir-plain.log")"
echo "== guard on"
"$build/keel" train "$repo/configs/default.toml" "${common[@]}" --set 'run.name="guarded"' --set guard.snapshot_every=20 \
  --set guard.max_rollbacks=8 --set guard.lr_factor=0.1 --json >"$dir-guarded.log" 2>&1
echo "exit $?"
/usr/bin/python3 - "$dir/guarded/metrics.jsonl" "$dir-guarded.log" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e.get("event") in ("skip", "rollback"):
        print(f"  {e['event']:8s} {e['message']}")
s = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
print("summary:", {k: s[k] for k in s if k in ("test_top1", "skipped_steps", "rollbacks", "steps", "wall_seconds")})
PY
