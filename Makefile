# Two commands do all the set-up on a fresh machine: `make demo` (the main job on the embedded
# SYNTHETIC default checkpoint) and `make test`.
# Both create or reuse .venv; torch is installed first and pinned (an unpinned torch pulls a CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench clean

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

lint: $(STAMP)
	$(BIN)/ruff check moeq_triton tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
