# Two entry points that work on a fresh machine: `make demo` and `make test`.
# The virtual environment lives outside the checkout, keyed on pyproject.toml, so a
# second checkout (or CI) with the same dependencies reuses it. `make setup` installs this
# checkout into it editable and without dependencies (seconds) every time it runs, so the
# `yokai` command exists and points at the checkout that ran setup last; `.venv` in the
# checkout links to the environment (`source .venv/bin/activate`). Tests and the demo also
# get PYTHONPATH=$(CURDIR), so they always use this checkout whichever one installed last.
SHELL := /bin/bash
PYTHON ?= python3
DEPS_HASH := $(shell cat pyproject.toml .ci/requirements-test.txt 2>/dev/null | sha256sum | cut -c1-16)
VENV ?= $(HOME)/.cache/yokai/venv-$(DEPS_HASH)
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# The temporary API server can take over the default 20 s to start on a loaded 2-core machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export NUMBA_CACHE_DIR ?= $(HOME)/.cache/yokai/numba
WORKSPACE ?= runs/demo
PYTEST_ARGS ?= --durations=30

.PHONY: setup demo test lint bench system-deps

$(VENV)/.ready: pyproject.toml .ci/requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(PYTHON) .ci/deps.py pyproject.toml ml train dev > $(VENV)/requirements.txt
	$(VENV)/bin/pip install -q -r $(VENV)/requirements.txt -r .ci/requirements-test.txt
	touch $@

# The `yokai` console script for this checkout (editable: code changes need no reinstall).
setup: $(VENV)/.ready
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
		|| $(VENV)/bin/pip install -q --no-deps -e .
	ln -sfn $(VENV) .venv
	@echo "ready: source .venv/bin/activate && yokai --help"

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
