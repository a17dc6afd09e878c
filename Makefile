# Self-documenting: `make help` lists every target with its `##` comment.
# Every target that runs Python depends on the virtual environment, which `make` creates or
# updates by itself (re-installed only when the content of pyproject.toml changes).
# `make demo VENV=/path/to/env` uses another environment; one installed from the same
# pyproject.toml (e.g. the checkout's .venv, for a fresh clone) is reused as it is.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench
MUTATION_STAMP := $(VENV)/.installed-mutation
# the stamps hold the checksum of the pyproject.toml they were installed from (content, not
# mtime: a fresh clone or checkout does not trigger a re-install)
PYPROJECT_SUM := $(shell cksum < pyproject.toml)
comma := ,
RUNS := $(or $(SHINE_RUNS),runs)
PYTEST_ARGS ?=
# `make mutation PACKAGES=shine/backward` (folders or module files) restricts the mutation run
PACKAGES ?= shine/solvers shine/backward shine/deq shine/bilevel

OPA_RUN := $(RUNS)/opa_inversion/seed=0

.PHONY: help venv bench-venv mutation-venv mutation test test-gpu test-quick demo bench bench-core bench-bilevel bench-deq sweeps-bilevel collect lint format figures clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# $(call install,EXTRAS,STAMP): create $(VENV) if needed, then pip install -e ".[EXTRAS]" unless
# STAMP holds the checksum of this pyproject.toml
define install
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ "$$(cat $(2) 2>/dev/null)" != "$(PYPROJECT_SUM)" ]; then \
		echo '$(PY) -m pip install --quiet -e ".[$(1)]"'; \
		$(PY) -m pip install --quiet -e ".[$(1)]" && echo "$(PYPROJECT_SUM)" > $(2); \
	fi
endef

venv: ## create or update .venv (pip install -e ".[dev]"; no-op when up to date)
	$(call install,dev,$(VENV_STAMP))

test: venv ## run the whole test suite, slow end-to-end tests included (~12 min on 2 cores, 728 s measured; one OpenMP thread per process)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest $(PYTEST_ARGS)

test-gpu: venv ## on a CUDA machine: the gpu-marked tests, then bench-deq on the GPU (< 8 min; they skip without a device)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -m gpu -rs $(PYTEST_ARGS)
	@if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) scripts/bench_deq.py --device cuda; \
	else echo "no CUDA device: bench-deq on the GPU skipped"; fi

test-quick: venv ## run the tests not marked slow
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: venv ## main job: SHINE vs HOAG vs JF (bi-level, faithful + robust) and vs the original DEQ backward (digits), figures, summary (one OpenMP thread)
	@start=$$(date +%s); export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}; \
	$(PY) train.py -m +sweep=demo_bilevel && \
	for m in original shine jacobian_free; do $(PY) train.py +experiment=digits method=$$m || exit 1; done && \
	$(PY) train.py +experiment=opa_inversion && \
	$(PY) scripts/collect.py demo --out $(RUNS)/demo && \
	$(PY) scripts/fig_bilevel.py demo --table $(RUNS)/demo/demo/runs.csv --out figures/demo && \
	$(PY) scripts/fig_opa_inversion.py "$(OPA_RUN)" && \
	$(PY) scripts/demo_summary.py --runs $(RUNS) && \
	echo "demo done in $$(( $$(date +%s) - start )) s: figures in figures/demo/ and figures/opa_inversion.{pdf,png}"

bench-venv: venv
	$(call install,dev$(comma)bench,$(BENCH_STAMP))

bench: bench-core bench-bilevel bench-deq ## every benchmark (prints measured ratios and PASS/FAIL targets)

bench-core: bench-venv ## core solvers and backward strategies on an MDEQ-sized state (scripts/bench_core.py)
	$(PY) scripts/bench_core.py

bench-bilevel: venv ## inner L-BFGS vs SciPy, time to 1 %/0.1 % per HOAG method, ~15 min (scripts/bench_bilevel.py)
	$(PY) scripts/bench_bilevel.py

bench-deq: venv ## Table E.2 protocol on the CIFAR-LARGE MDEQ: fwd/bwd per method, SHINE memory, ~3 min (scripts/bench_deq.py)
	$(PY) scripts/bench_deq.py

mutation-venv: venv
	$(call install,dev$(comma)mutation,$(MUTATION_STAMP))

# mutmut 3 runs on a `git archive` of HEAD (commit first) in $(RUNS)/mutation/work; its cache
# there makes a rerun re-test only the changed functions. Exit status 1 below 95 % killed.
mutation: mutation-venv ## mutation testing (mutmut) of solvers/backward/deq/bilevel vs the quick tests: report in runs/mutation/ (a full run ~50 min on 2 shared cores: 6131 mutants, ~2/s; reruns re-test only changed functions, measured 5 min after an edit of LBFGS.__call__; PACKAGES=shine/deq restricts)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} nice -n 10 $(PY) tests/mutation/run.py \
		--packages $(PACKAGES) --out $(RUNS)/mutation

# Bi-level sweeps that run offline (the 20news-sized synthetic set, breast cancer), with the
# authors' algorithm (faithful) and ours (robust); the paper's data sets are the same commands
# with dataset=news20 / dataset=real_sim.
BILEVEL_SWEEPS := fig1 fig2_left fig_e2
BILEVEL_DATA := synthetic_news breast_cancer_split
BILEVEL_MODES := faithful robust
ARTEFACTS := fig1 fig_e1 fig2_left fig_e2
DEQ_FIGURES := fig3 fig_e3
DEQ_TABLES := table_e1 table_e2 table_e3

sweeps-bilevel: venv ## run the bi-level figure sweeps on the offline data sets, both modes (~1.1 CPU h)
	@for sweep in $(BILEVEL_SWEEPS); do for data in $(BILEVEL_DATA); do for mode in $(BILEVEL_MODES); do \
		OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) train.py -m +sweep=$$sweep dataset=$$data \
			method.mode=$$mode || exit 1; done; done; done

collect: venv ## gather the runs of every artefact into experiments/<artefact>/runs.csv
	@for a in $(ARTEFACTS) $(DEQ_FIGURES) $(DEQ_TABLES); do $(PY) scripts/collect.py $$a --update-committed || exit 1; done

lint: venv ## ruff check + ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

figures: venv ## regenerate the figures and tables from experiments/ (and runs), then experiments/paper_vs_ours.md
	@for a in $(ARTEFACTS); do \
		if [ -f experiments/$$a/runs.csv ]; then $(PY) scripts/fig_bilevel.py $$a || exit 1; \
		else echo "experiments/$$a/runs.csv missing: run the sweep, then make collect"; fi; done
	@for a in $(DEQ_FIGURES); do \
		if [ -f experiments/$$a/runs.csv ]; then $(PY) scripts/fig_deq.py $$a || exit 1; \
		else echo "experiments/$$a/runs.csv missing: see experiments/README.md"; fi; done
	@for a in $(DEQ_TABLES); do \
		if [ -f experiments/$$a/runs.csv ]; then $(PY) scripts/tables_deq.py $$a || exit 1; \
		else echo "experiments/$$a/runs.csv missing: see experiments/README.md"; fi; done
	@if [ -f "$(OPA_RUN)/metrics.jsonl" ]; then $(PY) scripts/fig_opa_inversion.py "$(OPA_RUN)"; \
	else echo "$(OPA_RUN) missing: make demo runs it"; fi
	$(PY) scripts/paper_vs_ours.py

clean: ## remove caches and build artefacts (keeps .venv, runs/ and figures/)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
