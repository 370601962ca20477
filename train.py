"""
Pre-train a model of any family model.py loads (GPT-NeoX, the Llama family) progressively: an optional embedding
phase (transformer frozen, only the token embeddings train, at their own learning rate, schedule and batch size), then
the full model. One process, or DDP or FSDP2 (parallelism='fsdp') under torchrun.

    python train.py config/oscar_de_embedding_tuning.py --max_iters=1000
    torchrun --standalone --nproc_per_node=8 train.py config/oscar_de_embedding_tuning.py
    torchrun --standalone --nproc_per_node=8 train.py config/oscar_de_embedding_tuning.py --parallelism=fsdp
    python train.py config/oscar_de_embedding_tuning.py --print_needs   # the init_from and data_dir it would read

Config: the defaults in TrainConfig below, then each config file (python assignments) in order, then --key=value.
"""

import functools
import importlib.util
import json
import math
import os
import re
import resource
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import configurator
from checkpoint import (FULL, SHARDED, broadcast_object, check_apart, check_out_dir, check_ranks_agree, claim_out_dir,
                        has_checkpoint, load_checkpoint, load_shards, lock_out_dir, out_dir_ready, release_out_dirs,
                        remove_temp_files, restore_replaced_run, save_checkpoint, wait_for_rank0)
from common import (UserError, atomic_dir, atomic_path, check_device, exp, json_safe, load_tokenizer, read_json,
                    resolve_model_dir, round_up, run_cli, save_tokenizer, tokenizer_file, torch_dtype,
                    write_errors, write_json)
from configurator import option
from data import Blocks, check_data_fingerprint, check_tokenizer, data_fingerprint, load_meta
from model import (FAMILIES, CausalLM, GPTNeoXConfig, LlamaConfig, config_from_dict, config_from_hf,
                   model_from_config)

# -----------------------------------------------------------------------------
# configuration: defaults <- config files <- --key=value

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    out_dir: str = option("out/train", group="I/O")
    data_dir: str = option("data/oscar_de")
    init_from: str = option("out/pythia-410m-clp-german", "HF-format directory or hub id | 'scratch' | 'resume'")
    init_revision: str = option("", "hub revision of init_from, e.g. 'step143000'")
    eval_interval: int = option(300, "optimizer steps between evaluations and checkpoints")
    eval_iters: int = option(50, "validation batches per periodic evaluation (the full set is evaluated at the end)")
    eval_at_start: bool = option(True)
    eval_only: bool = option(False, "evaluate the whole validation set into out_dir/eval_only.json and stop; the run "
                                    "in out_dir (with init_from=resume: the one evaluated) stays as it is")
    export_hf: bool = option(True, "write out_dir/hf (config, safetensors, tokenizer) at the end")
    override: bool = option(False, "a fresh run replaces a run in out_dir (kept aside until the new one's first "
                                   "checkpoint)")
    wandb_log: bool = option(False)
    wandb_project: str = option("clp-transfer")
    wandb_run_name: str = option("run")

    block_size: int = option(512, group="data and length: max_iters, else max_tokens, else epochs (passes over "
                                        "train.bin)")
    batch_size: int = option(8, "sequences per micro-batch per process")
    gradient_accumulation_steps: int = option(4, "micro-batches per optimizer step, summed over all processes: a "
                                                 "multiple of their number, or fewer than them, which means one each "
                                                 "(the study's per-device meaning: a step is then world_size x "
                                                 "batch_size sequences)")
    max_iters: int = option(0)
    max_tokens: int = option(0)
    epochs: float = option(1.0)
    seed: int = option(42)

    learning_rate: float = option(3e-4, group="full phase (or the whole run when embedding_tuning_frac = 0)")
    min_lr: float = option(3e-5, "every phase's learning rate is floored here, warmup included")
    warmup_frac: float = option(0.01)
    lr_schedule: str = option("cosine", "unified: one warmup and one cosine over the run",
                              choices=SCHEDULES + ("unified",))
    warmup_relative_to: str = option("run", "warmup fractions of the whole run or of their own phase",
                                     choices=("run", "phase"))
    weight_decay: float = option(0.1)
    beta1: float = option(0.9)
    beta2: float = option(0.95)
    grad_clip: float = option(1.0)

    embedding_tuning_frac: float = option(0.0, group="embedding phase: the first embedding_tuning_frac of the run, "
                                                     "in optimizer steps or in tokens")
    phase_unit: str = option("steps", choices=("steps", "tokens"))
    embedding_learning_rate: float = option(1e-3)
    embedding_warmup_frac: float = option(0.01)
    embedding_lr_schedule: str = option("cosine", choices=SCHEDULES)
    embedding_batch_size: int = option(0, "0: batch_size")
    embedding_gradient_accumulation_steps: int = option(0, "0: gradient_accumulation_steps (the same rule for "
                                                           "processes)")
    freeze_transformer: bool = option(True, "False: the study's \"accelerated start\" (all weights at the embedding "
                                            "LR)")
    train_output_embeddings: bool = option(True, "the output head trains in the embedding phase too (as in the study)")
    train_new_rows_only: bool = option(False, "an init made by clp.py apply_clp --extend: in the embedding phase only "
                                              "the appended tokens' rows train (ids from its clp_report.json's "
                                              "extend.source_ids on); the source's rows of both embedding matrices "
                                              "stay bit-identical (no gradient, no weight decay)")

    vocab_size: int = option(0, group="model for init_from='scratch' (vocab_size 0: the data's vocabulary padded to "
                                      "a multiple of 128)")
    model_type: str = option("gpt_neox", "the family and its HF model_type", choices=tuple(FAMILIES))
    n_layer: int = option(6)
    n_head: int = option(8)
    n_kv_head: int = option(0, "Llama family: key/value heads (grouped-query attention); 0: n_head")
    n_embd: int = option(512)
    intermediate_size: int = option(0, "0: 4 * n_embd (GPT-NeoX), 8/3 * n_embd rounded up to 64 (Llama family)")
    rotary_pct: float = option(0.25, "GPT-NeoX: the rotary share of each head (the Llama family rotates all of it)")
    rope_theta: float = option(10000.0, "Llama family: the rotary base (GPT-NeoX: rotary_emb_base, fixed at 10000)")
    tie_word_embeddings: bool = option(False, "Llama family: the output head shares the input embedding")

    device: str = option("auto", "auto | cpu | cuda | cuda:N", group="system")
    dtype: str = option("auto", "auto: bfloat16 on a GPU that has it, else float32",
                        choices=("auto", "bfloat16", "float16", "float32"))
    compile: str = option("auto", "torch.compile the model; auto: on a GPU, not on a CPU (where it gains nothing)",
                          choices=("auto", True, False))
    parallelism: str = option("ddp", "with several processes: ddp replicates the model, fsdp shards parameters, "
                                     "gradients and Adam state (FSDP2)", choices=("ddp", "fsdp"))
    activation_checkpointing: bool = option(False, "recompute each block's activations in backward: less memory, "
                                                   "more compute")
    backend: str = option("auto", "the process group's backend; auto: nccl on GPU, gloo on CPU",
                          choices=("auto", "nccl", "gloo"))
    ddp_timeout_s: int = option(600, "a rank that waits this long for a dead peer exits with an error")
    device_peak_flops: float = option(0.0, "for MFU, at the run's dtype; 0: looked up for known GPUs, none on CPU")
    max_nonfinite_steps: int = option(0, "optimizer steps with a non-finite loss to skip before stopping")


# dense tensor-core peaks per card and form factor: (bf16 and fp16 with fp32 accumulation, TF32), from NVIDIA's data
# sheets (their "with sparsity" figures halved). float32 runs use the TF32 figure (the trainer turns TF32 on). A card
# whose data sheet gives one form factor has the key ''.
PEAK_FLOPS = {("H200", "SXM"): (989e12, 494.7e12), ("H200", "NVL"): (835e12, 417.5e12),
              ("GH200", "SXM"): (989e12, 494.7e12), ("H100", "SXM"): (989e12, 494.7e12),
              ("H100", "PCIe"): (756e12, 378e12), ("H100", "NVL"): (835e12, 417.5e12),
              ("A100", "SXM"): (312e12, 156e12), ("A100", "PCIe"): (312e12, 156e12),
              ("L40S", ""): (362e12, 183e12), ("L40", ""): (181e12, 90.5e12), ("L4", ""): (121e12, 60e12),
              ("A10G", ""): (70e12, 35e12), ("A10", ""): (125e12, 62.5e12),
              ("4090", ""): (165e12, 82.6e12), ("3090", ""): (71e12, 35.6e12)}

# keys a resumed run may change: its length, evaluation, logging and where and how fast it runs. Every other key
# gives the saved state (data position, phases, optimizer, schedule) its meaning.
RESUME_CHANGEABLE = ("out_dir", "init_from", "init_revision", "override", "max_iters", "max_tokens", "epochs",
                     "eval_interval", "eval_iters", "eval_at_start", "eval_only", "export_hf", "wandb_log",
                     "wandb_project", "wandb_run_name", "device", "dtype", "compile", "backend", "ddp_timeout_s",
                     "device_peak_flops", "max_nonfinite_steps", "parallelism", "activation_checkpointing")


def parse_config(argv, defaults=None):
    """The TrainConfig of a command line (config files and --key=value over TrainConfig's defaults, or `defaults`);
    --help lists every key."""
    return configurator.parse_config(TrainConfig, argv, defaults, description=__doc__)


