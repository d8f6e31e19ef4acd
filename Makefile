# Two commands on a fresh machine:  `make demo` (install + main job)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install dev lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# torch is pinned first: the CPU build 2.13.0; an unpinned torch pulls several GB of CUDA packages.
# open_clip_torch, the open_clip parity tests' reference, without its dependencies: they would pull
# PyPI's torchvision, a CUDA build that does not load with the CPU torch (the tests need none of it).
$(VENV)/.dev: $(VENV)/.installed
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev

demo: $(VENV)/.installed
	$(VENV)/bin/larv demo

test: $(VENV)/.dev
	$(PY) -m pytest

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check larv_jax tests benchmarks configs

bench: $(VENV)/.dev
	$(PY) benchmarks/diagnostics.py && $(PY) benchmarks/merge.py && $(PY) benchmarks/forward.py

clean:
	rm -rf $(VENV) results
