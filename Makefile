# keel quick start: `make run` (set-up, Release build, train the default recipe), `make test` (set-up, build, ctest).
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
# LibTorch from PyPI's torch wheel (docs/libtorch.md): its own build directory, same sources and tests.
PYPI_BUILD ?= build-pypi

.PHONY: setup build run test clean setup-pytorch build-pypi test-pypi

setup:
	bash scripts/setup.sh

$(BUILD)/build.ninja:
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

build: setup $(BUILD)/build.ninja
	cmake --build $(BUILD) -j $(JOBS)

run: build
	$(BUILD)/keel train configs/default.toml

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) --timeout 900

# Configures every time (seconds when nothing changed). setup-pytorch.sh prints only Torch_DIR on stdout;
# if it fails, the `&&` stops here rather than letting CMake fall back to Debian's LibTorch.
build-pypi: setup
	torch_dir=$$(bash scripts/setup-pytorch.sh) && \
	  cmake -S . -B $(PYPI_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DTorch_DIR="$$torch_dir" $(CMAKE_FLAGS)
	cmake --build $(PYPI_BUILD) -j $(JOBS)

test-pypi: build-pypi
	cd $(PYPI_BUILD) && ctest --output-on-failure -j $(JOBS) --timeout 900

setup-pytorch:
	bash scripts/setup-pytorch.sh

clean:
	rm -rf $(BUILD)
