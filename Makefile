# Every target does its own set-up from a bare clone: `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: demo demo-oft test test-slow lint format bench install install-dev install-aot install-libero compile-check clean

$(VENV)/.runtime: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The TPU and GPU compilers for ahead-of-time compile checks (scripts/compile_check.py): no hardware used.
$(VENV)/.aot: $(VENV)/.runtime requirements-aot.txt
	$(PY) -m pip install --quiet -r requirements-aot.txt
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev
install-aot: $(VENV)/.aot

# The LIBERO simulator (scripts/eval_libero.py, tests/envs/test_libero.py): ~730 MB download, ~1 min.
$(VENV)/.libero: $(VENV)/.runtime requirements-libero.txt
	$(PY) -m pip install --quiet -r requirements-libero.txt
	touch $@

install-libero: $(VENV)/.libero

demo: $(VENV)/.runtime
	$(PY) scripts/demo.py

demo-oft: $(VENV)/.runtime
	$(PY) scripts/demo.py --variant=oft_demo

# ruff (lint + format) on everything; pyright in basic mode on the library (pyrightconfig.json).
lint: $(VENV)/.dev $(VENV)/.aot $(VENV)/.libero  # the optional extras: pyright resolves their imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright

format: $(VENV)/.dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Two pytest workers (pytest-xdist): most cases are single-threaded jit compiles, so two cores run
# two cases at once; TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2

# make test installs the optional extras too, so the compile-check and LIBERO tests run (they skip,
# naming the missing extra, in an environment without them).
test: $(VENV)/.dev $(VENV)/.aot $(VENV)/.libero
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15

test-slow: $(VENV)/.dev $(VENV)/.aot $(VENV)/.libero
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m slow || [ $$? -eq 5 ]  # 5: no slow case collected yet

# Does the 7B pretraining step fit? `make compile-check TARGET=v5p-64 ARGS=--rows_per_device=8`
TARGET ?= h100:1x8
compile-check: $(VENV)/.aot
	$(PY) scripts/compile_check.py --config=configs/train.py:openvla_7b_pretrain --target=$(TARGET) $(ARGS)

bench: $(VENV)/.dev
	$(PY) scripts/bench.py --case all

clean:
	rm -rf $(VENV) build *.egg-info
