# zeroplane: `make demo` runs the main job end to end on a local Ray head; `make test` runs the tests.
# Both create .venv on first use (torch 2.13.0 CPU wheel first, then the project).
# `make bench` runs bench/run_all.py (all benchmarks, ~17 min on 2 cores; results in bench/results/, published to bench/report/).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
ZP      = $(BIN)/zeroplane
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast bench down clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

# The demo: every step is a zeroplane command. The job id is taken from `train list -o json`.
demo: venv
	@set -e; start=$$(date +%s); \
	echo "== zeroplane cluster up"; $(ZP) cluster up; \
	echo "== zeroplane train submit jobs/pydoc-gpt.yaml --wait"; \
	$(ZP) train submit jobs/pydoc-gpt.yaml --wait; \
	job=$$($(ZP) train list -o json | $(BIN)/python -c 'import json,sys; print(next(j["job_id"] for j in json.load(sys.stdin) if j["name"]=="pydoc-gpt"))'); \
	echo "== zeroplane checkpoints list $$job"; $(ZP) checkpoints list $$job; \
	echo "== zeroplane promote $$job --name pydoc-gpt"; $(ZP) promote $$job --name pydoc-gpt; \
	echo "== zeroplane serve keys create --save"; $(ZP) serve keys create --name demo --save >/dev/null; \
	echo "== zeroplane complete pydoc-gpt 'The try statement'"; \
	$(ZP) complete pydoc-gpt "The try statement" --max-tokens 48 --temperature 0.7 --seed 0; \
	echo "== demo took $$(( $$(date +%s) - start ))s; the cluster keeps serving: 'make down' (zeroplane cluster down) stops it"

test: venv
	$(BIN)/python -m pytest tests -q $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest tests/unit -q $(PYTEST_ARGS)

# The benchmarks also need the `bench` extra (matplotlib, for the plots).
$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

bench: $(BIN)/.bench-installed
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

down: venv
	$(ZP) cluster down

clean:
	rm -rf $(VENV) build *.egg-info
