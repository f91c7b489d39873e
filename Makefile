# `make test` and `make demo` work from a fresh clone: they create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first and pinned: the CPU build on disk. Reinstall when setup.py changes.
$(STAMP): $(PY) setup.py
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest tests -q

demo: setup
	$(PY) -m mmspec_jax.demo

# Decoding speed (not part of `make test`): results/bench.{json,md} and plots under artifacts/.
bench: setup
	$(PY) -m mmspec_jax.bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
