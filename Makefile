# Two commands do all the set-up on a fresh machine (they create .venv on first use):
#   make demo   run the main job: every method's recipe in miniature (reproduce --profile quick, ~14 min on
#               2 CPU cores), its claims table, and the HTML report (the path is printed)
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
# The report is written even when a recipe failed (its rows say why); make then exits with reproduce's status.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/mmfactory reproduce --profile quick --output runs/demo; \
	status=$$?; $(VENV)/bin/mmfactory report runs/demo && exit $$status

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"
