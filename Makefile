# The two Quickstart commands: `make demo` and `make test`. Each works on a fresh machine with python3
# and a C++ compiler: it makes .venv with PyTorch (CPU build pinned below, so pip never pulls the
# multi-GB CUDA wheels), builds ring_ext against it, and runs.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
JOBS   ?= 2
BIN    := $(VENV)/bin

.PHONY: install demo test lint format

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" ninja pytest numpy expecttest transformers

install: $(BIN)/activate
	MAX_JOBS=$(JOBS) $(BIN)/pip install -q --no-build-isolation -e .

demo: install
	$(BIN)/python -m ring_ext demo

test: install
	$(BIN)/python -m pytest -q tests

lint: $(BIN)/activate
	$(BIN)/pip install -q ruff clang-format
	$(BIN)/ruff check ring_ext tests benchmarks examples tools setup.py
	$(BIN)/ruff format --check ring_ext tests benchmarks examples setup.py
	$(BIN)/clang-format --dry-run --Werror $$(git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh')

format: $(BIN)/activate
	$(BIN)/pip install -q ruff clang-format
	$(BIN)/ruff check --fix ring_ext tests benchmarks examples setup.py
	$(BIN)/ruff format ring_ext tests benchmarks examples setup.py
	$(BIN)/clang-format -i $$(git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh')