def load_config(argv, defaults):
    """The run's TrainConfig and, for init_from='resume', the checkpoint it continues from (else None). A resumed
    run keeps its saved settings; only what the command line gives again (argv) overrides them. Rank 0 holds
    out_dir's lock from here to the run's end (one run per directory) and brings back a run that an override
    stopped before its first checkpoint had set aside."""
    cfg = parse_config(argv, defaults)
    if cfg.init_from != "resume":
        check_apart(cfg.out_dir, {"init_from": cfg.init_from if cfg.init_from != "scratch" else None,
                                  "data_dir": cfg.data_dir})
    check_out_dir(cfg.out_dir)
    master = os.environ.get("RANK", "0") == "0"
    if master:
        lock_out_dir(cfg.out_dir)
        restore_replaced_run(cfg.out_dir)
        out_dir_ready(cfg.out_dir)
    else:  # the other ranks read out_dir after rank 0 has settled it
        wait_for_rank0(cfg.out_dir, cfg.ddp_timeout_s)
    checkpoint = None
    if cfg.init_from == "resume":
        checkpoint = load_checkpoint(cfg.out_dir)
        saved = TrainConfig(**checkpoint.training["config"])
        cfg = parse_config(argv, {**asdict(saved), "init_from": "resume"})
        check_resume_config(saved, cfg)
        check_apart(cfg.out_dir, {"data_dir": cfg.data_dir})
    check_config(cfg)
    if cfg.init_from != "resume" and not cfg.eval_only:  # eval_only writes eval_only.json alone: no run to replace
        claim_out_dir(cfg.out_dir, cfg.override, master)
    return cfg, checkpoint


def check_config(cfg):
    """Values in range, checked before anything loads: a slip costs a second, not a model load, a traceback an hour
    in, or a run that trains nothing and exits 0."""
    def bad(key, want):
        raise UserError(f"{key}={getattr(cfg, key)!r}, expected {want}")

    for f in fields(cfg):
        if f.type is float and not math.isfinite(getattr(cfg, f.name)):
            bad(f.name, "a finite number")
    for key in ("block_size", "batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                "ddp_timeout_s", "n_layer", "n_head", "n_embd"):
        if getattr(cfg, key) <= 0:
            bad(key, "a positive integer")
    for key in ("embedding_batch_size", "embedding_gradient_accumulation_steps", "max_iters", "max_tokens",
                "vocab_size", "intermediate_size", "n_kv_head"):
        if getattr(cfg, key) < 0:
            bad(key, "a positive integer (0: not set)")
    if cfg.epochs < 0 or (cfg.epochs == 0 and not (cfg.max_iters or cfg.max_tokens)):
        bad("epochs", "a positive number (or set max_iters or max_tokens)")
    for key in ("max_nonfinite_steps", "weight_decay", "grad_clip", "device_peak_flops", "learning_rate",
                "embedding_learning_rate", "min_lr"):
        if getattr(cfg, key) < 0:
            bad(key, "a number >= 0")
    for key in ("embedding_tuning_frac", "warmup_frac", "embedding_warmup_frac", "rotary_pct"):
        if not 0 <= getattr(cfg, key) <= 1:
            bad(key, "a fraction in [0, 1]")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            bad(key, "a number in [0, 1)")
    embedding_phase_peak = cfg.embedding_tuning_frac > 0 and cfg.lr_schedule != "unified"
    for key in ("learning_rate",) + (("embedding_learning_rate",) if embedding_phase_peak else ()):
        if cfg.min_lr > getattr(cfg, key):
            raise UserError(f"min_lr={cfg.min_lr:g} is above {key}={getattr(cfg, key):g} (the floor of the schedule)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        bad("device", "auto, cpu, cuda or cuda:N")
    if cfg.device != "auto":
        check_device(cfg.device, "device")
    if cfg.train_new_rows_only and not cfg.embedding_tuning_frac:
        raise UserError("train_new_rows_only=True applies to the embedding phase: set embedding_tuning_frac > 0")
    if cfg.wandb_log and importlib.util.find_spec("wandb") is None:
        raise UserError("wandb_log=True, but wandb is not installed (pip install wandb, or wandb_log=False)")


def check_resume_config(saved, cfg):
    """A resumed run continues the saved one: a key that would change what its state means is refused, naming both
    values; a safe change (the length, evaluation, logging, device) is accepted and said."""
    changed = [(f.name, getattr(saved, f.name), getattr(cfg, f.name)) for f in fields(TrainConfig)
               if getattr(saved, f.name) != getattr(cfg, f.name) and f.name != "init_from"]
    refused = [f"{key}={new!r} (saved: {old!r})" for key, old, new in changed if key not in RESUME_CHANGEABLE]
    if refused:
        raise UserError(f"init_from=resume: {', '.join(refused)} would change what the saved state of "
                        f"{cfg.out_dir} means (data position, phases, optimizer); resume without "
                        f"{'it' if len(refused) == 1 else 'them'}, or start a fresh run (another out_dir, or "
                        "--override=True)")
    if changed and os.environ.get("RANK", "0") == "0":
        print("resume: " + ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changed))


# -----------------------------------------------------------------------------
# the plan: phase lengths and the learning rate at every step


@dataclass
class Phase:
    name: str  # 'embedding' | 'full'
    batch_size: int  # sequences per micro-batch per process
    grad_accum: int  # micro-batches per optimizer step, all processes together
    block_size: int
    peak_lr: float
    schedule: str
    start: int = 0  # first optimizer step
    steps: int = 0
    warmup: int = 0  # warmup steps
    span: tuple = None  # (first step, steps) the schedule runs over: the phase itself, or the run for 'unified'

    @property
    def end(self):
        return self.start + self.steps

    @property
    def tokens_per_step(self):
        return self.batch_size * self.grad_accum * self.block_size

    def lr(self, step, min_lr):
        """max(min_lr, peak * lambda): linear warmup, then cosine / linear decay over the rest of the span."""
        start, steps = self.span or (self.start, self.steps)
        s = step - start
        if s < self.warmup:
            lam = (s + 1) / (self.warmup + 1)
        else:
            p = (s - self.warmup) / max(1, steps - self.warmup)
            lam = {"cosine": 0.5 * (1.0 + math.cos(math.pi * p)), "linear": 1.0 - p, "constant": 1.0}[self.schedule]
        return max(min_lr, self.peak_lr * lam)


def micro_batches(grad_accum, world_size):
    """Micro-batches per optimizer step over all processes: grad_accum, but at least one per process."""
    return max(grad_accum, world_size)


def plan_phases(cfg, train_blocks, world_size=1, embedding_steps=None):
    """Split the run into the embedding phase and the full phase (phase_lengths), each with its batch, peak learning
    rate, warmup and schedule; a phase without steps is left out. 'unified': one warmup and one cosine over the
    whole run, both phases at learning_rate. embedding_steps: the embedding phase's length is given (a run extended
    after its switch), the full phase has the rest of the length."""
    unified = cfg.lr_schedule == "unified"
    emb_accum = cfg.embedding_gradient_accumulation_steps or cfg.gradient_accumulation_steps
    emb = Phase("embedding", cfg.embedding_batch_size or cfg.batch_size, micro_batches(emb_accum, world_size),
                cfg.block_size, peak_lr=cfg.learning_rate if unified else cfg.embedding_learning_rate,
                schedule="cosine" if unified else cfg.embedding_lr_schedule)
    full = Phase("full", cfg.batch_size, micro_batches(cfg.gradient_accumulation_steps, world_size), cfg.block_size,
                 peak_lr=cfg.learning_rate, schedule="cosine" if unified else cfg.lr_schedule)
    emb.steps, full.steps = phase_lengths(cfg, train_blocks, emb.tokens_per_step, full.tokens_per_step,
                                          embedding_steps)
    full.start, total = emb.steps, emb.steps + full.steps

    def warmup(w_frac, steps):
        return int(round(w_frac * (steps if cfg.warmup_relative_to == "phase" else total)))

    if unified:
        emb.span = full.span = (0, total)
        emb.warmup = full.warmup = warmup(cfg.warmup_frac, total)
    else:
        emb.warmup = warmup(cfg.embedding_warmup_frac, emb.steps)
        full.warmup = warmup(cfg.warmup_frac, full.steps)
    return [p for p in (emb, full) if p.steps > 0]


def phase_lengths(cfg, train_blocks, emb_tokens_per_step, full_tokens_per_step, embedding_steps=None):
    """The two phases' optimizer steps. phase_unit='steps': the embedding phase is the first ceil(frac * N) of N
    optimizer steps; 'tokens': it spends frac of the tokens at its own batch size (so a small embedding batch makes
    many steps). max_iters is the number of optimizer steps in either unit; max_tokens and epochs are a token
    budget, which either unit spends whatever the two phases' batch sizes: to within one step, never more. With
    embedding_steps given, the full phase has what that embedding phase leaves of the length."""
    frac = cfg.embedding_tuning_frac
    budget = cfg.max_tokens or int(cfg.epochs * train_blocks * cfg.block_size)  # tokens
    if embedding_steps is not None:
        emb_steps = embedding_steps
        full_steps = cfg.max_iters - emb_steps if cfg.max_iters else \
            (budget - emb_steps * emb_tokens_per_step) // full_tokens_per_step
        full_steps = max(0, full_steps)
    elif cfg.phase_unit == "steps":
        def spent(n):  # tokens of a run of n steps
            return math.ceil(frac * n) * emb_tokens_per_step + (n - math.ceil(frac * n)) * full_tokens_per_step

        total = cfg.max_iters
        if not total:  # the most steps within the budget (spent(n) grows by one step's tokens per step)
            total = max(1, int(budget / (frac * emb_tokens_per_step + (1 - frac) * full_tokens_per_step)))
            while spent(total + 1) <= budget:
                total += 1
            while total > 1 and spent(total) > budget:
                total -= 1
        emb_steps = math.ceil(frac * total)
        full_steps = total - emb_steps
    elif cfg.max_iters:  # the token total t whose split makes exactly max_iters steps
        t = cfg.max_iters / (frac / emb_tokens_per_step + (1 - frac) / full_tokens_per_step)
        emb_steps = min(cfg.max_iters, max(int(frac > 0), round(frac * t / emb_tokens_per_step)))
        full_steps = cfg.max_iters - emb_steps
    else:  # the budget to within one full step, never over it: the full phase has what the embedding phase left
        emb_steps = max(int(frac > 0), round(frac * budget / emb_tokens_per_step))
        full_steps = max(0, (budget - emb_steps * emb_tokens_per_step) // full_tokens_per_step)
    if emb_steps + full_steps <= 0:
        raise UserError("the run has no steps: set max_iters, max_tokens or epochs")
    return emb_steps, full_steps


def phase_at(phases, step):
    return next((p for p in phases if p.start <= step < p.end), phases[-1])


def resume_phases(cfg, checkpoint, state, train_blocks, world_size):
    """The plan a resumed run continues, and the number of processes its batches were planned for: the run's
    batches stay as planned at its start (the checkpoint's plan record), on any number of processes that can share
    each phase's micro-batches, so a phase keeps its steps and max_tokens holds. The same length keeps the saved
    phases. Another length re-plans them: before the switch the embedding phase must stay where its steps were
    taken (check_resume_plan); after it the embedding phase is kept as it was and the full phase has the rest of
    the new length, its warmup kept and its decay over its new length. A checkpoint without the record (an older
    train.py) is planned for the processes there are now."""
    record = checkpoint.training.get("plan")
    planned_for = record["world_size"] if record else world_size
    saved = [Phase(**{**p, "span": tuple(p["span"]) if p["span"] else None}) for p in record["phases"]] \
        if record else None
    saved_cfg = checkpoint.training["config"]
    same_length = all(getattr(cfg, k) == saved_cfg[k] for k in ("max_iters", "max_tokens", "epochs"))
    emb_done = state.phase_stats.get("embedding", {}).get("steps", 0)
    if saved:
        emb_end = sum(p.steps for p in saved if p.name == "embedding")
        switched = any(p.name == "full" for p in saved) and state.step >= emb_end
    else:
        emb_end, switched = emb_done, emb_done < state.step
    if saved and same_length:
        phases = saved
    elif switched:
        phases = plan_phases(cfg, train_blocks, planned_for, embedding_steps=emb_end)
        if saved:
            full = next(p for p in phases if p.name == "full")
            full.warmup = next(p.warmup for p in saved if p.name == "full")
            phases = [p for p in saved if p.name == "embedding"] + [full]
    else:
        phases = plan_phases(cfg, train_blocks, planned_for)
        check_resume_plan(phases, state, cfg)
    check_processes_share(phases, state.step, planned_for, world_size, cfg.out_dir)
    return phases, planned_for


def check_processes_share(phases, step, planned_for, world_size, out_dir):
    """Every phase still to run splits its micro-batches evenly over the processes there are now."""
    left = [p for p in phases if p.end > step]
    unshared = next((p for p in left if p.grad_accum % world_size), None)
    if unshared is None:
        return
    common = math.gcd(*(p.grad_accum for p in left))
    counts = [str(n) for n in range(1, common + 1) if common % n == 0]
    raise UserError(f"init_from=resume: the batches of {out_dir} were planned for {planned_for} process(es): its "
                    f"{unshared.name} phase takes {unshared.grad_accum} micro-batch(es) of {unshared.batch_size} "
                    f"sequences per optimizer step, which {world_size} processes cannot share; resume it on "
                    f"{' or '.join(counts)} process(es), or start a fresh run")


def check_resume_plan(phases, state, cfg):
    """A new length re-plans the phases: the embedding phase must still end where the saved run's did (or, if the
    run is still in it, not before its current step), else steps already taken would change phase."""
    emb_end = sum(p.steps for p in phases if p.name == "embedding")
    emb_done = state.phase_stats.get("embedding", {}).get("steps", 0)
    if (emb_done < state.step and emb_end != emb_done) or (emb_done == state.step and emb_end < state.step):
        raise UserError(f"init_from=resume: with max_iters={cfg.max_iters}, max_tokens={cfg.max_tokens}, "
                        f"epochs={cfg.epochs:g} the embedding phase would be steps 0..{emb_end - 1}, but the saved "
                        f"run at step {state.step} has taken {emb_done} embedding steps; choose a length that keeps "
                        "the phase boundary (or start a fresh run)")


# -----------------------------------------------------------------------------
# the run: where it runs, its state, its objects, and how they are set up


@dataclass
class Runtime:
    """Where this process runs: its rank among world_size, its device, the precision, the device's peak FLOPS."""
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16 ('auto' resolved)
    distributed: bool = False  # started under torchrun (or with its environment): one process of a process group
    fsdp: bool = False  # the model is sharded (FSDP2); else every process holds all of it (DDP when distributed)
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    peak_flops: float = 0.0  # the device's dense peak at dtype, for MFU (0: unknown)
    compile: bool = False  # compile='auto' resolved

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):
        return "cuda" if self.device.startswith("cuda") else "cpu"

    @property
    def autocast(self):
        """The forward's precision: autocast to bfloat16 or float16, none for float32."""
        if self.dtype == "float32":
            return nullcontext()
        return torch.autocast(self.device_type, dtype=torch_dtype(self.dtype))


@dataclass
class TrainState:
    """Everything a resumed run continues from besides the weights, the optimizer and the scaler; a checkpoint
    holds its fields as top-level keys."""
    step: int = 0
    tokens: int = 0
    pos: int = 0  # the next block of train.bin, counted over all ranks
    best_val_loss: float = math.inf
    val_loss: float = None  # the latest evaluation: at a finished run's last step, its final one
    nonfinite_steps: int = 0
    phase_stats: dict = field(default_factory=dict)  # per phase, so that summary.json covers the whole run

    @classmethod
    def from_checkpoint(cls, checkpoint):
        return cls(**{f.name: checkpoint.training[f.name] for f in fields(cls)})


@dataclass
class Run:
    """A run's objects, built once (start_run), then read and changed by the loop, the checkpoint and the end."""
    cfg: TrainConfig
    rt: Runtime
    model: CausalLM  # the raw model: its parameters, state dicts and export (sharded under FSDP)
    wrapped: torch.nn.Module  # what trains: the model compiled and DDP-wrapped as configured (wrap)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    state: TrainState
    phases: list
    planned_for: int  # the processes the phases' batches were planned for: the run's first start's
    phase: Phase  # the phase the model is set up for (set_trainable): the last step's, until the switch
    train_data: Blocks
    val_data: Blocks
    data_record: dict  # what the checkpoints record of the data (data.data_fingerprint)
    metrics: "MetricsLog"
    tokenizer_dir: str  # what the hf/ export copies ('' for none)
    stop: SimpleNamespace  # the stop request (signals_handled)
    new_rows: "NewRowsOnly" = None  # train_new_rows_only: the embedding phase's row mask

    @property
    def total_steps(self):
        return self.phases[-1].end

    @property
    def checkpoint_path(self):
        """Where this run's checkpoints go: ckpt.pt, or with parallelism='fsdp' the sharded checkpoint directory."""
        return os.path.join(self.cfg.out_dir, SHARDED if self.cfg.parallelism == "fsdp" else FULL)

    def checkpoint(self):
        """The run after the step just taken, and the record naming it (checkpoint.save_checkpoint); every rank
        calls it."""
        rt = self.rt
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(rt.device) if rt.device_type == "cuda" else None}
        training = {"scaler": self.scaler.state_dict(), "model_config": asdict(self.model.config),
                    "tokenizer_dir": self.tokenizer_dir, "config": asdict(self.cfg), "phase": self.phase.name,
                    "plan": {"world_size": self.planned_for, "phases": [asdict(p) for p in self.phases]},
                    "new_rows_from": self.new_rows.first if self.new_rows else None,
                    "data": self.data_record, **asdict(self.state), "rng": rng}
        save_checkpoint(self.cfg.out_dir, training, self.model, self.optimizer, sharded=self.cfg.parallelism == "fsdp")

    @property
    def eval_blocks(self):
        """The blocks a periodic evaluation scores: the same whatever the process count (they split them), so the
        validation curves of runs on 1 and N processes compare."""
        return min(self.val_data.n_blocks, self.cfg.eval_iters * self.cfg.batch_size)

    def validation_loss(self, n_blocks):
        return evaluate(unwrapped(self.wrapped), self.val_data, n_blocks, self.model.config.vocab_size,
                        self.cfg.batch_size, self.rt)


