# Two entry points, as the README says: `make quickstart` and `make test`.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: venv install quickstart test test-slow clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch 2.13.0 CPU is installed first from the local wheel, so no later requirement pulls a CUDA build.
install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'

quickstart: install
	$(BIN)/instructkit quickstart

test: install
	$(BIN)/python -m pytest -q -m "not slow" tests

test-slow: install
	$(BIN)/python -m pytest -q -m "slow_ci" tests

clean:
	rm -rf $(VENV) runs .pytest_cache
