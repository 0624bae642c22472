# Two entry points a newcomer needs: `make demo` (the main job) and `make test` (the whole suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo clean bench bench-quick soak

$(STAMP): pyproject.toml requirements/dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check ckptsync tests examples deploy bench
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Train a tiny GPT, SIGKILL it, resume on a "fresh VM" from the remote; prints "exact resume: yes".
demo: $(STAMP)
	$(BIN)/ckptsync demo

# Issue 16's proofs at full size: 200 randomized SIGKILL trials of trainer and daemon (~20 min),
# then push/pull/watch through 10% and 30% injected network faults over 50 checkpoints.
# SOAK_ARGS="--seed N" replays a run; CKPTSYNC_FAULT_SEED=N replays the fault tests.
soak: $(STAMP)
	$(BIN)/python -m tests.support.soak.soak --trials 200 $(SOAK_ARGS)
	CKPTSYNC_FAULT_CHECKPOINTS=50 $(BIN)/python -m pytest -q -s --timeout=1200 tests/e2e/test_faults_e2e.py

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) requirements/bench.txt
	$(BIN)/python -m pip install -q -r requirements/bench.txt
	touch $(BENCH_STAMP)

# Benchmarks against the peers (bench/README.md); results land in bench/results/.
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --full

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
