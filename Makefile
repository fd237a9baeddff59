# Two commands do all the set-up on a fresh machine: `make demo` (the main job on the embedded
# SYNTHETIC default checkpoint) and `make test`.
# Both create or reuse .venv; torch is installed first and pinned (an unpinned torch pulls a CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-newest lint bench clean test-modelopt-versions

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
	$(BIN)/ruff check moeq_triton tests benchmarks tools

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

# The calibrator against the other supported ModelOpt releases (0.47 is the pinned one, tested above): one venv
# per version, the pins of constraints.txt except ModelOpt's; the default tier of the backend, patch, shared-scale
# and scale-mode tests and one family comparison (the slow subprocess tests fake their ModelOpt version, so the
# 0.47 run covers them).
MODELOPT_VERSIONS ?= 0.45.0 0.46.1
MODELOPT_VERSION_TESTS ?= tests/modelopt/test_modelopt_backend.py tests/modelopt/test_modelopt_patches.py \
	tests/modelopt/test_shared_scale_group.py tests/modelopt/test_scale_modes.py
MODELOPT_VERSION_FAMILY ?= "tests/export/test_families.py::test_export_hf_equals_modelopt_export[deepseek_v3-triton_grouped]"

.venv-modelopt-%/.installed: pyproject.toml constraints.txt
	test -x .venv-modelopt-$*/bin/python || $(PYTHON) -m venv .venv-modelopt-$*
	grep -v '^nvidia-modelopt==' constraints.txt > .venv-modelopt-$*/constraints.txt
	.venv-modelopt-$*/bin/pip install -q -c .venv-modelopt-$*/constraints.txt torch
	.venv-modelopt-$*/bin/pip install -q -c .venv-modelopt-$*/constraints.txt -e '.[test]' nvidia-modelopt==$*
	touch $@

test-modelopt-versions: $(foreach v,$(MODELOPT_VERSIONS),.venv-modelopt-$(v)/.installed)
	for v in $(MODELOPT_VERSIONS); do \
		.venv-modelopt-$$v/bin/python -m pytest -q -p no:cacheprovider -m "not slow" $(MODELOPT_VERSION_TESTS) \
		&& .venv-modelopt-$$v/bin/python -m pytest -q -p no:cacheprovider $(MODELOPT_VERSION_FAMILY) || exit 1; \
	done

clean:
	rm -rf $(VENV) $(VENV_NEWEST) .venv-modelopt-* *.egg-info .pytest_cache
