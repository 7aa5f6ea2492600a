#!/usr/bin/env bash
# keel bench infer vs PyTorch Python (bench/peer_infer.py) on the same weights, threads, input side and batch sizes:
# ResNet-50 and ViT-S/16 at 224 px, batch-1 p50 latency and batch-32 throughput. Peers: Debian's /usr/bin/python3
# (torch 1.13) and, when present, .venv-torch/bin/python (torch 2.14.1, the LibTorch keel's default build uses).
#   bash bench/infer_compare.sh [THREADS]
# env: LAT (timed batch-1 forwards, 10), SWEEP (timed batch-32 forwards, 2), WARMUP (untimed forwards before each, 1),
#      MODELS ("resnet50 vit_s_16"), KEEL (build/keel), OUT (build/bench-infer),
#      SETTINGS (keel's: plain,im+fold+cl,im+fold+cl+bf16,im+fold+cl+bf16w,im+fold+cl+bf16m,im+fold+cl+pack+bf16m),
#      PEERS (Pythons: "/usr/bin/python3 .venv-torch/bin/python", those that exist), PEER_SETTINGS (peer_infer.py's)
# Writes OUT/*.json and prints the ratio table (bench/infer_ratios.py); docs/inference.md has the measured one.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
lat=${LAT:-10}
sweep=${SWEEP:-2}
warmup=${WARMUP:-1}
keel=${KEEL:-build/keel}
out=${OUT:-build/bench-infer}
mkdir -p "$out"
pythons=()
for py in ${PEERS:-/usr/bin/python3 .venv-torch/bin/python}; do [ -x "$py" ] && pythons+=("$py"); done
for model in ${MODELS:-resnet50 vit_s_16}; do
  case $model in
    resnet50) keel_model=resnet50 ;;
    vit_s_16) keel_model=vit_small_16 ;;
  esac
  echo "# $model: load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  load=""
  for py in "${pythons[@]}"; do
    tag=$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')
    "$py" bench/peer_infer.py "$model" "$out/$model.pt" $load --threads "$threads" --batches 32 \
      --latency-iters "$lat" --sweep-iters "$sweep" --warmup "$warmup" \
      --settings "${PEER_SETTINGS:-eager_fp32,eager_bf16_cl,jit_fp32,jit_bf16}" 2>/dev/null | tail -n1 > "$out/peer-$model-torch$tag.json"
    load="--load"  # every peer and keel measure the weights the first peer wrote
  done
  "$keel" bench infer --model "$keel_model" --size 224 --channels 3 --classes 1000 --checkpoint "$out/$model.pt" \
    --threads "$threads" --settings "${SETTINGS:-plain,im+fold+cl,im+fold+cl+bf16,im+fold+cl+bf16w,im+fold+cl+bf16m,im+fold+cl+pack+bf16m}" --batches 32 --latency-iters "$lat" \
    --sweep-iters "$sweep" --warmup "$warmup" --json | tail -n1 > "$out/keel-$model.json"
done
echo "# done: load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python3 bench/infer_ratios.py "$out"
