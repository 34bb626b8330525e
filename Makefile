# The two Quickstart commands: `make demo` and `make test`. Each works on a fresh machine with python3
# and a C++ compiler: it makes $(VENV) with the pinned torch, builds ring_ext against it, and runs.
#
# Which torch (README, "What gets downloaded"): pip installs $(TORCH) from PyPI with $(TORCH_INDEX) as an
# extra index. The default TORCH_INDEX is PyTorch's CPU index, whose `2.13.0+cpu` wheel (about 190 MB,
# no CUDA dependencies) outranks PyPI's `2.13.0` (the CUDA 13 build: a 527 MB wheel that pulls the CUDA
# toolkit, cuDNN and NCCL wheels). For the CUDA build on a GPU machine:
#   make test TORCH_INDEX=                                          # PyPI's default build (CUDA 13.0)
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cuXYZ    # another CUDA version
# Only torch comes from TORCH_INDEX (--no-deps), its dependencies from PyPI. A machine that cannot reach
# the CPU index (pip warns and retries it for about 8 s) still gets a CPU wheel that pip is configured to
# find on its disk (find-links), as this project's build machines do: `2.13.0+cpu` outranks PyPI's build.
# The venv is made once: to switch torch builds, remove $(VENV) first.
#
# Nothing is rebuilt on an unchanged tree: the build is stamped ($(BUILT)) and redone only when a file
# under csrc/, setup.py or pyproject.toml is newer (Python files need no build: the install is editable).
PYTHON      ?= python3
VENV        ?= .venv
TORCH       ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
JOBS        ?= 2
TESTS       ?= tests
BIN         := $(VENV)/bin
TORCH_PIP   := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
BUILT       := $(VENV)/.ring_ext-built
SOURCES     := $(shell find csrc -type f) setup.py pyproject.toml

SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: venv install demo test lint format

# The venv with what building ring_ext needs: the pinned torch and ninja (.ci/sdist_check.sh uses it too).
venv: $(VENV)/.torch-installed

$(VENV)/.torch-installed:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install --no-deps $(TORCH_PIP) "$(TORCH)"  # only torch itself from TORCH_INDEX
	$(BIN)/pip install "$(TORCH)" ninja                     # its dependencies, and ninja, from PyPI
	$(BIN)/python -c 'import torch; print("$(VENV): torch", torch.__version__, "CUDA", torch.version.cuda)'
	touch $@

$(VENV)/.test-deps-installed: $(VENV)/.torch-installed
	$(BIN)/pip install -q pytest numpy expecttest transformers
	touch $@

# The compile prints one line per source file ([done/total], from ninja); the full log is kept.
$(BUILT): $(VENV)/.torch-installed $(SOURCES)
	@echo "building ring_ext with $(JOBS) jobs (about 3 minutes on 2 cores); log: $(VENV)/build.log"
	MAX_JOBS=$(JOBS) $(BIN)/pip install -v --no-build-isolation -e . 2>&1 | tee $(VENV)/build.log \
	  | sed -nE 's|^ *\[([0-9]+/[0-9]+)\] .* -c [^ ]*/(csrc/[^ ]+) .*|  [\1] \2|p; /: error|^ *(error|ERROR)|Successfully installed/p'
	touch $@

install: $(BUILT)

demo: install
	$(BIN)/python -m ring_ext demo

test: install $(VENV)/.test-deps-installed
	$(BIN)/python -m pytest -q $(TESTS)

lint: $(VENV)/.torch-installed
	$(BIN)/pip install -q ruff clang-format
	$(BIN)/ruff check ring_ext tests benchmarks examples tools setup.py
	$(BIN)/ruff format --check ring_ext tests benchmarks examples setup.py
	$(BIN)/clang-format --dry-run --Werror $$(git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh')

format: $(VENV)/.torch-installed
	$(BIN)/pip install -q ruff clang-format
	$(BIN)/ruff check --fix ring_ext tests benchmarks examples setup.py
	$(BIN)/ruff format ring_ext tests benchmarks examples setup.py
	$(BIN)/clang-format -i $$(git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh')
