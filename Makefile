# Each target sets up .venv itself; on a fresh machine `make demo` and `make test` are all you need.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch 2.13.0 (CPU build) lies on these machines' local disk; installing it first keeps pip from
# pulling a multi-GB CUDA build for the `torch>=2.9` requirement. Elsewhere set TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint format bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import torch" 
	$(BIN)/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import qwen_cpt, transformers, wandb, pytest"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/qwen-cpt demo --output-dir demo_output

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks scripts
	$(BIN)/ruff format src tests benchmarks scripts

# Two workers, each test file on one of them (files share their tiny models and runs): about half
# the serial time on two cores. `make test PYTEST_WORKERS=0` runs it in one process.
PYTEST_WORKERS ?= 2
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile tests

# docs/config.md is generated from CPTConfig; tests/test_docs.py fails when it is stale.
docs: $(STAMP)
	$(BIN)/python scripts/gen_config_reference.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache .ruff_cache
