# Two entry points a newcomer needs: `make demo` (the main job) and `make test` (the core tier of
# the suite, under 10 minutes); `make test-full` runs every tier (what CI runs).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-full test-floors lint demo clean bench bench-quick soak

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

# Tiers (tests/support/tiers.py): `make test` runs the core tier; `make test-full` runs `make
# test`, then the full tier (every test is in exactly one of them).
# Each runs in two passes: the tests on both cores (pytest-xdist, one module per worker, so a
# module's servers and fixtures are set up once), then the `serial` tests (a kill at a moment,
# pacing, CPU use) alone. Exit code 5 is "no test selected" (a tier without serial tests).
XDIST ?= -n 2 --dist loadfile
PYTEST := $(BIN)/python -m pytest --durations=15
define run_tier
	$(PYTEST) --tier $(1) -m "not serial" $(XDIST) $(PYTEST_ARGS)
	$(PYTEST) --tier $(1) -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]
endef

test: lint
	$(call run_tier,core)

test-full: test
	$(call run_tier,full)

# Issue 20: the declared dependency floors are true. A separate venv holds the LOWEST version
# each floor in pyproject.toml admits (requirements/floors.txt; tests/unit/test_floors.py keeps
# the two equal); the remote conformance suite runs with them on file:// and S3 (SeaweedFS),
# with torch made unimportable (the daemon side is torch-free), then the torch-using client
# tests run with torch's and numpy's floors (requirements/floors-torch.txt). The venv is
# rebuilt from scratch whenever a floor changes, so nothing newer lingers in it.
# torch is the exception: its floor in pyproject.toml (2.9) is the oldest torch with every API
# ckptsync uses, listed there, but this job runs torch 2.13.0, the lowest torch it can install
# here: PyPI serves torch 2.9 to 2.12 for Linux x86_64 only as CUDA builds (a 0.9 GB wheel that
# pulls several GB of nvidia-* libraries), and 2.13.0 is the CPU wheel these machines have.
FLOORS_VENV ?= .venv-floors
FLOORS_BIN := $(FLOORS_VENV)/bin
FLOORS_STAMP := $(FLOORS_VENV)/.installed
FLOORS_TORCH_STAMP := $(FLOORS_VENV)/.torch-installed
# file:// and SeaweedFS only (the other backends need servers or packages of their own); the
# Checkpointer tests run in the torch phase; and s3fs open("xb") is left out: ckptsync never
# opens a remote file "xb" (its create-only write is pipe_file(mode="create"), tested here),
# and s3fs 2024.12 does not refuse a second open("xb"), a fact about s3fs, not a need of ours.
FLOORS_SELECT := not moto and not gcs and not drive and not memory and not process_group \
	and not checkpointer and not open_xb
FLOORS_TORCH_TESTS := tests/unit/test_local.py tests/integration/test_restore.py \
	tests/integration/test_checkpointer_remote.py \
	tests/conformance/test_faults.py::test_checkpointer_restore_survives_a_reset_mid_body

$(FLOORS_STAMP): pyproject.toml requirements/floors.txt
	rm -rf $(FLOORS_VENV)
	$(PY) -m venv $(FLOORS_VENV)
	$(FLOORS_BIN)/python -m pip install -q -r requirements/floors.txt
	$(FLOORS_BIN)/python -m pip install -q --no-deps -e .
	$(FLOORS_BIN)/python -m pip check
	touch $(FLOORS_STAMP)

$(FLOORS_TORCH_STAMP): $(FLOORS_STAMP) requirements/floors-torch.txt
	$(FLOORS_BIN)/python -m pip install -q -r requirements/floors-torch.txt
	touch $(FLOORS_TORCH_STAMP)

test-floors: $(FLOORS_STAMP)
	CKPTSYNC_STORE_BACKENDS=file,seaweedfs $(FLOORS_BIN)/python -m pytest -q \
		-p tests.support.no_torch tests/conformance -k "$(FLOORS_SELECT)" $(PYTEST_ARGS)
	$(MAKE) $(FLOORS_TORCH_STAMP)
	$(FLOORS_BIN)/python -m pytest -q $(FLOORS_TORCH_TESTS) $(PYTEST_ARGS)

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
	rm -rf $(VENV) $(FLOORS_VENV) .pytest_cache .mypy_cache .ruff_cache
