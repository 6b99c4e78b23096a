# The two commands (see README):  make demo   and   make test
# Both create .venv when missing, install the project, and are quick the second time.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Quiet, reproducible, and local: no analytics, DVC's site cache inside the repo.
export DVC_NO_ANALYTICS := 1
export DVC_SITE_CACHE_DIR := $(CURDIR)/.dvc/tmp/site
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint typecheck unit pytest-main cluster install clean-runs help gpu-wheels

help:
	@echo "make demo   - install, then 'dvc repro' the default (tiny, CPU) pipeline"
	@echo "make test   - install, then linters, type check and the test suite"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# DVC runs each stage's `harness ...` command in a shell: the venv must be on its PATH.
demo: install
	@test -d .dvc || $(BIN)/dvc init --quiet
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo "report: $(CURDIR)/reports/index.html (summary: reports/summary.md)"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# Two test processes (most tests wait on subprocesses and imports: one core idles in a serial
# run), each module on one of them, handed out in collection order (tests/conftest.py puts the
# long end-to-end modules first; xdist's default order, most tests first, left them for last
# and one process idle meanwhile); then the real cluster tests (PostgreSQL, SLURM, worker
# processes) alone on a quiet machine, since their timing is what they check.
TEST_PROCESSES ?= 2
unit: pytest-main cluster

pytest-main: install
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadscope --no-loadscope-reorder -m "not cluster" --durations=25

cluster: install
	$(BIN)/python -m pytest -m cluster

# mypy (one process; ~70 s with a cold cache, as on a fresh CI machine) runs beside the main
# test processes, which leave a core partly idle while they wait on subprocesses; the cluster
# tests still run alone, after both.
test: lint
	@$(MAKE) --no-print-directory -j2 typecheck pytest-main
	@$(MAKE) --no-print-directory cluster

# The wheels a lent GPU machine lacks (it reaches no package index), for `.ci/gpu-check` there.
gpu-wheels: install
	$(BIN)/python .ci/gpu_wheels.py

clean-runs:
	rm -rf runs data/prepared data/sample reports/*.html
