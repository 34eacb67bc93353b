# Two commands matter: `make run` and `make test`. Everything else is for developers.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test lint typecheck check bench bench-soak screenshots clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[fast]"
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP) $@

run: $(STAMP)
	$(BIN)/first-hop-proxy serve

# Line and branch coverage is reported; below [tool.coverage.report] fail_under the run fails.
test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q --cov

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests bench main.py
	$(BIN)/ruff format --check src tests bench main.py

typecheck: $(TEST_STAMP)
	$(BIN)/mypy

check: lint typecheck test

# The README's dashboard screenshots, in the browser the tests use (needs Chromium).
screenshots: $(TEST_STAMP)
	$(BIN)/python -m tests.browser.screenshot docs

bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-soak: $(STAMP)
	$(BIN)/python bench/run.py --soak

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*
