# Two commands do all the set-up on a fresh machine: `make demo` (the main job on the embedded
# SYNTHETIC default checkpoint) and `make test`.
# Both create or reuse .venv; torch is installed first and pinned (an unpinned torch pulls a CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-newest lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/moeq-triton quantize --out out/synthetic-qwen3-moe-nvfp4 --overwrite --verify

test: $(STAMP)  # the default tier: minutes on 2 cores
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)  # the long tier (CI runs it too)
	$(BIN)/python -m pytest -q -m slow

# The newest-release job (CI runs it too): a fresh second venv from pyproject.toml WITHOUT constraints.txt, so every
# dependency resolves to its newest release, except torch: pinned to constraints.txt's version, which resolves to the
# machine's CPU wheel (2.13.0+cpu sorts above PyPI's 2.13.0, a CUDA build of several GB). Prints what it got.
VENV_NEWEST ?= .venv-newest
test-newest:
	rm -rf $(VENV_NEWEST)
	$(PYTHON) -m venv $(VENV_NEWEST)
	$(VENV_NEWEST)/bin/pip install -q --upgrade pip
	grep -i '^torch==' constraints.txt > $(VENV_NEWEST)/torch-pin.txt
	$(VENV_NEWEST)/bin/pip install -q -c $(VENV_NEWEST)/torch-pin.txt torch
	$(VENV_NEWEST)/bin/pip install -q -c $(VENV_NEWEST)/torch-pin.txt -e '.[test]'
	$(VENV_NEWEST)/bin/pip list --format=freeze | grep -i -E '^(torch|triton|transformers|kernels|nvidia-modelopt|megatron-core|safetensors|accelerate|numpy)=='
	$(VENV_NEWEST)/bin/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check moeq_triton tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(VENV) $(VENV_NEWEST) *.egg-info .pytest_cache