def start_run(argv, defaults, stop):
    """The run set up: config, processes, data, plan, the model (from the checkpoint on resume) in its phase, the
    optimizer, out_dir and the metrics log. None when a resumed run is complete already (said on stdout)."""
    cfg, checkpoint = load_config(argv, defaults)
    rt = setup_processes(cfg)
    if checkpoint and rt.distributed:
        check_ranks_agree(checkpoint)
    state = TrainState.from_checkpoint(checkpoint) if checkpoint else TrainState()
    meta = load_meta(cfg.data_dir)
    train_data = Blocks(os.path.join(cfg.data_dir, "train.bin"), meta["dtype"], cfg.block_size, cfg.seed, rt.rank,
                        rt.world_size)
    val_data = Blocks(os.path.join(cfg.data_dir, "val.bin"), meta["dtype"], cfg.block_size, None, rt.rank,
                      rt.world_size)
    data_record = data_fingerprint(cfg.data_dir)
    if checkpoint:
        check_resume_data(cfg, checkpoint, meta, data_record, rt)
    phases, planned_for = plan_phases(cfg, train_data.n_blocks, rt.world_size), rt.world_size
    if checkpoint:
        phases, planned_for = resume_phases(cfg, checkpoint, state, train_data.n_blocks, rt.world_size)
        if planned_for != rt.world_size and rt.master:
            print(f"resume: the batches stay as planned for {planned_for} process(es), on {rt.world_size}: "
                  + ", ".join(f"{p.name} phase {p.grad_accum // rt.world_size} micro-batch(es) of {p.batch_size} "
                              "per process" for p in phases if p.end > state.step))
        if state.step >= phases[-1].end and not cfg.eval_only and run_is_complete(cfg.out_dir, state.step):
            if rt.master:
                print(f"nothing to do: {cfg.out_dir} finished at step {state.step} (raise max_iters, max_tokens or "
                      "epochs to train on)")
            leave_process_group(rt)
            return None

    model, tokenizer_dir, model_source = build_model(cfg, meta, checkpoint, rt)
    new_rows = None
    if cfg.train_new_rows_only:
        first = checkpoint.training["new_rows_from"] if checkpoint else appended_rows_from(tokenizer_dir)
        new_rows = NewRowsOnly(model, first, cfg.weight_decay)
    optimizer = configure_optimizer(model, cfg, rt.device_type, new_rows)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "float16")
    if checkpoint:
        restore_training(checkpoint, model, optimizer, scaler, phases, cfg, rt)
    phase = phase_at(phases, state.step)
    set_trainable(model, phase, cfg)
    if rt.master:
        start_out_dir(cfg, rt, model, model_source, phases, train_data.n_blocks)
    metrics = MetricsLog(cfg, rt.master and not cfg.eval_only, resume_step=state.step if checkpoint else None)
    return Run(cfg=cfg, rt=rt, model=model, wrapped=wrap(model, cfg, rt), optimizer=optimizer, scaler=scaler,
               state=state, phases=phases, planned_for=planned_for, phase=phase, train_data=train_data,
               val_data=val_data, data_record=data_record, metrics=metrics, tokenizer_dir=tokenizer_dir, stop=stop,
               new_rows=new_rows)


