#!/usr/bin/env bash
# Idempotent installation of every Debian 12 package keel needs (build, run, tests, golden values).
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config
  libtorch-dev libopenblas0-openmp
  libtomlplusplus-dev libcli11-dev libfmt-dev libspdlog-dev nlohmann-json3-dev
  libturbojpeg0-dev libjpeg62-turbo-dev libpng-dev libswscale-dev zlib1g-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libgloo-dev  # Gloo headers for c10d ProcessGroupGloo (distributed training; the wheel ships none)
  clang-14 libclang-rt-14-dev
  dataset-fashion-mnist
  python3-torch python3-torchvision python3-numpy python3-pil python3-skimage
  python3-protobuf python3-crcmod
  chromium  # headless rendering test of `keel report`'s report.html
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
