# Self-documenting: `make help` lists every target with its `##` comment.
# Every target that runs Python depends on the virtual environment, which `make` creates or
# updates by itself (re-installed only when pyproject.toml changes).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench
RUNS := $(or $(SHINE_RUNS),runs)
PYTEST_ARGS ?=

OPA_RUN := $(RUNS)/opa_inversion/seed=0

.PHONY: help venv test test-quick demo bench lint format figures clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

venv: $(VENV_STAMP) ## create or update .venv (pip install -e ".[dev]"; no-op when up to date)

test: venv ## run the whole test suite, slow end-to-end tests included (~2 min on 2 cores)
	$(PY) -m pytest $(PYTEST_ARGS)

test-quick: venv ## run the tests not marked slow
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: venv ## main job: OPA inversion study (paper Fig. 2 right) on CPU, then its figure
	@start=$$(date +%s); \
	$(PY) train.py +experiment=opa_inversion && \
	$(PY) scripts/fig_opa_inversion.py "$(OPA_RUN)" && \
	echo "demo done in $$(( $$(date +%s) - start )) s: run in $(OPA_RUN), figure in figures/opa_inversion.{pdf,png}"

$(BENCH_STAMP): pyproject.toml $(VENV_STAMP)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	@touch $@

bench: $(BENCH_STAMP) ## time the core solvers and backward strategies (scripts/bench_core.py)
	@if [ -f scripts/bench_core.py ]; then $(PY) scripts/bench_core.py; \
	else echo "scripts/bench_core.py does not exist yet: nothing to benchmark"; fi

lint: venv ## ruff check + ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

figures: venv ## regenerate the figures from the logged metrics of their runs
	$(PY) scripts/fig_opa_inversion.py "$(OPA_RUN)"

clean: ## remove caches and build artefacts (keeps .venv, runs/ and figures/)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