def setup_processes(cfg):
    """The process group (under torchrun), the device, the precision and the seed."""
    distributed = int(os.environ.get("RANK", -1)) != -1
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    rank, local_rank, world_size = 0, 0, 1
    if distributed:
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
        local_rank = int(os.environ["LOCAL_RANK"])
        if device_type == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=cfg.ddp_timeout_s),
                                device_id=torch.device(device) if device_type == "cuda" else None)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    check_accumulation(cfg, world_size, rank == 0)
    if cfg.parallelism == "fsdp" and not distributed:
        print("parallelism='fsdp' in one process (not under torchrun): the model runs unsharded, as parallelism "
              "'ddp' would; checkpoints are sharded (ckpt/step-N) all the same")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float16" and cfg.parallelism == "fsdp":  # its gradients would need a sharded GradScaler
        raise UserError("parallelism='fsdp' trains in bfloat16 or float32, not float16 (set dtype=bfloat16)")
    peak = cfg.device_peak_flops or (peak_flops(torch.cuda.get_device_name(device), dtype)
                                     if device_type == "cuda" else 0.0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed + rank)
    return Runtime(device=device, dtype=dtype, distributed=distributed,
                   fsdp=distributed and cfg.parallelism == "fsdp", rank=rank, local_rank=local_rank,
                   world_size=world_size, peak_flops=peak,
                   compile=device_type == "cuda" if cfg.compile == "auto" else cfg.compile)


def check_accumulation(cfg, world_size, master):
    for key, batch in (("gradient_accumulation_steps", cfg.batch_size),
                       ("embedding_gradient_accumulation_steps", cfg.embedding_batch_size or cfg.batch_size)):
        value = getattr(cfg, key)
        if value >= world_size and value % world_size:
            raise UserError(f"{key}={value} is not divisible by the {world_size} processes (it counts micro-batches "
                            "per optimizer step over all processes; fewer than the processes means one each)")
        if 0 < value < world_size and master and (key == "gradient_accumulation_steps" or cfg.embedding_tuning_frac):
            print(f"{key}={value} is fewer than the {world_size} processes: each runs one micro-batch per optimizer "
                  f"step, {world_size} x {batch} sequences")


def check_resume_data(cfg, checkpoint, meta, data_record, rt):
    """A resumed run reads the data it was trained on (data.check_data_fingerprint), made with its model's
    tokenizer, as a fresh run must (a tokenizer_dir that is gone is build_model's error). A checkpoint of an older
    train.py records neither the data nor the processes its batches were planned for: it resumes, said once."""
    tokenizer_dir = checkpoint.training["tokenizer_dir"]
    file = tokenizer_file(tokenizer_dir)
    if file and os.path.isfile(file):
        check_tokenizer(meta, tokenizer_dir, f"{checkpoint.path} (tokenizer {tokenizer_dir})", cfg.data_dir)
    if "data" in checkpoint.training:
        check_data_fingerprint(checkpoint.training["data"], data_record, cfg.data_dir, checkpoint.path)
    elif rt.master:
        print(f"warning: {checkpoint.path} was written by an older train.py and does not record its data or the "
              f"processes its batches were planned for: {cfg.data_dir} and these {rt.world_size} process(es) are "
              "taken as they are (its next checkpoint records both)")


def build_model(cfg, meta, checkpoint, rt):
    """The raw model on the device (float32; sharded under FSDP) from the checkpoint, from scratch or from init_from
    (model_source), with the tokenizer directory the hf/ export copies and a name for the messages. Every process
    builds it on the meta device and allocates its own part (empty_model); rank 0 alone reads the weights and
    broadcasts them (load_weights), so host memory holds one copy of the model file, not one per process."""
    model_config, tokenizer_dir, source = model_source(cfg, meta, checkpoint)
    if meta["vocab_size"] > model_config.vocab_size:
        raise UserError(f"{cfg.data_dir}: vocabulary of {meta['vocab_size']} tokens, but the model "
                        f"{source} has only {model_config.vocab_size} embedding rows")
    if cfg.block_size > model_config.block_size:
        raise UserError(f"block_size={cfg.block_size} exceeds the model's max_position_embeddings "
                        f"{model_config.block_size}")
    model = empty_model(model_config, cfg, rt)
    load_weights(model, initial_weights(model_config, cfg, checkpoint, tokenizer_dir) if rt.master else None, rt)
    if rt.fsdp:
        # FSDP2 fixes each group's gradient dtypes (bf16 grads reduced in fp32 into fp32 params) at its first forward,
        # from the parameters that require grad then: a block frozen at that moment (the embedding phase) would hand
        # bf16 gradients to its fp32 parameters after the switch. So the first forward runs now, nothing frozen yet.
        with torch.no_grad():
            model(torch.zeros((1, 1), dtype=torch.long, device=rt.device))
        reshard(model)
    return model, tokenizer_dir, source


def model_source(cfg, meta, checkpoint):
    """The model's config, the tokenizer directory and a name for the messages, from the checkpoint, the config
    (scratch) or init_from; checked against the data."""
    if checkpoint is not None:
        tokenizer_dir = checkpoint.training["tokenizer_dir"]
        if tokenizer_dir and cfg.export_hf:
            check_export_tokenizer(tokenizer_dir, f"{checkpoint.path}: tokenizer_dir")
        return (config_from_dict(checkpoint.training["model_config"]), tokenizer_dir,
                f"{checkpoint.path} (from {checkpoint.training['config']['init_from']})")
    if cfg.init_from == "scratch":
        tokenizer = meta.get("tokenizer_file")  # relative to the data directory, or absolute
        tokenizer_dir = os.path.join(cfg.data_dir, tokenizer) if tokenizer else ""
        if tokenizer_dir and cfg.export_hf:
            check_export_tokenizer(tokenizer_dir, f"{os.path.join(cfg.data_dir, 'meta.json')}: tokenizer_file")
        if tokenizer_dir and os.path.exists(tokenizer_dir):
            check_tokenizer(meta, tokenizer_dir, f"from scratch (tokenizer {tokenizer_dir})", cfg.data_dir)
        return scratch_config(cfg, meta), tokenizer_dir, "scratch"
    model_dir = resolve_model_dir(cfg.init_from, cfg.init_revision or None)
    config_file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_file):
        raise UserError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        raise UserError(f"{cfg.init_from}: no tokenizer.json beside the model; the trainer checks that the data was "
                        "tokenized with the model's tokenizer")
    model_config = config_from_hf(read_json(config_file), source=config_file)
    check_tokenizer(meta, model_dir, cfg.init_from, cfg.data_dir)
    return model_config, model_dir, cfg.init_from


def scratch_config(cfg, meta):
    """init_from='scratch': a model of the config's family and size over the data's vocabulary (padded to a multiple
    of 128), its bos and eos the data's (a tokenizer that adds no BOS: eos, as Pythia's)."""
    shape = dict(vocab_size=cfg.vocab_size or round_up(meta["vocab_size"]), n_layer=cfg.n_layer, n_head=cfg.n_head,
                 n_embd=cfg.n_embd, block_size=cfg.block_size, eos_token_id=meta["eos_token_id"],
                 bos_token_id=meta.get("framing", {}).get("bos_token_id") or meta["eos_token_id"])
    try:
        if cfg.model_type == "gpt_neox":
            return GPTNeoXConfig(**shape, intermediate_size=cfg.intermediate_size or 4 * cfg.n_embd,
                                 rotary_pct=cfg.rotary_pct)
        return LlamaConfig(**shape, model_type=cfg.model_type, n_kv_head=cfg.n_kv_head or cfg.n_head,
                           intermediate_size=cfg.intermediate_size or round_up(8 * cfg.n_embd // 3, 64),
                           rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings)
    except UserError as e:
        raise UserError(f"init_from=scratch, model_type={cfg.model_type}: {e}") from None


def empty_model(model_config, cfg, rt):
    """The model built on the meta device (no memory), with activation checkpointing and, under FSDP, sharded, then
    allocated on the device (uninitialised: load_weights fills it)."""
    with torch.device("meta"):
        model = model_from_config(model_config)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if rt.fsdp:
        apply_fsdp(model, rt.dtype)
    model.to_empty(device=rt.device)
    model.tie_weights()  # to_empty allocates a shared tensor twice
    return model


def initial_weights(model_config, cfg, checkpoint, tokenizer_dir):
    """Rank 0's full state dict: the checkpoint's (None for a sharded one: its weights come with the optimizer, in
    restore_training), a random init (rank 0's seed), or init_from's."""
    if checkpoint is not None:
        return checkpoint.model
    if cfg.init_from == "scratch":
        return model_from_config(model_config).state_dict()
    return CausalLM.from_pretrained(tokenizer_dir).state_dict()


def load_weights(model, state, rt):
    """Rank 0's full state dict (None elsewhere) into the model on every rank: broadcast into each rank's shards or
    replica. A None on rank 0 (a sharded checkpoint) loads nothing."""
    if not rt.distributed:
        if state is not None:
            model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if broadcast_object(state is not None):  # whether weights come: every rank joins the broadcast, or none
        set_model_state_dict(model, state or {}, options=StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=True))


