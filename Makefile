# The two set-up commands: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv and install into it on first use; later runs reuse it (re-installed when pyproject changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export TORCH_EXTENSIONS_DIR := $(CURDIR)/build/torch_extensions
export DS_ACCELERATOR ?= cpu

.PHONY: install demo test cluster lint bench clean
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned with its torchvision, so that no later resolution swaps it for another build
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/mlfm demo

# the launcher tests submit jobs to a real local 2-node SLURM cluster: started here (idempotent; installs
# slurm-wlm and munge when missing, needs root)
cluster:
	ops/local-slurm/up.sh

test: install cluster
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check mlfm_scale data_prep launchers tests benchmarks

bench: install
	$(BIN)/python benchmarks/prep_throughput.py

clean:
	rm -rf runs build .pytest_cache
