#!/usr/bin/env bash
# Idempotent: provides keel's default LibTorch from PyPI's torch wheel in a project-local virtual environment
# (.venv-torch/), pinned to exact versions (scripts/requirements-torch.txt: torch, torchvision, tensorboard),
# and prints the Torch_DIR that CMake needs.
#
#   bash scripts/setup-pytorch.sh                               # install or verify; prints Torch_DIR
#   cmake -S . -B build -G Ninja -DTorch_DIR="$(bash scripts/setup-pytorch.sh)"
#   bash scripts/setup-pytorch.sh bench/requirements-peers.txt  # also the bench peers (timm, Lightning)
#
# stdout carries only that path (progress and pip go to stderr), so `$(bash scripts/setup-pytorch.sh)` works.
# Environment: KEEL_TORCH_VENV (default <repo>/.venv-torch), PYTHON (default: the first python3 on PATH).
# The Linux wheel is CUDA-enabled and pulls the nvidia-* wheels (cuBLAS, cuDNN, NCCL, ...): a few GiB, expected.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${KEEL_TORCH_VENV:-$repo/.venv-torch}
python=${PYTHON:-python3}
requirements=("$repo/scripts/requirements-torch.txt" "$@")

log() { echo "setup-pytorch: $*" >&2; }

# Prints every "name==version" of the requirement files that the venv does not have exactly.
missing_pins() {
  "$venv/bin/python" - "${requirements[@]}" <<'PY' 2>/dev/null || echo "(venv-unusable)"
import importlib.metadata as m, sys
for path in sys.argv[1:]:
    for line in open(path):
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, version = line.split("==")
        try:
            if m.version(name) != version:
                print(line)
        except m.PackageNotFoundError:
            print(line)
PY
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

missing=$(missing_pins)
if [ -n "$missing" ]; then
  log "installing into $venv: $(echo $missing)"
  req_args=()
  for r in "${requirements[@]}"; do req_args+=(-r "$r"); done
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${req_args[@]}" >&2
  missing=$(missing_pins)
  [ -z "$missing" ] || { log "not as pinned after pip install: $(echo $missing)"; exit 1; }
else
  log "pins of ${requirements[*]#$repo/} already satisfied in $venv"
fi

"$venv/bin/python" -c 'import torch, os; print(os.path.join(torch.utils.cmake_prefix_path, "Torch"))'