def restore_training(checkpoint, model, optimizer, scaler, phases, cfg, rt):
    """The optimizer and scaler state and the rng; from a sharded checkpoint the model's weights too, read with the
    parameters trainable as they were when it was saved (only those have optimizer state in it)."""
    training = checkpoint.training
    if checkpoint.sharded:
        saved_phase = next((p for p in phases if p.name == training["phase"]), phase_at(phases, training["step"]))
        set_trainable(model, saved_phase, cfg)
        load_shards(checkpoint.path, model, optimizer)
    elif rt.fsdp:  # its optimizer state is whole tensors, not shards
        raise UserError(f"{checkpoint.path} was written by a DDP run: resume it with parallelism=ddp")
    else:
        optimizer.load_state_dict(checkpoint.optimizer)
    if training["scaler"]:  # a bf16 or fp32 run saves an empty state: a float16 resume starts its scale afresh
        scaler.load_state_dict(training["scaler"])
    if rt.master:  # the other ranks keep their seed + rank streams (nothing in training draws from them)
        torch.set_rng_state(training["rng"]["torch"])
        if rt.device_type == "cuda" and training["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(training["rng"]["cuda"], rt.device)


def start_out_dir(cfg, rt, model, model_source, phases, n_blocks):
    """out_dir without the temp files of a write that was killed, its config.json, and the plan on stdout. eval_only
    leaves the run's files as they are."""
    if not cfg.eval_only:
        remove_temp_files(cfg.out_dir)
        write_json(os.path.join(cfg.out_dir, "config.json"), asdict(cfg))
    print(f"{model_source}: {model.num_params(non_embedding=False) / 1e6:.1f}M parameters, "
          f"{rt.world_size} process(es) on {rt.device}, {rt.dtype}; {n_blocks} train blocks of {cfg.block_size}")
    for p in phases:
        print(f"  {p.name} phase: steps {p.start}..{p.end - 1}, batch {p.batch_size} x accum {p.grad_accum} x "
              f"{p.block_size} tokens, peak lr {p.peak_lr:g}, warmup {p.warmup}, {p.schedule}")


# -----------------------------------------------------------------------------
# the loop: phases, evaluations, checkpoints, stop requests, the end


def train(argv, defaults, stop):
    """A whole run: set up, the evaluation at the start, the loop, the end."""
    run = start_run(argv, defaults, stop)
    if run is None:
        return
    cfg, state = run.cfg, run.state
    with run.metrics:  # closed however the run ends
        if cfg.eval_only:
            evaluate_only(run)
            return
        if cfg.eval_at_start and cfg.init_from != "resume":
            val = run.validation_loss(run.eval_blocks)
            run.metrics.log({"step": state.step, "phase": run.phase.name, "tokens": state.tokens, "val_loss": val,
                             "val_ppl": exp(val)})
            if run.rt.master:
                print(f"step {state.step}: val loss {val:.4f}, ppl {exp(val):.6g}")
        train_loop(run)
        finish(run)


def evaluate_only(run):
    """eval_only: the whole validation set, into out_dir/eval_only.json; the run's own files (config.json,
    metrics.jsonl, the checkpoint, hf/) stay as they are."""
    cfg, state = run.cfg, run.state
    val = run.validation_loss(run.val_data.n_blocks)
    if run.rt.master:
        path = os.path.join(cfg.out_dir, "eval_only.json")
        write_json(path, {"init_from": cfg.init_from, "step": state.step, "tokens": state.tokens,
                          "data_dir": cfg.data_dir, "val_blocks": run.val_data.n_blocks, "block_size": cfg.block_size,
                          "val_full_loss": val, "val_full_ppl": exp(val)})
        print(f"step {state.step}: whole validation set loss {val:.4f}, ppl {exp(val):.6g} ({path})")
    leave_process_group(run.rt, run.wrapped)


def train_loop(run):
    """The optimizer steps from state.step to the end of the last phase: the switch exactly at a phase boundary, an
    evaluation and a checkpoint every eval_interval steps, a stop request honoured at the next step boundary (with a
    checkpoint). The host does not wait for a step: its loss and time are read (end_step) once the next step is
    queued, so the device runs on through the host's work between steps; a step that evaluates, checkpoints, stops or
    ends a phase is ended at once."""
    from tqdm import tqdm

    cfg, rt, state = run.cfg, run.rt, run.state
    reader = StepBatches(run.train_data, rt, run.model.config.vocab_size)
    bar = tqdm(total=run.total_steps, initial=state.step, disable=not rt.master, dynamic_ncols=True, unit="step",
               mininterval=1.0)
    if rt.device_type == "cuda":  # the first phase's peak is the run's own, not an earlier run's in this process
        torch.cuda.reset_peak_memory_stats(rt.device)
    verify_grads = False  # after a switch, until a step updates: every trainable parameter got a gradient
    first_step = True  # the first step after the model was (re)built: compile, allocator warm-up
    start_step = state.step
    queued = None  # the step before this one, not ended yet
    reset_peak_rss()  # each phase's peak host memory is its own, loading left out
    run.stop.deferred = True  # from here a signal stops the run at the next step boundary, with a checkpoint
    try:
        while state.step < run.total_steps:
            if state.step >= run.phase.end:  # the switch, exactly at the boundary
                switch_phase(run)
                verify_grads = first_step = True
            timer = StepTimer(rt, after=queued.timer if queued else None)
            phase, lr = run.phase, run.phase.lr(state.step, cfg.min_lr)
            batches = step_batches(run, reader, state.step > start_step,
                                   before_checkpoint=lambda: queued and end_step(run, queued, bar))
            ahead = None  # on a GPU the next step's rows are read while this one computes
            if rt.device_type == "cuda" and state.step + 1 < run.total_steps:
                ahead = functools.partial(reader.read_ahead, state.pos, phase_at(run.phases, state.step + 1))
            if run.new_rows:
                run.new_rows.set_phase(phase.name == "embedding")
            loss = train_step(run.wrapped, run.model, run.optimizer, run.scaler, batches, lr, cfg.grad_clip, rt,
                              verify_grads, ahead, run.new_rows)
            timer.stop()
            state.step += 1
            state.tokens += phase.tokens_per_step
            if queued:  # the step before, now that this one is queued
                previous, queued = queued, None
                if math.isfinite(end_step(run, previous, bar)):
                    verify_grads = False
            queued, first_step = QueuedStep(state.step, state.tokens, phase, lr, loss, timer, first_step), False
            stopping = should_stop(run.stop, rt)
            evaluating = state.step % cfg.eval_interval == 0 or state.step == run.total_steps
            if evaluating or stopping or state.step >= run.phase.end:
                now, queued = queued, None
                if math.isfinite(end_step(run, now, bar)):
                    verify_grads = False
            if stopping:
                if not evaluating:
                    run.checkpoint()
                bar.close()
                exit_stopped(run)
    except (UserError, Stop):  # a bad batch, a second signal: the step taken before is logged all the same
        if queued and not queued.ended:
            end_step(run, queued, bar)
        raise
    bar.close()
    run.stop.deferred = False  # the end: a signal stops the run at once (the last step's checkpoint is complete)
    if run.stop.received:
        raise Stop(run.stop.received[0])


@dataclass
class QueuedStep:
    """A step taken (its work queued on the device, counted in the state), its loss and time not read yet."""
    step: int
    tokens: int  # trained on by the end of it
    phase: Phase
    lr: float
    loss: torch.Tensor  # 0-dim, on the device
    timer: "StepTimer"
    first: bool  # the first step after the model was (re)built
    ended: bool = False  # end_step has read it


class StepTimer:
    """A step's wall time: on a GPU between two CUDA events on the run's stream, read when the step is ended (waiting
    for that step only), from the end of the step before when that one ran back to back (after: its timer), so the
    device's idle time between the two counts; on a CPU, where train_step returns with the step done, the host
    clock."""

    def __init__(self, rt, after=None):
        self.t0, self.t1, self.events = time.perf_counter(), None, None
        if rt.device_type == "cuda":
            self.stream = torch.cuda.current_stream(rt.device)
            start = after.events[1] if after is not None else torch.cuda.Event(enable_timing=True)
            if after is None:
                start.record(self.stream)
            self.events = [start, torch.cuda.Event(enable_timing=True)]

    def stop(self):
        self.t1 = time.perf_counter()
        if self.events:
            self.events[1].record(self.stream)

    def seconds(self):
        if not self.events:
            return self.t1 - self.t0
        self.events[1].synchronize()
        return self.events[0].elapsed_time(self.events[1]) / 1000


def end_step(run, queued, bar):
    """A queued step's loss and time read, counted (count_nonfinite, record_step) and logged; at an evaluation step
    the evaluation and the checkpoint. Returns the loss."""
    from tqdm import tqdm

    cfg, rt, state = run.cfg, run.rt, run.state
    queued.ended = True
    loss = queued.loss.item()
    if not math.isfinite(loss):  # its update was skipped (train_step); the step counts, evaluates, checkpoints
        count_nonfinite(run, loss, queued.step)
    record = record_step(run, queued, loss)
    evaluating = queued.step % cfg.eval_interval == 0 or queued.step == run.total_steps
    if evaluating:
        state.val_loss = run.validation_loss(run.eval_blocks)
        state.best_val_loss = min(state.best_val_loss, state.val_loss)
        record.update(val_loss=state.val_loss, val_ppl=exp(state.val_loss))
        if rt.master:
            tqdm.write(f"step {queued.step} ({queued.phase.name}): train loss {loss:.4f}, val loss "
                       f"{state.val_loss:.4f}, ppl {exp(state.val_loss):.6g}")
    run.metrics.log(record)
    bar.update(1)
    bar.set_postfix(phase=queued.phase.name, loss=f"{loss:.3f}", lr=f"{queued.lr:.2e}",
                    tok_s=f"{record['tokens_per_s']:.0f}")
    if evaluating:
        run.checkpoint()
    return loss


def switch_phase(run):
    """The next phase: its parameters trainable, the model wrapped anew (see wrap), peak memory counted afresh."""
    run.phase = phase_at(run.phases, run.state.step)
    set_trainable(run.model, run.phase, run.cfg)
    drop_reducer(run.wrapped)
    run.wrapped = wrap(run.model, run.cfg, run.rt)
    if run.rt.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.rt.device)
    reset_peak_rss()


