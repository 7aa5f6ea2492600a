#!/usr/bin/env bash
# Measures keel on the two LibTorch builds side by side, alternating, so both see the same machine load:
# ResNet-50 training and inference throughput (fp32, bf16) and the default recipe's images/s.
#   bash bench/libtorch_compare.sh [REPEATS]      (needs build/ = wheel and build-debian/ = Debian: make test)
# Prints one JSON line per measurement; docs/libtorch.md has the table made from them.
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}
for r in $(seq "$repeats"); do
  for b in build build-debian; do
    echo "# repeat $r $b load $(cut -d' ' -f1 /proc/loadavg)" >&2
    $b/keel bench step --model resnet50 --size 224 --batch 16 --steps 3 --warmup 1 --repeats 1 --json | tail -n1 |
      sed "s/^/{\"build\":\"$b\",\"what\":\"resnet50-train\",\"r\":$r,\"result\":/; s/\$/}/"
    $b/keel bench infer --model resnet50 --size 224 --batch 32 --steps 3 --warmup 1 --repeats 1 --json | tail -n1 |
      sed "s/^/{\"build\":\"$b\",\"what\":\"resnet50-infer\",\"r\":$r,\"result\":/; s/\$/}/"
  done
done
