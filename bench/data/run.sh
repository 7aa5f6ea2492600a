#!/usr/bin/env bash
# Data-pipeline benchmark: keel (`keel bench data`) vs the torchvision/DataLoader peer on the same
# JPEG folder, same workers and batch, alternated in one run; prints both medians and the ratio.
#   bench/data/run.sh [BUILD_DIR] [REPEATS]    (default build-x, 3)
# Env: WORKERS (2), BATCH (64), BATCHES (20), CLASSES (10), PER_CLASS (50), DATA (BUILD_DIR/bench-data/jpeg).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
build="${1:-$repo/build-x}"
repeats="${2:-3}"
workers="${WORKERS:-2}" batch="${BATCH:-64}" batches="${BATCHES:-20}"
data="${DATA:-$build/bench-data/jpeg}"
if [ ! -d "$data/train" ]; then
  /usr/bin/python3 "$repo/scripts/make_jpeg_folder.py" "$data" --classes "${CLASSES:-10}" --train "${PER_CLASS:-50}" --val 2
fi
keel_ips=() peer_ips=()
for r in $(seq 1 "$repeats"); do
  k=$("$build/keel" bench data "$here/jpeg_folder.toml" --set "data.root=\"$data\"" --set "data.workers=$workers" \
        --set "train.batch_size=$batch" --batches "$batches" --repeats 1 --json | tail -1)
  p=$(/usr/bin/python3 "$here/peer_data.py" "$data" --workers "$workers" --batch "$batch" --batches "$batches" \
        --epoch "$r" | tail -1)
  ki=$(echo "$k" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["images_per_second"])')
  pi=$(echo "$p" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["images_per_second"])')
  echo "repeat $r: keel $ki images/s, peer $pi images/s"
  keel_ips+=("$ki") peer_ips+=("$pi")
done
/usr/bin/python3 - "${keel_ips[*]}" "${peer_ips[*]}" <<'PY'
import statistics, sys
k = [float(x) for x in sys.argv[1].split()]
p = [float(x) for x in sys.argv[2].split()]
mk, mp = statistics.median(k), statistics.median(p)
print(f"median of {len(k)}: keel {mk:.1f} images/s, peer {mp:.1f} images/s, ratio keel/peer {mk / mp:.2f}")
PY
