# Two commands do all the set-up on a fresh machine (they create .venv on first use):
#   make demo   run the main job: the lm/tiny recipe end to end on the built-in world, printing its results
#   make test   ruff + the fast CPU test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0  # the CPU wheel first, so no CUDA wheels are pulled
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# One torch thread: the tiny demo models run about 2x faster than with OpenMP's two on a 2-core machine.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/mmfactory run lm/tiny --output runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"
