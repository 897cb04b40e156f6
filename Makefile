# Two commands do all set-up on a fresh machine:
#   make demo   train a small looped model, sweep its depth, print the table
#   make test   run the whole test suite
# Both create (or reuse) .venv and install the package with pinned torch from constraints.txt.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXTRAS := dev,hf,plot,tensorboard,serve,eval

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m open_mythos demo

# The suite runs on one worker per logical CPU (pytest-xdist; at most 8): every test runs
# on one thread (tests/conftest.py), so 2 cores take about two thirds of the serial time.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= logical

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 8

bench: $(STAMP)
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/train.py

# The environment and caches only: trained runs (runs/, demo_out/) are results, removed by
# hand when no longer wanted.
clean:
	rm -rf $(VENV) .pytest_cache