def reset_peak_rss():
    """Start the process's peak resident memory (VmHWM) afresh, so that a phase's peak is its own (Linux; elsewhere a
    no-op, and the phases report no host peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb():
    """The process's peak resident memory since the last reset_peak_rss, in MiB (None where /proc does not say)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def step_batches(run, reader, progressed, before_checkpoint=lambda: None):
    """The step's micro-batches. A bad batch (an id beyond the vocabulary) on any rank stops every rank, after a
    checkpoint of the last good step when this run took steps, so no progress is lost (before_checkpoint ends the
    step queued before it, which the checkpoint then holds)."""
    try:
        batches, bad = reader.next(run.state, run.phase), None
    except UserError as e:
        batches, bad = None, e
    if run.rt.distributed:  # every rank learns that some rank had one
        flag = torch.tensor([float(bad is not None)], device=run.rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and bad is None:
            bad = UserError(f"another rank read a bad batch at step {run.state.step + 1} (its error is above)")
    if bad is None:
        return batches
    if not progressed:
        raise bad
    before_checkpoint()
    run.checkpoint()
    raise UserError(f"{bad}; stopped before step {run.state.step + 1}: the checkpoint {run.checkpoint_path} holds "
                    f"step {run.state.step} (init_from=resume continues once the data is fixed)")


def count_nonfinite(run, loss, step):
    """A skipped step counts, evaluates and checkpoints like any other; more than max_nonfinite_steps end the run."""
    state, cfg = run.state, run.cfg
    state.nonfinite_steps += 1
    if state.nonfinite_steps > cfg.max_nonfinite_steps:
        raise UserError(f"non-finite training loss ({loss}) at step {step}; the last good "
                        f"checkpoint is {run.checkpoint_path}" + ("" if has_checkpoint(cfg.out_dir) else " (none yet)")
                        + "; lower the learning rate or set max_nonfinite_steps to skip such steps")
    if run.rt.master:
        from tqdm import tqdm

        tqdm.write(f"step {step}: non-finite loss, step skipped ({state.nonfinite_steps}/{cfg.max_nonfinite_steps})")


def record_step(run, queued, loss):
    """A step ended, counted in its phase's statistics; returns its metrics.jsonl line (a skipped step's loss is
    null)."""
    phase, rt = queued.phase, run.rt
    dt = queued.timer.seconds()
    tok_s = phase.tokens_per_step / dt
    record = {"step": queued.step, "phase": phase.name, "tokens": queued.tokens, "lr": queued.lr, "loss": loss,
              "dt_s": dt, "tokens_per_s": tok_s}
    if not math.isfinite(loss):
        record.update(loss=None, skipped=True)
    if rt.peak_flops:
        record["mfu"] = run.model.flops_per_token(run.cfg.block_size) * tok_s / rt.world_size / rt.peak_flops
    if rt.device_type == "cuda":
        record["peak_mem_mb"] = torch.cuda.max_memory_allocated(rt.device) / 2**20
    stats = run.state.phase_stats.setdefault(phase.name, {"steps": 0, "tokens": 0, "seconds": 0.0,
                                                          "first_steps": 0, "first_steps_seconds": 0.0})
    stats["steps"] += 1
    stats["tokens"] += phase.tokens_per_step
    stats["flops_per_token"] = run.model.flops_per_token(run.cfg.block_size)  # the phase's: frozen weights count less
    stats["seconds"] += dt
    if queued.first:  # reported apart, and left out of the phase's tokens/s
        stats["first_steps"] += 1
        stats["first_steps_seconds"] += dt
    if "peak_mem_mb" in record:
        stats["peak_mem_mb"] = record["peak_mem_mb"]
    if (rss := peak_rss_mb()) is not None:  # host memory: the whole footprint on a CPU
        stats["peak_rss_mb"] = max(stats.get("peak_rss_mb", 0.0), rss)
    return record


def should_stop(stop, rt):
    """A stop request on any rank stops all of them together, after the same step."""
    flag = float(bool(stop.received))
    if rt.distributed:
        t = torch.tensor([flag], device=rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = t.item()
    return flag > 0


def exit_stopped(run):
    signum = run.stop.received[0] if run.stop.received else signal.SIGTERM
    if run.rt.master:
        print(f"stopped by {signal.Signals(signum).name} at step {run.state.step}: checkpoint {run.checkpoint_path}; "
              "continue with init_from=resume", file=sys.stderr)
    leave_process_group(run.rt, run.wrapped)
    sys.exit(128 + signum)


def finish(run):
    """The whole validation set, the HF export, then summary.json (written last: the run is complete)."""
    cfg, rt, state = run.cfg, run.rt, run.state
    if state.val_loss is not None and run.eval_blocks == run.val_data.n_blocks:
        full = state.val_loss
    else:
        full = run.validation_loss(run.val_data.n_blocks)
    run.metrics.log({"step": state.step, "phase": run.phase.name, "tokens": state.tokens, "val_full_loss": full,
                     "val_full_ppl": exp(full)})
    identical = ranks_identical(run.model) if rt.distributed and not rt.fsdp else None
    export_model = full_model_on_rank0(run.model) if rt.fsdp and cfg.export_hf else run.model  # every rank gathers
    memory = {"rank0_param_bytes": local_bytes(run.model.parameters()),  # measured, not assumed
              "rank0_optimizer_state_bytes": optimizer_state_bytes(run.optimizer)}
    leave_process_group(rt, run.wrapped)  # the last collective is behind: the other ranks need not wait for the export
    if rt.master:
        print(f"step {state.step}: whole validation set loss {full:.4f}, ppl {exp(full):.6g}")
        assert identical is not False, "DDP ranks ended with different weights"
        if cfg.export_hf:
            hf_dir = os.path.join(cfg.out_dir, "hf")
            export_hf(export_model, run.tokenizer_dir, hf_dir, run.checkpoint_path)
            print(f"exported {hf_dir}")
        for s in state.phase_stats.values():  # tokens/s of the steps after each phase's first (compile) step
            timed, seconds = s["steps"] - s["first_steps"], s["seconds"] - s["first_steps_seconds"]
            s["tokens_per_s"] = s["tokens"] / s["steps"] * timed / seconds if timed and seconds > 0 else None
            s["mfu"] = s["tokens_per_s"] * s["flops_per_token"] / rt.world_size / rt.peak_flops \
                if s["tokens_per_s"] and rt.peak_flops and "flops_per_token" in s else None
        summary = {"steps": state.step, "tokens": state.tokens, "best_val_loss": state.best_val_loss,
                   "final_val_loss": state.val_loss, "final_val_full_loss": full, "phases": state.phase_stats,
                   "world_size": rt.world_size, "ddp_ranks_identical": identical,
                   "parallelism": cfg.parallelism if rt.distributed else "none", "sharded": rt.fsdp, **memory,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        write_json(os.path.join(cfg.out_dir, "summary.json"), summary)


def run_is_complete(out_dir, step):
    """Whether the run in out_dir ended at `step`: summary.json is written last, after the export."""
    try:
        with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
            return json.load(f)["steps"] == step
    except (OSError, ValueError, KeyError, TypeError):
        return False


# -----------------------------------------------------------------------------
# the step: the model in its phase, the micro-batches, forward, backward, the update


def train_step(model, raw_model, optimizer, scaler, batches, lr, grad_clip, rt, verify_grads=False, read_ahead=None,
               new_rows=None):
    """One optimizer step at learning rate lr: forward and backward over the micro-batches, gradient clipping
    (grad_clip > 0), the update. Returns the loss (mean over the ranks) as a 0-dim tensor on the device, unread: the
    host queues the step and goes on. A non-finite loss skips the update on the device (update_unless_nonfinite);
    counting it is the caller's. verify_grads (the first step after a phase switch): every trainable parameter got a
    gradient, and the ranks agree after the update. read_ahead, if given, runs while the device computes.
    new_rows (a NewRowsOnly): the frozen rows' gradients dropped before clipping."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = forward_backward(model, batches, scaler, rt)
    if read_ahead is not None:
        read_ahead()
    if rt.distributed:
        dist.all_reduce(loss)
        loss /= rt.world_size
    if new_rows is not None and new_rows.active:  # the full phase: no row mask, nothing to decide
        new_rows.before_step(lr, update_goes_ahead(loss, raw_model, scaler))
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.grad is not None], grad_clip)
    if verify_grads:
        missing = [n for n, p in raw_model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"no gradients after the phase switch for {missing[:3]}"
    update_unless_nonfinite(optimizer, scaler, loss)
    optimizer.zero_grad(set_to_none=True)
    if verify_grads and isinstance(model, DDP):
        assert ranks_identical(raw_model), "ranks diverged after the phase switch"
    return loss


def update_unless_nonfinite(optimizer, scaler, loss):
    """The optimizer step, skipped when the loss is not finite, decided on the device, without waiting for it: the
    fused AdamW takes the flag (found_inf, as a GradScaler hands it over) and leaves weights, moments and step counts
    as they were. float16: the GradScaler skips a step whose gradients overflowed (a non-finite loss's do) and
    lowers its scale. An optimizer without the fused kernel reads the loss."""
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf = (~torch.isfinite(loss)).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif math.isfinite(loss.item()):
        optimizer.step()


def update_goes_ahead(loss, model, scaler):
    """1.0 if update_unless_nonfinite will update, else 0.0, a device tensor (no sync): the loss is finite and, under
    a GradScaler, so is every gradient (what it checks before it steps)."""
    finite = torch.isfinite(loss)
    if scaler.is_enabled():  # float16: never with FSDP, so the gradients are plain tensors, the same on every rank
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = finite & torch.stack([torch.isfinite(g).all() for g in grads]).all()
    return finite.float()


def forward_backward(model, batches, scaler, rt):
    """Forward and backward over one optimizer step's micro-batches [(x, y), ...] (on the device: StepBatches), each
    loss scaled by 1/len so the gradients are the mean's; a DDP-wrapped model all-reduces them once, after the last
    micro-batch (FSDP reduce-scatters each one's). Returns the mean loss (a tensor: reading it is the caller's one
    sync)."""
    loss_sum = torch.zeros((), device=rt.device)
    for i, (x, y) in enumerate(batches):
        with model.no_sync() if isinstance(model, DDP) and i < len(batches) - 1 else nullcontext():
            with rt.autocast:
                _, loss = model(x, y)
                loss = loss / len(batches)
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    return loss_sum


def set_trainable(model, phase, cfg):
    """Embedding phase with a frozen transformer: only the input embedding (and the output head) require grad, so the
    body gets no weight gradients and no optimizer state. Full phase (or freeze_transformer=False): everything
    trains."""
    frozen = phase.name == "embedding" and cfg.freeze_transformer
    names = model.embedding_parameter_names()
    trainable = set(names.values()) if cfg.train_output_embeddings else {names["input"]}
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen or name in trainable)


def wrap(raw_model, cfg, rt):
    """compile, then DDP, around the raw model in its current requires_grad state. Called again at the phase
    switch: dynamo may reuse a graph traced with other requires_grad flags (pytorch#139476) and DDP registers only
    the parameters that required grad when it was built, so both are rebuilt from scratch."""
    model = raw_model
    if rt.compile:
        torch._dynamo.reset()
        model = torch.compile(raw_model)
    if rt.distributed and not rt.fsdp:  # an FSDP model is sharded already (build_model)
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None,
                    gradient_as_bucket_view=True)
    return model


def configure_optimizer(model, cfg, device_type, new_rows=None):
    """AdamW (the fused kernel) over every parameter: frozen ones have no grad and so get no state until they train.
    Weight decay on matrices (embeddings included), none on biases and norms (1-D). With new_rows (a NewRowsOnly),
    the embedding matrices are a group of their own, whose decay it sets per phase."""
    masked = {id(p) for p in new_rows.params} if new_rows else set()
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in masked]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if new_rows:
        groups.append({"params": new_rows.params, "weight_decay": cfg.weight_decay})
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                  fused=device_type in ("cuda", "cpu"))  # one kernel per step: 12x the loop on a CPU
    if new_rows:
        new_rows.optimizer = optimizer
    return optimizer


def appended_rows_from(init_dir):
    """The first appended id of an init that clp.py apply_clp --extend made (its clp_report.json)."""
    report = os.path.join(init_dir, "clp_report.json")
    first = (read_json(report).get("extend") or {}).get("source_ids") if os.path.isfile(report) else None
    if not isinstance(first, int):
        raise UserError(f"train_new_rows_only=True: {report} does not record extend.source_ids (an init made by "
                        "clp.py apply_clp --extend does)")
    return first


class NewRowsOnly:
    """train_new_rows_only: in the embedding phase the embedding matrices train only their rows from `first` on
    (the appended tokens'). Before each update the other rows' gradients are zeroed (so Adam's moments stay zero
    there and its update is exactly zero), and AdamW's decoupled weight decay, which would shrink every row, is
    applied by hand to the trained rows only, the group's own decay set to 0 for the phase. In the full phase the
    group decays as every matrix does. `keep` is 1 for a trained row, 0 for a frozen one: a DTensor sharded like
    its parameter under FSDP, so every operation stays on the local shard."""

    def __init__(self, model, first, weight_decay):
        rows = model.input_embeddings().weight.shape[0]
        if not 0 < first < rows:
            raise UserError(f"train_new_rows_only=True: the first appended id is {first}, but the model has {rows} "
                            "embedding rows")
        self.first, self.weight_decay, self.optimizer, self.active = first, weight_decay, None, False
        self.params = list({id(p): p for p in (model.input_embeddings().weight,
                                               model.output_embeddings().weight)}.values())  # one when tied
        self.keep = [self.row_mask(p) for p in self.params]

    def row_mask(self, p):
        """(rows, 1): 1 from `first` on, laid out as p is (sharded like it under FSDP2)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not isinstance(p, DTensor):
            return (torch.arange(p.shape[0], device=p.device) >= self.first).float()[:, None]
        keep = (torch.arange(p.shape[0], device=p.device_mesh.device_type) >= self.first).float()[:, None]
        return distribute_tensor(keep, p.device_mesh, p.placements)

    def set_phase(self, embedding):
        """The group's decay for the step: by hand (before_step) in the embedding phase, AdamW's in the full one.
        The group is the optimizer's last, looked up here: loading a checkpoint's state replaces its dicts."""
        self.optimizer.param_groups[-1]["weight_decay"] = 0.0 if embedding else self.weight_decay
        self.active = embedding

    @torch.no_grad()
    def before_step(self, lr, goes_ahead):
        """The frozen rows' gradients zeroed; the trained rows decayed as AdamW would (p *= 1 - lr * wd) when the
        update goes ahead (goes_ahead: update_goes_ahead's 1.0 or 0.0, on the device, so no sync). The embedding
        phase only (self.active)."""
        for p, keep in zip(self.params, self.keep):
            if p.grad is not None:
                p.grad.mul_(keep.to(p.grad.dtype))
                if self.weight_decay:  # on the local shard under FSDP: the loss is a plain tensor
                    local, local_keep = (p.to_local(), keep.to_local()) if hasattr(p, "to_local") else (p, keep)
                    local.mul_(1 - lr * self.weight_decay * local_keep * goes_ahead)


class StepBatches:
    """This rank's micro-batches of each optimizer step, read at the step's global position in train.bin and sent to
    the device. On a GPU the next step's are read and sent while the current one computes (read_ahead, which
    train_step calls between queuing the backward and reading the loss)."""

    def __init__(self, train_data, rt, vocab_size):
        self.data, self.rt, self.vocab_size = train_data, rt, vocab_size
        self.ahead = None  # (position, phase name, batches) read ahead

    def read(self, pos, phase):
        stride = phase.batch_size * self.rt.world_size
        batches = [check_ids(self.data.batch(pos + i * stride, phase.batch_size), self.data.path, self.vocab_size)
                   for i in range(phase.grad_accum // self.rt.world_size)]
        return [to_device(x, y, self.rt.device) for x, y in batches]

    def next(self, state, phase):
        """The step's micro-batches (those read ahead, if they are the ones); advances state.pos past its blocks."""
        ahead, self.ahead = self.ahead, None
        batches = ahead[2] if ahead and ahead[:2] == (state.pos, phase.name) else self.read(state.pos, phase)
        state.pos += phase.grad_accum // self.rt.world_size * phase.batch_size * self.rt.world_size
        return batches

    def read_ahead(self, pos, phase):
        try:
            self.ahead = (pos, phase.name, self.read(pos, phase))
        except UserError:  # a bad batch: read again, and reported, at its own step (step_batches)
            self.ahead = None


def to_device(x, y, device):
    """A batch on the device in one asynchronous copy. x and y are overlapping views of one (B, T+1) block of rows,
    and neither is contiguous: pinning each would copy it twice and a non-contiguous copy blocks. So the rows are
    written once into pinned memory, copied without blocking, and sliced on the device."""
    if not device.startswith("cuda") or x.is_cuda:
        return x, y
    rows = torch.empty((x.shape[0], x.shape[1] + 1), dtype=x.dtype, pin_memory=True)
    torch.cat((x, y[:, -1:]), dim=1, out=rows)
    rows = rows.to(device, non_blocking=True)
    return rows[:, :-1], rows[:, 1:]


def check_ids(batch, path, rows):
    """An id beyond the embedding rows would end the run mid-way in an index error (a device assert on a GPU); the
    max of a batch on the host costs next to nothing, a scan of a multi-GB file at the start would not."""
    top = max(int(batch[0].max()), int(batch[1].max()))
    if top >= rows:
        raise UserError(f"{path}: token id {top}, but the model has {rows} embedding rows (tokenized with another "
                        "tokenizer, or a corrupt file)")
    return batch


# -----------------------------------------------------------------------------
# helpers: FSDP2, evaluation, the process group, the export, the metrics log


def apply_fsdp(model, dtype):
    """FSDP2 (fully_shard), as torchtitan shards a transformer: each block, the input embedding, and the final norm
    with the output head are one group each (unsharded together, just in time, then freed), the root holds what is
    left. The output head stays unsharded from its forward to its backward, which follows at once: one all-gather
    of the largest group a step fewer, as torchtitan does (a forward without a backward must then reshard it:
    `reshard`).
    A tied model (Llama-3.2, Qwen2.5 and smaller: the head is the input embedding) keeps its one matrix in one group
    with the final norm and the head, unsharded from the lookup to the backward: one parameter, one gradient summed
    from both uses, one reduce-scatter, one optimizer state.
    Frozen and trainable parameters may share a group: FSDP2 follows each parameter's requires_grad at every step
    and reduces only the gradients that exist. bf16 runs compute in bf16 and reduce gradients in fp32; the sharded
    master weights and the optimizer state stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bfloat16" \
        else MixedPrecisionPolicy()
    for block in model.blocks():
        fully_shard(block, mp_policy=mp)
    head = [model.final_norm(), model.output_embeddings()]
    if model.tied:
        head.insert(0, model.input_embeddings())
    else:
        fully_shard(model.input_embeddings(), mp_policy=mp)
    fully_shard(head, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mp_policy=mp)


def reshard(model):
    """Every FSDP group back to its shards. A forward without a backward (build_model's first, an evaluation) leaves
    the output head unsharded (reshard_after_forward=False), its full parameters registered in the model where the
    optimizer and the checkpoint must find the sharded ones. A model without FSDP is left as it is."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def apply_activation_checkpointing(model):
    """Each block's forward runs under non-reentrant torch.utils.checkpoint: its activations are recomputed in
    backward instead of kept. The block's own forward is wrapped (no wrapper module), so parameter names, state dicts
    and checkpoints stay those of the plain model; under FSDP the recomputation runs while the block is unsharded."""
    for block in model.blocks():
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def full_model_on_rank0(model):
    """The whole model, unsharded, on rank 0's CPU, its shards gathered one tensor at a time (cpu_offload: the
    GPU never holds the full model); None on the other ranks. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        full = model_from_config(model.config)
    full.load_state_dict(state, assign=True)
    full.tie_weights()
    return full


def local_bytes(tensors):
    """Bytes this process holds of the tensors (a DTensor counts its local shard)."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    return sum(local(t).numel() * local(t).element_size() for t in tensors if torch.is_tensor(t))


def optimizer_state_bytes(optimizer):
    """Bytes this process holds of the optimizer's state (AdamW's moments; FSDP: their shards)."""
    return local_bytes(v for s in optimizer.state.values() for v in s.values())


def unwrapped(model):
    """The model without its DDP wrapper: an evaluation runs no DDP collectives (an FSDP model runs its own, so every
    rank evaluates)."""
    return model.module if isinstance(model, DDP) else model


@torch.no_grad()
def evaluate(model, val_data, n_blocks, vocab_size, batch_size, rt):
    """Mean validation loss over the first n_blocks (the same every time; all of them for the final pass), on all
    ranks, token-weighted and summed across them. `model` is not DDP-wrapped."""
    model.eval()
    B = batch_size
    nll = torch.zeros(2, dtype=torch.float64, device=rt.device)
    for start in range(0, n_blocks, B * rt.world_size):
        x, y = check_ids(val_data.batch(start, B), val_data.path, vocab_size)
        keep = (start + rt.rank * B + torch.arange(B) < n_blocks).to(rt.device)  # the last global batch may be partial
        x, y = x.to(rt.device), y.to(rt.device)
        with rt.autocast:
            logits, _ = model(x)
        loss = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").sum(1)
        nll[0] += loss[keep].sum()
        nll[1] += keep.sum() * y.shape[1]
    if rt.distributed:
        dist.all_reduce(nll)
    reshard(model)
    model.train()
    return (nll[0] / nll[1]).item()


def ranks_identical(model):
    """Every parameter equal on every rank (per-parameter sums compared exactly)."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return torch.equal(lo, hi)


def drop_reducer(model):
    """A DDP wrapper that is done with drops its Reducer now, while the process group is alive. Freed after
    destroy_process_group (at the end of the run, at exit), the Reducer would be the group's last owner and destroy the
    gloo group holding the GIL: a deadlock with gloo's worker thread, which waits for the GIL to free a finished
    all-reduce (seen: a finished run's rank 1 hanging for ever after summary.json was written)."""
    if isinstance(model, DDP):
        model.reducer = None


def leave_process_group(rt, model=None):
    """The end of a distributed run (every rank arrives here together): the wrapper's Reducer, then the process
    group, once every rank is done with it (a rank tearing gloo down while a peer still talks to it can abort)."""
    if rt.distributed:
        drop_reducer(model)
        dist.barrier()
        dist.destroy_process_group()


def card(device_name):
    """(card, form factor) of a CUDA device name, the PEAK_FLOPS key: 'NVIDIA H100 PCIe' -> ('H100', 'PCIe'), 'NVIDIA
    H100 80GB HBM3' -> ('H100', 'SXM'), 'NVIDIA L4' -> ('L4', ''). Whole words compare, so L4 is not L40 nor A10
    A10G; a data-centre card that names no form factor is the SXM one. None for a card the table does not list."""
    words = re.split(r"[\s_-]+", device_name.upper())
    name = next((w for w in words if (w, "") in PEAK_FLOPS or (w, "SXM") in PEAK_FLOPS), None)
    if name is None:
        return None
    form = "NVL" if "NVL" in words else "PCIe" if "PCIE" in words else "SXM"
    return (name, form) if (name, form) in PEAK_FLOPS else (name, "") if (name, "") in PEAK_FLOPS else None


def peak_flops(device_name, dtype):
    """The card's dense peak for the run's dtype (PEAK_FLOPS); 0.0 for a card not listed (no MFU then)."""
    bf16, tf32 = PEAK_FLOPS.get(card(device_name), (0.0, 0.0))
    return tf32 if dtype == "float32" else bf16


def check_export_tokenizer(path, where):
    """The export at the end copies this tokenizer: it must load now, not after hours of training."""
    try:
        load_tokenizer(path)
    except UserError as e:
        raise UserError(f"{where}: {e}; the hf/ export at the end needs it (export_hf=False trains without it)") \
            from None


def export_hf(raw_model, tokenizer_dir, hf_dir, checkpoint_path):
    """out_dir/hf (config, safetensors, tokenizer files) built under a temp name and renamed when complete, so it is
    never a model without its tokenizer; a previous export goes only then. A write that fails (a full disk) is one
    line; the run's checkpoint is whole, and a resume exports again."""
    kept = f"the checkpoint {checkpoint_path} is kept: free space, then --init_from=resume exports it"
    with atomic_dir(hf_dir) as tmp, write_errors(hf_dir, tmp, kept):
        raw_model.save_pretrained(tmp)
        if tokenizer_dir:
            save_tokenizer(tokenizer_dir, tmp)


class MetricsLog:
    """metrics.jsonl (and wandb), one JSON line per record, written by rank 0 only. A resumed run first drops what
    the interrupted one logged after its checkpoint (resume_step), and a line cut short."""

    def __init__(self, cfg, master, resume_step=None):
        self.file = self.wandb = None
        if not master:
            return
        if cfg.wandb_log:
            import wandb
            wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg))
            self.wandb = wandb
        path = os.path.join(cfg.out_dir, "metrics.jsonl")
        kept = []
        if resume_step is not None and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                lines = [line.rstrip("\n") + "\n" for line in f if line.strip()]
            for i, line in enumerate(lines):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if i == len(lines) - 1:  # the process was killed while writing it
                        break
                    raise UserError(f"{path}, line {i + 1}: not valid JSON") from None
                if record["step"] <= resume_step and "val_full_loss" not in record:  # the final pass comes again
                    kept.append(line)
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        self.file = open(path, "a", encoding="utf-8")

    def log(self, record):
        if self.file:
            self.file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            self.file.flush()
            if self.wandb:
                self.wandb.log(record, step=record["step"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file:
            self.file.close()
            self.file = None


# -----------------------------------------------------------------------------
# the command line: signals, errors, --print_needs


class Stop(BaseException):
    """SIGTERM or SIGINT outside the training loop, or a second one: the run ends at once (args: the signal)."""


@contextmanager
def signals_handled():
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C). In the training loop (stop.deferred) the first one only
    sets a flag: the loop finishes its step, writes a checkpoint and exits. Anywhere else (loading, the evaluations
    and the export outside the loop) and a second signal anywhere raise Stop at once: there is no step to finish,
    and every checkpoint on disk is complete. The previous handlers come back afterwards (for notebooks and tests)."""
    stop = SimpleNamespace(received=[], deferred=False)

    def handler(signum, frame):
        stop.received.append(signum)
        if not stop.deferred or len(stop.received) > 1:
            raise Stop(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv=None, defaults=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--print_needs" in argv:  # for `make train`: what the run reads, so that the pipeline builds it first
        cfg = parse_config([a for a in argv if a != "--print_needs"], defaults)
        print(f"init_from={cfg.init_from}\ndata_dir={cfg.data_dir}")
        return
    try:
        with signals_handled() as stop:
            try:
                train(argv, defaults, stop)
            except RuntimeError as e:  # a dead or hung peer: say so in one line instead of a collective's traceback
                if not peer_failed(e) or os.environ.get("DEBUG"):
                    raise
                raise UserError(f"rank {dist.get_rank()}: a DDP peer died or stopped answering "
                                f"({str(e).splitlines()[0][-160:]}); restart with init_from=resume") from None
            except UserError:  # before training, every rank fails alike: rank 0 alone says it
                if int(os.environ.get("RANK", "0")) > 0 and not stop.deferred and not os.environ.get("DEBUG"):
                    sys.exit(1)
                raise
            except OSError as e:  # a full disk, a lost mount, a permission: late, so one line that names the file
                if os.environ.get("DEBUG") or e.errno is None:
                    raise
                raise UserError(f"{e.filename}: {e.strerror}" if e.filename else f"I/O error: {e.strerror}") from None
            finally:
                close_progress_bars()
                release_out_dirs()
    except Stop as e:
        print(f"stopped by {signal.Signals(e.args[0]).name} outside a training step (or a second time): exiting now; "
              "a checkpoint already written is complete", file=sys.stderr)
        sys.exit(128 + e.args[0])


def peer_failed(e):
    """Whether an error in a distributed run is a collective's that lost a peer (dead, or silent past ddp_timeout_s).
    torch raises DistError (and its subclasses) for NCCL and the store; gloo's failures reach Python as plain
    RuntimeErrors, while torch's local failures are subclasses of it (OutOfMemoryError, dynamo's errors)."""
    return dist.is_initialized() and (isinstance(e, dist.DistError) or type(e) is RuntimeError)


def close_progress_bars():
    """A run that ends early leaves its progress bar open: closed, the error starts a line of its own."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(tqdm._instances):
            bar.close()


if __name__ == "__main__":
    run_cli(main)
