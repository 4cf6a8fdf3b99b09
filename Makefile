# Two commands set up a fresh machine (Python 3.10+ with pip):
#   make bench   venv + torch + build, then the benchmark runner (default preset)
#   make test    venv + torch + build, then the whole test suite
# Variables: PYTHON (interpreter that makes the venv), TORCH_SPEC (what pip installs for torch),
# TORCH_CUDA_ARCH_LIST (default 8.0;9.0), PYSEQK_NO_CUDA=1 (CPU-only build), MAX_JOBS.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: all venv build test bench info clean

all: test

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install "$(TORCH_SPEC)" numpy ninja pytest hypothesis tqdm matplotlib
	touch $@

venv: $(VENV)/.deps

# Editable install: pyseqk/_C is built in place, pyseqk.kernels maps to kernels/.
build: $(VENV)/.deps
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -m pyseqk info

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m bench

info: build
	$(PY) -m pyseqk info

clean:
	rm -rf build *.egg-info pyseqk/_C*.so
