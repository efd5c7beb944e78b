# The two README commands. Each creates .venv if missing and installs into it: torch FIRST
# (the CPU wheel on local disk), then the package, so nothing drags in a CUDA build of torch.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
# Where torch comes from: empty = the default index (here a CPU wheel). For a CUDA build:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?=
# DeepSpeed JIT-compiles its CPU comm op once; keep the cache with the venv so reruns skip it.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export DS_ACCELERATOR ?= cpu
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_ENABLE_TELEMETRY ?= false
export DO_NOT_TRACK ?= 1

.PHONY: install chromium postgresql quickstart test test-fast lint bench reference clean

install: $(STAMP) chromium postgresql

# Debian's chromium, for the report's browser test (tests/e2e/test_report_in_browser.py): Playwright
# drives this one (it downloads no browser of its own). Needs root, as CI and the dev machines are.
chromium:
	test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# Debian's PostgreSQL server programs (in /usr/lib/postgresql/<version>/bin), for the MLflow-on-PostgreSQL
# test (tests/e2e/test_mlflow_postgres.py) and `opt-study mlflow-server`. Needs root, like chromium.
postgresql:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	# [hf]: transformers for the hf_causal_lm adapter and its tests (about 15 s from the local index,
	# torch untouched). Not [vision]: PyPI's torchvision 0.28.0 is a CUDA build that does not import
	# over the CPU torch.
	$(BIN)/python -m pip install -q -e ".[dev,hf]"
	$(BIN)/python -m opt_study.prebuild
	touch $(STAMP)

quickstart: install
	$(BIN)/opt-study run configs/quickstart.yaml
	$(BIN)/opt-study report results/quickstart

# Everything (what CI runs): tests/unit, tests/multirank (torchrun), tests/e2e (Ray, real studies).
test: install chromium postgresql
	$(BIN)/python -m pytest -q --durations=40 tests

# The unit tests only (no Ray cluster, no torchrun): about 2 min on 2 cores.
test-fast: install
	$(BIN)/python -m pytest -q tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python benchmarks/run_all.py

# docs/reference.md, every study key, from the comments beside the config fields (tests/unit/test_reference.py).
reference: install
	$(BIN)/python tools/gen_reference.py > docs/reference.md

clean:
	rm -rf $(VENV) results .pytest_cache
