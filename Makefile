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

# Two workers, each taking whole test files (module-scoped fixtures are built once): much of a
# test's time is single-threaded tracing and compiling, so 2 cores run the suite ~1.4x faster.
test: setup
	$(PY) -m pytest tests -q -n 2 --dist loadfile

demo: setup
	$(PY) -m mmspec_jax.demo

# Decoding speed (not part of `make test`): results/bench.{json,md} and plots under artifacts/.
bench: setup
	$(PY) -m mmspec_jax.bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
