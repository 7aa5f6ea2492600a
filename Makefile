# keel quick start: `make run` (set-up, Release build, train the default recipe), `make test` (set-up, build,
# ctest, and a build against the other LibTorch).
#
# Default LibTorch: the one inside PyPI's torch wheel (pinned, .venv-torch/), with keel's CUDA code paths
# compiled in; Debian's libtorch-dev 1.13.1 (CPU only) builds in build-debian/. docs/libtorch.md says why.
BUILD ?= build
DEBIAN_BUILD ?= build-debian
DEBIAN_TARGETS ?=
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
# CI (CI=true, a fresh clone): no precompiled header, which GCC does not reproduce and ccache would therefore miss
# in every file; the same header force-included instead is cached (CMakeLists.txt, KEEL_PCH).
ifeq ($(CI),true)
CMAKE_FLAGS += -DKEEL_PCH=OFF
endif
CTEST = ctest --output-on-failure -j $(JOBS) --timeout 900

.PHONY: setup build run test clean build-debian test-debian check-cuda setup-peers

# Debian packages (scripts/setup.sh), then the pinned wheel (scripts/setup-pytorch.sh); both idempotent.
setup:
	bash scripts/setup.sh
	bash scripts/setup-pytorch.sh >/dev/null

# Configures every time (seconds when nothing changed), so the build always uses the pinned wheel.
# setup-pytorch.sh prints only Torch_DIR on stdout; if it fails, `&&` stops here rather than letting CMake
# fall back to Debian's LibTorch.
build: setup
	torch_dir=$$(bash scripts/setup-pytorch.sh 2>/dev/null) && \
	  cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DTorch_DIR="$$torch_dir" $(CMAKE_FLAGS)
	cmake --build $(BUILD) -j $(JOBS)

run: build
	$(BUILD)/keel train configs/default.toml

# The default build's whole suite, then the other LibTorch (Debian 1.13) built: the library (every source,
# compat layer included) and keel. Its test programs too would add ~5 min on 2 cores from scratch;
# `make test-debian` builds and runs them.
test: build
	cd $(BUILD) && $(CTEST)
	$(MAKE) build-debian DEBIAN_TARGETS=keel

# keel's CUDA code paths compiled and linked against the wheel's CUDA LibTorch (no GPU or CUDA toolkit
# needed), then the device tests: on a machine without a GPU the CUDA ones skip and say so.
check-cuda: CMAKE_FLAGS += -DKEEL_CUDA=ON
check-cuda: build
	cd $(BUILD) && $(CTEST) -L device

# DEBIAN_TARGETS: CMake targets to build (default: all).
build-debian: setup
	cmake -S . -B $(DEBIAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)
	cmake --build $(DEBIAN_BUILD) -j $(JOBS) $(if $(DEBIAN_TARGETS),--target $(DEBIAN_TARGETS))

test-debian: build-debian
	cd $(DEBIAN_BUILD) && $(CTEST)

# The bench peers (timm, Lightning; bench/requirements-peers.txt) next to the same torch.
setup-peers:
	bash scripts/setup-pytorch.sh bench/requirements-peers.txt >/dev/null

clean:
	rm -rf $(BUILD) $(DEBIAN_BUILD)
