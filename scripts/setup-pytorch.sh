#!/usr/bin/env bash
# Idempotent: provides LibTorch from PyPI's torch wheel in a project-local virtual environment (.venv-torch/),
# pinned to an exact torch + torchvision pair, and prints the Torch_DIR that CMake needs.
#
#   bash scripts/setup-pytorch.sh            # install or verify; prints Torch_DIR
#   cmake -S . -B build-pypi -G Ninja -DTorch_DIR="$(bash scripts/setup-pytorch.sh)"
#
# stdout carries only that path (progress and pip go to stderr), so `$(bash scripts/setup-pytorch.sh)` works.
# Environment: KEEL_TORCH_VENV (default <repo>/.venv-torch), PYTHON (default: the first python3 on PATH).
# The Linux wheel is CUDA-enabled and pulls the nvidia-* wheels (cuBLAS, cuDNN, NCCL, ...): a few GiB, expected.
set -euo pipefail

# Newest pair on PyPI when pinned: torchvision 0.29.x is the series built for torch 2.14.x
# (torch 2.15.0 exists, but no torchvision for it yet, and torchvision's C++ ops load only against their own torch).
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.2

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${KEEL_TORCH_VENV:-$repo/.venv-torch}
python=${PYTHON:-python3}

log() { echo "setup-pytorch: $*" >&2; }

installed_version() {  # prints "torch torchvision" versions in the venv, or nothing
  "$venv/bin/python" - <<'EOF' 2>/dev/null || true
import importlib.metadata as m
print(m.version("torch"), m.version("torchvision"))
EOF
}

if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
    # Debian's python3 ships venv/ensurepip separately.
    log "installing python3-venv (Debian) for $python"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends python3-venv >&2
  fi
  log "creating $venv with $("$python" --version 2>&1)"
  "$python" -m venv "$venv"
fi

if [ "$(installed_version)" != "$TORCH_VERSION $TORCHVISION_VERSION" ]; then
  log "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION into $venv"
  # --upgrade-strategy only-if-needed: a second run with the pins satisfied downloads nothing.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" >&2
  [ "$(installed_version)" = "$TORCH_VERSION $TORCHVISION_VERSION" ] ||
    { log "expected torch $TORCH_VERSION / torchvision $TORCHVISION_VERSION, found '$(installed_version)'"; exit 1; }
else
  log "torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION already in $venv"
fi

"$venv/bin/python" -c 'import torch, os; print(os.path.join(torch.utils.cmake_prefix_path, "Torch"))'
