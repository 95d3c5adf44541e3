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

# Bytecode: pip compiles each package's files one by one as it installs (154 s for all of them on the 2-core CI
# box); installing with --no-compile and compiling afterwards on every core is faster (`install`; `lint` does it
# beside mypy), and torch's files (with sympy's, a third of what is compiled) compile on the core pip leaves idle
# while it installs the rest. The .pyc files matter: this environment may set PYTHONDONTWRITEBYTECODE, and
# without them every process (each test worker, each site's ClientApp) compiled its imports again, twice as slow.
# Like pip, compileall skips the few files it cannot compile (packages' Python 2 examples); it only writes caches.
# Left out: what no fedrec process imports (packages' own tests, transformers' other model families, pip,
# setuptools, scikit-learn, Ray's libraries above its core): 20,047 files -> 11,235, 62 s -> 44 s on 2 cores.
NOT_IMPORTED := '/tests?/|/transformers/models/(?!(auto|bert|encoder_decoder)/)[^/]+/|/site-packages/(pip|setuptools|sklearn)/|/ray/(data|train|tune|serve|rllib|air|llm)/'
COMPILE_LIBS := $(BIN)/python -m compileall -q -x $(NOT_IMPORTED)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q --no-compile "$(TORCH)"
	$(COMPILE_LIBS) -j 1 $(VENV)/lib/python*/site-packages/torch $(VENV)/lib/python*/site-packages/sympy \
	    > /dev/null & compiling=$$!; \
	$(BIN)/python -m pip install -q --no-compile -e ".[dev]"; installed=$$?; wait $$compiling; exit $$installed
	touch $@

COMPILE := $(COMPILE_LIBS) -j 0 $(VENV)/lib shared_model fl_client fl_server simulations > /dev/null

install: $(VENV)/.installed
	$(COMPILE) || true

demo: install
	$(BIN)/fedrec-simulate

# The bytecode compiles on both cores while mypy checks on one (mypy alone is about 50 s on a fresh checkout).
lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(COMPILE) & compiling=$$!; $(BIN)/mypy shared_model fl_client fl_server simulations; checked=$$?; \
	wait $$compiling; exit $$checked
	$(BIN)/lint-imports

test: lint
	OMP_NUM_THREADS=1 $(BIN)/pytest -n $(TEST_WORKERS) --maxschedchunk 1 --durations=20
