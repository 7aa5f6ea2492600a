#!/usr/bin/env bash
# Run on this Debian 12 machine before scripts/gpu/check.sh: downloads (no install) the .debs of keel's build
# dependencies that a GPU machine's image lacks (it has a CUDA PyTorch, nvcc, cmake, ninja; not keel's Debian
# packages, and no network), with their runtime libraries, and the Fashion-MNIST data, into .devdeps/ (ignored
# by git; about 45 MB). Pass .devdeps to the device tool as a carried path. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.devdeps/' .git/info/exclude 2>/dev/null || echo /.devdeps/ >>.git/info/exclude
mkdir -p .devdeps
cd .devdeps
# The -dev packages keel's CMakeLists finds (scripts/setup.sh) and the closure of their runtime libraries, less
# what every glibc system has (libc6, libstdc++6, libgcc-s1, zlib1g: check.sh links the machine's own libz).
PKGS=(
  libtomlplusplus-dev libtomlplusplus3 libcli11-dev libfmt-dev libfmt9 nlohmann-json3-dev
  libturbojpeg0-dev libturbojpeg0 libjpeg62-turbo-dev libjpeg62-turbo libpng-dev libpng16-16 zlib1g-dev
  libswscale-dev libswscale6 libavutil-dev libavutil57
  libdrm-common libdrm2 libva-drm2 libva-x11-2 libva2 libvdpau1 libmfx1 ocl-icd-libopencl1
  libx11-6 libx11-data libx11-xcb1 libxau6 libxcb-dri3-0 libxcb1 libxdmcp6 libxext6 libxfixes3 libbsd0 libmd0
  googletest libgtest-dev libgmock-dev libbenchmark-dev libbenchmark1debian
  pkgconf pkgconf-bin libpkgconf3
  dataset-fashion-mnist
)
missing=()
for p in "${PKGS[@]}"; do
  compgen -G "${p}_*.deb" >/dev/null || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get download "${missing[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true
fi
du -sh .
