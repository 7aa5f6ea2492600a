#!/usr/bin/env bash
# Measures keel on the two LibTorch builds side by side, alternating, so both see the same machine load:
# ResNet-50 training and inference throughput (fp32, bf16) and the default recipe's images/s.
#   bash bench/libtorch_compare.sh [REPEATS]      (needs build/ = wheel and build-debian/ = Debian: make test)
# KEEL_BINS=DIR takes DIR/build/keel and DIR/build-debian/keel instead (copies, so a rebuild cannot interfere).
# Prints one JSON line per measurement; docs/libtorch.md has the table made from them.
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}
bins=${KEEL_BINS:-.}
for r in $(seq "$repeats"); do
  for b in build build-debian; do
    echo "# repeat $r $b load $(cut -d' ' -f1 /proc/loadavg)" >&2
    $bins/$b/keel bench step --model resnet50 --size 224 --batch 16 --steps 3 --warmup 1 --repeats 1 --json | tail -n1 |
      sed "s/^/{\"build\":\"$b\",\"what\":\"resnet50-train\",\"r\":$r,\"result\":/; s/\$/}/"
    $bins/$b/keel bench infer --model resnet50 --size 224 --batches 32 --settings im+cl,im+cl+bf16 \
      --latency-iters 0 --sweep-iters 3 --warmup 1 --json | tail -n1 |
      sed "s/^/{\"build\":\"$b\",\"what\":\"resnet50-infer\",\"r\":$r,\"result\":/; s/\$/}/"
  done
done
