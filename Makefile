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

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/train.py

clean:
	rm -rf $(VENV) demo_out runs .pytest_cache
