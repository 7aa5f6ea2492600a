#!/usr/bin/env bash
# keel's CUDA checks, on a GPU machine whose image has a CUDA PyTorch (python3), nvcc, cmake and ninja but none of
# keel's Debian packages and no network (this workplace's `device` machines). First, on the Debian machine:
#   bash scripts/gpu/deps.sh        (the .debs and the Fashion-MNIST data into .devdeps/, carried along)
# then on the GPU machine, from the checkout:  bash scripts/gpu/check.sh
# It unpacks the .debs under /opt/kdeps (never into /), builds keel against the machine's own LibTorch (that of
# its python3's torch) with KEEL_CUDA=ON, and runs, each time-boxed, in this order:
#   1. the CUDA unit tests (tests/device: pinned uploads, a pinned tensor and a pinned loader buffer reused at
#      once after their uploads, caching-allocator statistics, fp16 step + loss scaler);
#   2. the default recipe (ResNet-20, Fashion-MNIST) trained on the GPU in fp16 with the loss scaler;
#   3. the ViT-Tiny Fashion-MNIST recipe (configs/vit_tiny_fashion_mnist.toml), its test accuracy;
#   4. `keel bench step` ResNet-50 fp32/bf16/fp16 against PyTorch Python eager (bench/peer_step.py --device cuda),
#      alternated, the same torch on both sides;
#   5. out-of-memory recovery on CUDA: ResNet-50 at 224 px, batch 512, under memory.budget = 8GiB;
#   6. `keel bench infer` ResNet-50 and ViT-S/16 on the GPU;
#   7. `keel tune` with precision allowed, for what time is left;
#   8. the monitor's cost on CUDA (one device sync per step phase): the default recipe with it off and on.
# KEEL_GPU_CHECKS="1 4 8" runs only those.
# Everything is printed and kept under $OUT (default /tmp/keel-gpu): log.txt, JSON lines in results.jsonl.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/keel-gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
DEADLINE=${KEEL_GPU_DEADLINE:-540}  # seconds from the start: later steps are skipped, or get what is left
CHECKS=${KEEL_GPU_CHECKS:-1 2 3 4 5 6 7}  # which numbered checks run (e.g. "2 4 8" after a change)
want() { [[ " $CHECKS " == *" $1 "* ]]; }
T0=$SECONDS
step() { echo; echo "=== [$((SECONDS - T0))s] $*"; }
left() { echo $((DEADLINE - (SECONDS - T0))); }
box() {  # box SECONDS CMD...: run CMD with at most SECONDS (and never past the deadline)
  local s=$1; shift
  local l; l=$(left)
  [ "$l" -lt "$s" ] && s=$l
  if [ "$s" -le 5 ]; then echo "(skipped: deadline)"; return 124; fi
  timeout --signal=INT --kill-after=10 "$s" "$@"
}
result() { echo "{\"what\":\"$1\",\"result\":$2}" >>"$OUT/results.jsonl"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
grep PRETTY_NAME /etc/os-release
g++ --version | head -1
nvcc --version 2>/dev/null | tail -1
cmake --version | head -1
echo "ninja $(ninja --version), $(nproc) cores"
PY=$(command -v python3)
$PY -c 'import torch; print("python3", torch.__file__, torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
TORCH_CMAKE=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
SITE=$($PY -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')

step "dependencies (.devdeps -> /opt/kdeps)"
D=/opt/kdeps
L=$D/usr/lib/x86_64-linux-gnu
mkdir -p $D
for f in .devdeps/*.deb; do dpkg-deb -x "$f" $D || echo "could not unpack $f"; done
sed -i "s#=/usr#=$D/usr#" $L/pkgconfig/*.pc $D/usr/share/pkgconfig/*.pc 2>/dev/null
# zlib1g-dev's libz.so points at the runtime library, which is the machine's own.
SYSZ=$(ls /usr/lib/x86_64-linux-gnu/libz.so.1 /lib/x86_64-linux-gnu/libz.so.1 2>/dev/null | head -1)
ln -sf "$SYSZ" $L/libz.so
ORIG_LD=${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH=$L${ORIG_LD:+:$ORIG_LD}  # link time (libavutil's own needs) and keel's run time, not python3's
export PKG_CONFIG_LIBDIR=$L/pkgconfig:$D/usr/share/pkgconfig
# The CUDA runtime headers with crt/ (the wheel's nvidia-cuda-runtime has no crt/; the toolkit's has).
CRT=$(ls "$SITE"/nvidia/*/include/crt/host_config.h /usr/local/cuda/include/crt/host_config.h 2>/dev/null | head -1)
CUDART_INC=$(dirname "$(dirname "$CRT")")
echo "torch cmake: $TORCH_CMAKE; cuda runtime headers: $CUDART_INC; libz: $SYSZ"

R=/tmp/keel-runs  # run directories (only a few files come back from $OUT)

step "configure"
B=/tmp/keel-build
cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DTorch_DIR="$TORCH_CMAKE/Torch" -DCMAKE_PREFIX_PATH=$D/usr \
  -DPKG_CONFIG_EXECUTABLE=$D/usr/bin/pkgconf -DKEEL_CUDA=ON -DKEEL_CI_SANITIZERS=OFF \
  -DKEEL_CUDART_INCLUDE="$CUDART_INC" -DZLIB_INCLUDE_DIR=$D/usr/include -DZLIB_LIBRARY="$SYSZ" \
  >"$OUT/cmake.txt" 2>&1 || { tail -40 "$OUT/cmake.txt"; exit 1; }
grep -E '^-- keel' "$OUT/cmake.txt"

TARGETS="keel"; want 1 && TARGETS="keel test_device"
step "build ($TARGETS)"
box 300 ninja -C $B -k 0 $TARGETS >"$OUT/build.txt" 2>&1
rc=$?
grep -E 'error|FAILED' "$OUT/build.txt" | head -40
tail -3 "$OUT/build.txt"
[ -x $B/keel ] || { echo "keel did not build (rc $rc)"; exit 1; }
K=$B/keel
$K doctor 2>&1 | head -30

if want 1; then
step "1. CUDA unit tests (tests/device)"
box 120 $B/test_device 2>&1 | grep -E '^\[ +(OK|FAILED|SKIPPED|PASSED) |Failure|error|Expected|Which is|skipped' | head -40

fi
if want 2; then
step "2. default recipe on the GPU, fp16 + loss scaler"
j=$(box 150 $K train configs/default.toml --set run.device=cuda --set train.precision=fp16 --set data.workers=4 \
      --set data.root=$D/usr/share/datasets/fashion-mnist --set run.name=gpu-fp16 --set run.dir=$R --json |
    tee "$OUT/train-fp16.txt" | tail -1)
grep -E '^(keel|epoch|advice|guard|memory)' "$OUT/train-fp16.txt" | head -20
[ -n "$j" ] && result "default-recipe-fp16" "$j"

fi
if want 3; then
step "3. ViT-Tiny on Fashion-MNIST: configs/vit_tiny_fashion_mnist.toml as documented (10 epochs, fp32)"
j=$(box 200 $K train configs/vit_tiny_fashion_mnist.toml --set run.device=cuda --set data.workers=4 \
      --set data.root=$D/usr/share/datasets/fashion-mnist --set run.dir=$R --json | tee "$OUT/train-vit.txt" | tail -1)
grep -E '^(keel|epoch|guard)' "$OUT/train-vit.txt" | head -20
[ -n "$j" ] && result "vit-tiny-fmnist" "$j"

fi
if want 4; then
step "4. training step, ResNet-50 224 px batch 128: keel vs PyTorch eager (torch $($PY -c 'import torch; print(torch.__version__)'))"
for r in 1 2; do
  j=$(box 90 $K bench step --model resnet50 --size 224 --batch 128 --steps 20 --warmup 5 --repeats 1 \
        --precisions fp32,bf16,fp16 --device cuda --json | tail -1)
  echo "keel r$r: $j"; [ -n "$j" ] && result "keel-step-r$r" "$j"
  j=$(box 90 env LD_LIBRARY_PATH="$ORIG_LD" $PY bench/peer_step.py "$(nproc)" --device cuda --model resnet50 --size 224 \
        --batch 128 --steps 20 --warmup 5 --repeats 1 --precisions fp32,bf16,fp16 | tail -1)
  echo "peer r$r: $j"; [ -n "$j" ] && result "peer-step-r$r" "$j"
done

fi
if want 5; then
step "5. out-of-memory recovery on CUDA: ResNet-50 224 px, batch 512, memory.budget 8GiB"
box 90 $K train configs/default.toml --set model.name=resnet50 --set model.in_channels=3 --set data.dataset=synthetic \
  --set data.image_size=224 --set data.synthetic_samples=4096 --set data.workers=4 --set 'data.mean=[0.5,0.5,0.5]' \
  --set 'data.std=[0.25,0.25,0.25]' --set train.batch_size=512 --set train.max_steps=4 --set train.epochs=1 \
  --set memory.budget=8GiB --set run.device=cuda --set run.name=gpu-oom --set run.dir=$R 2>&1 |
  grep -v -E '^resnet50 step' | tail -25

fi
if want 6; then
step "6. inference, ResNet-50 and ViT-S/16 on the GPU"
for m in resnet50 vit_small_16; do
  j=$(box 90 $K bench infer --model $m --device cuda --settings plain,im+fold+cl,im+fold+cl+fp16,im+fold+cl+bf16 \
        --batches 1,32,256 --latency-iters 50 --sweep-iters 10 --json | tail -1)
  echo "$m: $j" | cut -c1-3000; [ -n "$j" ] && result "infer-$m" "$j"
done

fi
if want 7; then
step "7. keel tune, precision allowed (ResNet-50 128 px synthetic), $(left)s left"
box 240 $K tune configs/default.toml --set model.name=resnet50 --set model.in_channels=3 --set data.dataset=synthetic \
  --set data.image_size=128 --set data.synthetic_samples=20000 --set 'data.mean=[0.5,0.5,0.5]' \
  --set 'data.std=[0.25,0.25,0.25]' --set train.batch_size=256 --set run.device=cuda --set run.name=gpu-tune \
  --set run.dir=$R --set 'tune.allow=["precision"]' --set tune.warmup_steps=3 --set tune.measure_steps=10 \
  --budget-minutes 3 --out "$OUT/tuned.toml" 2>&1 | tail -30
cp $R/gpu-tune/tune/tune.json "$OUT/tune.json" 2>/dev/null
fi
if want 8; then
step "8. monitor cost on CUDA (a device sync per phase): default recipe fp16, 1 epoch, monitor off / on / off / on"
for m in false true false true; do
  box 60 $K train configs/default.toml --set run.device=cuda --set train.precision=fp16 --set data.workers=4 \
    --set data.root=$D/usr/share/datasets/fashion-mnist --set run.name=gpu-mon-$m --set run.dir=$R --set train.epochs=1 \
    --set monitor.enabled=$m --json | tail -1 | $PY -c 'import json, sys; j = json.load(sys.stdin); print(
      "monitor '$m': wall %.2f s (fit, evaluation included), breakdown %s" % (j["wall_seconds"], {k: round(v, 2) for k, v in j.get("breakdown_seconds", {}).items()}))'
done
fi
step "done"
