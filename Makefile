# Two commands on a fresh machine: `make demo` (a federated run on the embedded synthetic data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch; a GPU user installs their CUDA build into the venv first (see docs/operations.md).
TORCH ?= torch==2.13.0
# pytest workers: two, one per core of the CI box.
# --maxschedchunk 1: tests are handed out one by one, so the slow ones spread over the workers (tests/conftest.py).
# OMP_NUM_THREADS=1: one torch thread per process (each worker, each site a test starts): two workers that each ran
# torch on every core slowed each other (measured: the suite 661 s with torch's default, 578 s with one thread).
# The 20 slowest tests are listed after the run: CI must stay under 15 min on 2 cores.
TEST_WORKERS ?= 2

.PHONY: install demo test lint

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/fedrec-simulate

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy shared_model fl_client fl_server simulations
	$(BIN)/lint-imports

test: lint
	OMP_NUM_THREADS=1 $(BIN)/pytest -n $(TEST_WORKERS) --maxschedchunk 1 --durations=20
