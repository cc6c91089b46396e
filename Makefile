# saekit — `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; an unpinned torch would pull several GB of CUDA packages.
TORCH  ?= torch==2.13.0

.PHONY: help install demo test test-cluster test-all test-gpu bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install:  ## make .venv, install torch (CPU build) then saekit with its test extras
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[dev]"

demo:  ## train a TopK SAE on stories260k (blocks.2.hook_resid_post), then re-evaluate its checkpoint (about 20 s on 2 cores)
	$(BIN)/saekit train activation=topk k=8 n=512 data.ctx_len=64 hydra.run.dir=outputs/demo/topk
	$(BIN)/saekit eval ckpt=outputs/demo/topk hydra.run.dir=outputs/demo/topk_eval

test:  ## the fast offline test suite, a test file per core (14–17 minutes on 2 cores)
	$(BIN)/pytest -m "not slow and not gpu and not distributed and not slurm" -q -n 2 --dist loadfile

test-cluster:  ## multi-process tests: real gloo process groups (2-4 ranks) and a local SLURM cluster (root; about 4 minutes)
	$(BIN)/pytest -m "(distributed or slurm) and not slow and not gpu" -q

test-all:  ## every test, the slow ones included (gpu tests skip without CUDA)
	$(BIN)/pytest -q

test-gpu:  ## the CUDA tests (run on a machine with a GPU)
	$(BIN)/pytest -m gpu -q

bench:  ## training speed vs the FLOP floor, cache/loader speed, memory → bench/results.csv (about 7 minutes on 2 cores)
	$(BIN)/python bench/speed.py --out bench/results.csv

clean:  ## remove run folders and activation caches under outputs/
	rm -rf outputs/train outputs/eval outputs/cache outputs/sweeps outputs/activations outputs/demo
