# Two entry points that work on a fresh machine: `make demo` and `make test`.
# The virtual environment lives outside the checkout, keyed on pyproject.toml, so a
# second checkout (or CI) with the same dependencies reuses it; the project itself is
# used from the checkout through PYTHONPATH, never installed into the shared venv.
SHELL := /bin/bash
PYTHON ?= python3
DEPS_HASH := $(shell cat pyproject.toml .ci/requirements-test.txt 2>/dev/null | sha256sum | cut -c1-16)
VENV ?= $(HOME)/.cache/yokai/venv-$(DEPS_HASH)
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export NUMBA_CACHE_DIR ?= $(HOME)/.cache/yokai/numba
WORKSPACE ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench system-deps

$(VENV)/.ready: pyproject.toml .ci/requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(PYTHON) .ci/deps.py pyproject.toml ml train dev > $(VENV)/requirements.txt
	$(VENV)/bin/pip install -q -r $(VENV)/requirements.txt -r .ci/requirements-test.txt
	touch $@

setup: $(VENV)/.ready

# Debian's chromium and its WebDriver for the browser tests (HTML report, review app, Prefect UI).
system-deps:
	@(command -v chromium && command -v chromedriver) >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

demo: setup
	$(PY) -m yokai_pipeline.cli demo --workspace $(WORKSPACE)

test: setup system-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check --line-length 110 .

bench: setup
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done
