# qtemperate developer entry points. Both targets work on a fresh machine:
# they create .venv, install the CPU torch wheel first (so pip never pulls a
# multi-GB CUDA build), then the project with its dev extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

# PyTorch's CPU kernels for older x86 CPUs that `make test-numerics` reruns the
# numerically sensitive tests on (plain C++ and AVX2; ARM has no such choice).
NUMERICS_CAPABILITIES ?= $(if $(filter x86_64,$(shell uname -m)),default avx2,default)

.PHONY: install data testdeps demo test test-numerics lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST from Debian's dataset-fashion-mnist package (no downloads at run time).
data:
	@if [ -f "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ] || [ -f "$(FMNIST_DIR)/train-images-idx3-ubyte" ]; then \
		echo "Fashion-MNIST found in $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "apt-get not available: set QTEMPERATE_FASHION_MNIST to a folder with the IDX files"; \
	fi

# Debian's qemu-user runs the int8 kernels of an AVX2-only x86 CPU (no VNNI) under
# emulation, for the exactness tests of the x86-avx2 target (tests/export/test_emulate.py).
testdeps:
	@if [ "$$(uname -m)" != x86_64 ] || command -v qemu-x86_64 >/dev/null 2>&1; then \
		true; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq qemu-user; \
	else \
		echo "qemu-x86_64 not available: the emulated-AVX2 tests will be skipped"; \
	fi

demo: install data
	$(BIN)/qtemperate run recipes/fashion_mnist_quickstart.yaml

test: install data testdeps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-numerics

# The tests marked `numerics` (float results of two computations compared within bounds
# derived from the computation) again under each capability in NUMERICS_CAPABILITIES, so a
# CPU class the developer does not have is exercised on every submission.
test-numerics: install data
	@for cap in $(NUMERICS_CAPABILITIES); do \
		echo "== pytest -m numerics with ATEN_CPU_CAPABILITY=$$cap"; \
		ATEN_CPU_CAPABILITY=$$cap $(BIN)/python -m pytest -q -m numerics -p no:cacheprovider || exit 1; \
	done

lint: install
	$(BIN)/ruff check qtemperate tests bench

bench: install data
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m pytest bench --benchmark-only -q

clean:
	rm -rf $(VENV) runs wandb .pytest_cache .ruff_cache
