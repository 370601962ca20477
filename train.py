"""
Pre-train a GPT-NeoX progressively: an optional embedding phase (transformer frozen, only the token embeddings train,
at their own learning rate, schedule and batch size), then the full model. One process, or DDP or FSDP2
(parallelism='fsdp') under torchrun.

    python train.py config/oscar_de_embedding_tuning.py --max_iters=1000
    torchrun --standalone --nproc_per_node=8 train.py config/oscar_de_embedding_tuning.py
    torchrun --standalone --nproc_per_node=8 train.py config/oscar_de_embedding_tuning.py --parallelism=fsdp

Config: the defaults in TrainConfig below, then each config file (python assignments) in order, then --key=value.
"""

import ast
import difflib
import functools
import importlib.util
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from data import Blocks, check_tokenizer, load_meta
from common import (UserError, atomic_dir, atomic_path, exp, json_safe, load_tokenizer, read_json, resolve_model_dir,
                    round_up, run_cli, save_tokenizer, tokenizer_file, torch_dtype, write_json)
from model import CausalLM, GPTNeoXConfig, config_from_dict, config_from_hf, model_from_config


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out/train"
    data_dir: str = "data/oscar_de"
    init_from: str = "out/pythia-410m-clp-german"  # HF-format directory or hub id | 'scratch' | 'resume'
    init_revision: str = ""  # hub revision of init_from, e.g. 'step143000'
    eval_interval: int = 300  # optimizer steps between evaluations and checkpoints
    eval_iters: int = 50  # validation batches per periodic evaluation (the full set is evaluated at the end)
    eval_at_start: bool = True
    eval_only: bool = False
    export_hf: bool = True  # write out_dir/hf (config, safetensors, tokenizer) at the end
    override: bool = False  # a fresh run replaces a run in out_dir (kept aside until the new one's first checkpoint)
    wandb_log: bool = False
    wandb_project: str = "clp-transfer"
    wandb_run_name: str = "run"
    # data and length: max_iters, else max_tokens, else epochs (passes over train.bin)
    block_size: int = 512
    batch_size: int = 8  # sequences per micro-batch per process
    # micro-batches per optimizer step, summed over all processes: a multiple of their number, or fewer than them,
    # which means one each (the study's per-device meaning: a step is then world_size x batch_size sequences)
    gradient_accumulation_steps: int = 4
    max_iters: int = 0
    max_tokens: int = 0
    epochs: float = 1.0
    seed: int = 42
    # full phase (or the whole run when embedding_tuning_frac = 0)
    learning_rate: float = 3e-4
    min_lr: float = 3e-5  # every phase's learning rate is floored here, warmup included
    warmup_frac: float = 0.01
    lr_schedule: str = "cosine"  # cosine | linear | constant | unified (one warmup and one cosine over the run)
    warmup_relative_to: str = "run"  # warmup fractions of the whole run ('run') or of their own phase ('phase')
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # embedding phase: the first embedding_tuning_frac of the run, in optimizer steps or in tokens
    embedding_tuning_frac: float = 0.0
    phase_unit: str = "steps"  # steps | tokens
    embedding_learning_rate: float = 1e-3
    embedding_warmup_frac: float = 0.01
    embedding_lr_schedule: str = "cosine"  # cosine | linear | constant
    embedding_batch_size: int = 0  # 0: batch_size
    embedding_gradient_accumulation_steps: int = 0  # 0: gradient_accumulation_steps (the same rule for processes)
    freeze_transformer: bool = True  # False: the study's "accelerated start" (all weights at the embedding LR)
    train_output_embeddings: bool = True  # the output head trains in the embedding phase too (as in the study)
    # model for init_from='scratch' (vocab_size 0: the data's vocabulary padded to a multiple of 128)
    vocab_size: int = 0
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    intermediate_size: int = 0  # 0: 4 * n_embd
    rotary_pct: float = 0.25
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 on a GPU that has it, else float32) | bfloat16 | float16 | float32
    compile: bool = False
    parallelism: str = "ddp"  # with several processes: ddp (replicas) | fsdp (FSDP2: params, grads, Adam sharded)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, more compute
    backend: str = "auto"  # DDP backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo
    ddp_timeout_s: int = 600  # a rank that waits this long for a dead peer exits with an error
    device_peak_flops: float = 0.0  # for MFU, at the run's dtype; 0: looked up for known GPUs, none on CPU
    max_nonfinite_steps: int = 0  # optimizer steps with a non-finite loss to skip before stopping


PHASE_KEYS = ("learning_rate", "warmup_frac", "lr_schedule", "batch_size", "gradient_accumulation_steps")
SCHEDULES = ("cosine", "linear", "constant")
CHOICES = {"lr_schedule": SCHEDULES + ("unified",), "embedding_lr_schedule": SCHEDULES,
           "phase_unit": ("steps", "tokens"), "warmup_relative_to": ("run", "phase"),
           "dtype": ("auto", "bfloat16", "float16", "float32"), "backend": ("auto", "nccl", "gloo"),
           "parallelism": ("ddp", "fsdp")}
# dense tensor-core peaks per card: (bf16 and fp16, TF32). float32 runs use the TF32 figure (the trainer turns TF32 on;
# on these cards it is half the bf16 rate). The first matching name counts: H200 before H100, A100 before A10.
PEAK_FLOPS = {"H200": (989e12, 494.7e12), "H100": (989e12, 494.7e12), "A100": (312e12, 156e12),
              "L40S": (362e12, 183e12), "L4": (121e12, 60e12), "A10": (125e12, 62.5e12), "4090": (165e12, 82.6e12),
              "3090": (71e12, 35.6e12)}


# -----------------------------------------------------------------------------
# configuration: defaults <- config files <- --key=value


def parse_config(argv, defaults=None):
    """TrainConfig from the command line: python config files (assignments) and --key=value overrides. An unknown
    key is an error that names the closest known key; values must have the default's type (ints pass as floats).
    A config file runs with __file__ set to its path, so it finds its base config from any working directory;
    modules, functions and names starting with '_' in it are helpers, not config keys."""
    cfg = TrainConfig(**(defaults or {}))
    types = {f.name: f.type for f in fields(TrainConfig)}

    def assign(key, value, where):
        if key not in types:
            close = difflib.get_close_matches(key, types, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{where}: unknown config key {key!r}{hint}")
        want = types[key]
        if want is float and type(value) is int:
            value = float(value)
        if want is int and type(value) is float and value.is_integer():  # --max_iters=1e3
            value = int(value)
        if type(value) is not want:
            article = "an" if want.__name__[0] in "aeiou" else "a"
            raise UserError(f"{where}: {key}={value!r} is a {type(value).__name__}, expected {article} "
                            f"{want.__name__}")
        if key in CHOICES and value not in CHOICES[key]:
            raise UserError(f"{where}: {key}={value!r}, expected one of {', '.join(CHOICES[key])}")
        setattr(cfg, key, value)

    for arg in argv:
        if arg in ("-h", "--help"):
            print(config_help(cfg))
            sys.exit(0)
        if arg.startswith("-") and not arg.startswith("--"):
            raise UserError(f"{arg}: expected a config file or --key=value (--help lists the keys)")
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                raise UserError(f"{arg}: expected --key=value")
            if types.get(key) is str:
                value = raw
            else:
                try:
                    value = ast.literal_eval(raw)
                except (ValueError, SyntaxError):
                    value = {"true": True, "false": False}.get(raw.lower(), raw)
            assign(key, value, arg)
        else:
            for key, value in read_config_file(arg).items():
                assign(key, value, arg)
    return cfg


def config_help(cfg):
    """Every key with its value in `cfg` (the defaults) and its comment, grouped as in TrainConfig's source: there a
    one-line comment is a group's heading, a longer one describes the key below it."""
    import inspect

    lines = [__doc__.strip(), "", "Keys (--key=value, or key = value in a config file), their defaults and meaning:"]
    above = []
    for line in inspect.getsource(TrainConfig).splitlines()[2:]:
        line = line.strip()
        if line.startswith("#"):
            above.append(line[1:].strip())
            continue
        if len(above) == 1:
            lines += ["", f"# {above[0]}"]
        key, _, rest = line.partition(":")
        text = " ".join((above if len(above) > 1 else []) + [rest.partition("#")[2].strip()]).strip()
        lines.append(f"  --{key}={getattr(cfg, key)!r}" + (f"  # {text}" if text else ""))
        above = []
    return "\n".join(lines)


def read_config_file(path):
    """The assignments of a python config file (checked by the caller): it runs with __file__ set to its path, so
    it finds its base config from any working directory; modules, functions and names starting with '_' in it are
    helpers, not config keys."""
    if not os.path.isfile(path):
        what = "is a directory, not a config file" if os.path.isdir(path) else "config file not found"
        raise UserError(f"{path}: {what}")
    namespace = {}
    try:
        exec(compile(open(path, encoding="utf-8").read(), path, "exec"), {"__file__": os.path.abspath(path)},
             namespace)
    except SyntaxError as e:
        raise UserError(f"{path}, line {e.lineno}: syntax error ({e.msg})") from None
    except Exception as e:
        raise UserError(f"{path}: the config file raised {type(e).__name__}: {e}") from None
    return {key: value for key, value in namespace.items()
            if not key.startswith("_") and not callable(value) and type(value).__name__ != "module"}


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
                "vocab_size", "intermediate_size"):
        if getattr(cfg, key) < 0:
            bad(key, "a positive integer (0: not set)")
    if cfg.epochs < 0 or cfg.epochs == 0 and not (cfg.max_iters or cfg.max_tokens):
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
    emb_lr = cfg.embedding_tuning_frac > 0 and cfg.lr_schedule != "unified"  # the embedding phase's own peak
    for key in ("learning_rate",) + (("embedding_learning_rate",) if emb_lr else ()):
        if cfg.min_lr > getattr(cfg, key):
            raise UserError(f"min_lr={cfg.min_lr:g} is above {key}={getattr(cfg, key):g} (the floor of the schedule)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        bad("device", "auto, cpu, cuda or cuda:N")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={cfg.device!r}, but CUDA is not available here (torch {torch.__version__}); use "
                        "device=cpu or auto")
    if cfg.device.startswith("cuda:") and int(cfg.device[5:]) >= torch.cuda.device_count():
        bad("device", f"one of the {torch.cuda.device_count()} GPUs here (cuda:0 ...)")
    if cfg.wandb_log and importlib.util.find_spec("wandb") is None:
        raise UserError("wandb_log=True, but wandb is not installed (pip install wandb, or wandb_log=False)")


# -----------------------------------------------------------------------------
# the plan: phase lengths and the learning rate at every step


@dataclass
class Phase:
    name: str  # 'embedding' | 'full'
    start: int  # first optimizer step
    steps: int
    batch_size: int
    grad_accum: int  # micro-batches per optimizer step, all processes together
    peak_lr: float
    warmup: int  # warmup steps
    schedule: str
    span: tuple = None  # (first step, steps) the schedule runs over: the phase itself, or the run for 'unified'

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


def plan_phases(cfg, train_blocks, world_size=1):
    """Split the run into the embedding phase and the full phase. phase_unit='steps': the embedding phase is the
    first ceil(frac * N) of N optimizer steps; 'tokens': it spends frac of the tokens at its own batch size (so a
    small embedding batch makes many steps). max_iters is the number of optimizer steps in either unit; max_tokens
    and epochs are a token budget, which either unit spends whatever the two phases' batch sizes: to within one
    step, never more."""
    T = cfg.block_size
    emb_bs = cfg.embedding_batch_size or cfg.batch_size
    emb_ga = micro_batches(cfg.embedding_gradient_accumulation_steps or cfg.gradient_accumulation_steps, world_size)
    full_ga = micro_batches(cfg.gradient_accumulation_steps, world_size)
    full_tokens_per_step = cfg.batch_size * full_ga * T
    emb_tokens_per_step = emb_bs * emb_ga * T
    frac = cfg.embedding_tuning_frac
    budget = cfg.max_tokens or int(cfg.epochs * train_blocks * T)  # tokens
    if cfg.phase_unit == "steps":
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
    total = emb_steps + full_steps
    if total <= 0:
        raise UserError("the run has no steps: set max_iters, max_tokens or epochs")

    def warmup(w_frac, steps):
        return int(round(w_frac * (steps if cfg.warmup_relative_to == "phase" else total)))

    phases = []
    if cfg.lr_schedule == "unified":  # one warmup and one cosine over the whole run, both phases at learning_rate
        w = warmup(cfg.warmup_frac, total)
        phases = [Phase("embedding", 0, emb_steps, emb_bs, emb_ga, cfg.learning_rate, w, "cosine", (0, total)),
                  Phase("full", emb_steps, full_steps, cfg.batch_size, full_ga, cfg.learning_rate, w, "cosine",
                        (0, total))]
        return [p for p in phases if p.steps > 0]
    if emb_steps:
        phases.append(Phase("embedding", 0, emb_steps, emb_bs, emb_ga, cfg.embedding_learning_rate,
                            warmup(cfg.embedding_warmup_frac, emb_steps), cfg.embedding_lr_schedule))
    if full_steps:
        phases.append(Phase("full", emb_steps, full_steps, cfg.batch_size, full_ga, cfg.learning_rate,
                            warmup(cfg.warmup_frac, full_steps), cfg.lr_schedule))
    return phases


def phase_at(phases, step):
    return next((p for p in phases if p.start <= step < p.start + p.steps), phases[-1])


# -----------------------------------------------------------------------------
# the model in its phase: freezing, compile, DDP


def set_trainable(model, phase, cfg):
    """Embedding phase with a frozen transformer: only the input embedding (and the output head) require grad, so the body gets no
    weight gradients and no optimizer state. Full phase (or freeze_transformer=False): everything trains."""
    frozen = phase.name == "embedding" and cfg.freeze_transformer
    names = model.embedding_parameter_names()
    trainable = set(names.values()) if cfg.train_output_embeddings else {names["input"]}
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen or name in trainable)


def wrap(raw_model, cfg, ddp, local_rank, device_type):
    """compile, then DDP, around the raw model in its current requires_grad state. Called again at the phase
    switch: dynamo may reuse a graph traced with other requires_grad flags (pytorch#139476) and DDP registers only
    the parameters that required grad when it was built, so both are rebuilt from scratch."""
    model = raw_model
    if cfg.compile:
        torch._dynamo.reset()
        model = torch.compile(raw_model)
    if ddp and cfg.parallelism == "ddp":  # an FSDP model is sharded already (build_model)
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, gradient_as_bucket_view=True)
    return model


def configure_optimizer(model, cfg, device_type):
    """AdamW (the fused kernel) over every parameter: frozen ones have no grad and so get no state until they train.
    Weight decay on matrices (embeddings included), none on biases and LayerNorms (all 1-D in GPT-NeoX)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device_type in ("cuda", "cpu"))  # one kernel per step: 12x the loop on a CPU


def forward_backward(model, batches, autocast, scaler, ddp, device):
    """Forward and backward over one optimizer step's micro-batches [(x, y), ...] (on the device: StepBatches), each
    loss scaled by 1/len so the gradients are the mean's; under DDP they are all-reduced once, after the last
    micro-batch (FSDP reduce-scatters each one's). Returns the mean loss (a tensor: reading it is the caller's one
    sync)."""
    loss_sum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(batches):
        with nullcontext() if not ddp or i == len(batches) - 1 else model.no_sync():
            with autocast:
                _, loss = model(x, y)
                loss = loss / len(batches)
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    return loss_sum


# -----------------------------------------------------------------------------
# FSDP2, activation checkpointing, sharded checkpoints


def apply_fsdp(model, dtype):
    """FSDP2 (fully_shard), as torchtitan shards a transformer: each block, the input embedding, and the final
    LayerNorm with the output head are one group each (unsharded together, just in time, then freed), the root
    holds what is left. The output head stays unsharded from its forward to its backward, which follows at once:
    one all-gather of the largest group a step fewer, as torchtitan does (a forward without a backward must then
    reshard it: `reshard`).
    Frozen and trainable parameters may share a group: FSDP2 follows each parameter's requires_grad at every step
    and reduces only the gradients that exist. bf16 runs compute in bf16 and reduce gradients in fp32; the sharded
    master weights and the optimizer state stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if model.tied:
        raise UserError("parallelism='fsdp' needs untied input and output embeddings (as every Pythia model has)")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bfloat16" \
        else MixedPrecisionPolicy()
    for block in model.blocks():
        fully_shard(block, mp_policy=mp)
    fully_shard(model.input_embeddings(), mp_policy=mp)
    fully_shard([model.final_norm(), model.output_embeddings()], mp_policy=mp, reshard_after_forward=False)
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


def broadcast_object(obj):
    """Rank 0's value of a small picklable object, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_sharded_checkpoint(path, model, optimizer, training):
    """torch.distributed.checkpoint: every rank writes its own shards of the model and the optimizer, rank 0 adds
    the training state (train_state.pt: step, position, config, rng, ...). All of it goes into path/step-N, built
    under a temporary name, and only then does path/latest (replaced atomically) name it; older steps go after that.
    So a kill at any moment leaves `latest` naming a complete checkpoint, the previous one while a write is under
    way; what a killed write left (.tmp-*) is removed by the next save."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    distributed = dist.is_initialized()
    master = not distributed or dist.get_rank() == 0
    name = f"step-{training['step']:08d}"
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with (atomic_dir(os.path.join(path, name)) if master else nullcontext()) as tmp:
        tmp = broadcast_object(tmp) if distributed else tmp
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
        if master:
            with open(os.path.join(tmp, "train_state.pt"), "wb") as f:
                torch.save(training, f)
                f.flush()
                os.fsync(f.fileno())
    if master:
        with atomic_path(os.path.join(path, "latest")) as tmp, open(tmp, "w") as f:
            f.write(name + "\n")
        for old in os.listdir(path):
            if old not in (name, "latest"):
                shutil.rmtree(os.path.join(path, old), ignore_errors=True)


def latest_sharded(path):
    """The directory of the newest complete sharded checkpoint under `path`, or None."""
    try:
        with open(os.path.join(path, "latest")) as f:
            latest = os.path.join(path, f.read().strip())
    except OSError:
        return None
    return latest if os.path.isfile(os.path.join(latest, "train_state.pt")) else None


def load_sharded_checkpoint(latest, model, optimizer):
    """Model and optimizer from a sharded checkpoint directory, on any number of processes (DCP reshards). The
    optimizer must have exactly the trainable parameters it had when saved (set_trainable with the saved phase): only
    those have state in the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=latest)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


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


# -----------------------------------------------------------------------------
# checks and the export


def peak_flops(device_name, dtype):
    """The card's dense peak for the run's dtype (PEAK_FLOPS); 0.0 for a card not listed (no MFU then)."""
    bf16, tf32 = next((v for k, v in PEAK_FLOPS.items() if k in device_name), (0.0, 0.0))
    return tf32 if dtype == "float32" else bf16


def check_ids(batch, path, rows):
    """An id beyond the embedding rows would end the run mid-way in an index error (a device assert on a GPU); the
    max of a batch on the host costs next to nothing, a scan of a multi-GB file at the start would not."""
    top = max(int(batch[0].max()), int(batch[1].max()))
    if top >= rows:
        raise UserError(f"{path}: token id {top}, but the model has {rows} embedding rows (tokenized with another "
                        "tokenizer, or a corrupt file)")
    return batch


def check_export_tokenizer(path, where):
    """The export at the end copies this tokenizer: it must load now, not after hours of training."""
    try:
        load_tokenizer(path)
    except UserError as e:
        raise UserError(f"{where}: {e}; the hf/ export at the end needs it (export_hf=False trains without it)") \
            from None


def export_hf(raw_model, tokenizer_dir, hf_dir):
    """out_dir/hf (config, safetensors, tokenizer files) built under a temp name and renamed when complete, so it is
    never a model without its tokenizer; a previous export goes only then."""
    with atomic_dir(hf_dir) as tmp:
        raw_model.save_pretrained(tmp)
        if tokenizer_dir:
            save_tokenizer(tokenizer_dir, tmp)


def finished(summary_path, step):
    """summary.json is written last, after the export: a run whose summary has reached `step` is complete."""
    try:
        with open(summary_path, encoding="utf-8") as f:
            return json.load(f)["steps"] == step
    except (OSError, ValueError, KeyError, TypeError):
        return False


# -----------------------------------------------------------------------------
# the run's state and where it runs


@dataclass
class TrainState:
    """Everything a resumed run continues from besides the weights, the optimizer and the scaler. ckpt.pt holds its
    fields as top-level keys (the layout checkpoints have always had), so it is saved and restored whole."""
    step: int = 0
    tokens: int = 0
    pos: int = 0  # the next block of train.bin, counted over all ranks
    best_val_loss: float = math.inf
    val_loss: float = None  # the latest evaluation: at a finished run's last step, its final one
    nonfinite_steps: int = 0
    phase_stats: dict = field(default_factory=dict)  # per phase, so that summary.json covers the whole run

    @classmethod
    def from_checkpoint(cls, checkpoint):
        return cls(**{f.name: checkpoint[f.name] for f in fields(cls) if f.name in checkpoint})


@dataclass
class Runtime:
    """Where this process runs: its rank among world_size (DDP under torchrun), its device and the precision."""
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str
    dtype: str  # float32 | bfloat16 | float16 ('auto' resolved)
    autocast: object

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):
        return "cuda" if self.device.startswith("cuda") else "cpu"


def setup_processes(cfg):
    """The process group (under torchrun), the device, the precision and the seed."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
        local_rank = int(os.environ["LOCAL_RANK"])
        if device_type == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=cfg.ddp_timeout_s),
                                device_id=torch.device(device) if device_type == "cuda" else None)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    check_accumulation(cfg, world_size, rank == 0)
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float16" and cfg.parallelism == "fsdp":  # its gradients would need a sharded GradScaler
        raise UserError("parallelism='fsdp' trains in bfloat16 or float32, not float16 (set dtype=bfloat16)")
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=torch_dtype(dtype))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed + rank)
    return Runtime(ddp, rank, local_rank, world_size, device, dtype, autocast)


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


def all_mean(value, rt):
    if not rt.ddp:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.item() / rt.world_size


# -----------------------------------------------------------------------------
# the model and its checkpoint


def load_config(argv, defaults):
    """The run's TrainConfig and, for init_from='resume', the checkpoint it continues from (else None). A resumed
    run keeps its saved settings; only what the command line gives again (argv) overrides them."""
    cfg = parse_config(argv, defaults)
    checkpoint = None
    check_out_dir(cfg)
    if cfg.init_from == "resume":
        checkpoint = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
        saved = TrainConfig(**checkpoint["config"])
        cfg = parse_config(argv, {**asdict(saved), "init_from": "resume"})
        check_resume_config(saved, cfg)
    check_config(cfg)
    if cfg.init_from != "resume":
        claim_out_dir(cfg)
    return cfg, checkpoint


RUN_FILES = ("ckpt.pt", "metrics.jsonl", "summary.json", "hf")  # and anything named ckpt* (checkpoint directories)
REPLACED = ".replaced-run-"  # a run that override=True moved aside, deleted at the new run's first checkpoint


def run_files(out_dir):
    """What in out_dir shows that a run is there."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(f for f in os.listdir(out_dir) if f in RUN_FILES or f.startswith("ckpt"))


def check_out_dir(cfg):
    """out_dir must be a directory this process can write, found out before the model and the data load (not at the
    first checkpoint, an hour in)."""
    out = cfg.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"out_dir={out!r} is a file, expected a directory (or a path to create one at)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"out_dir={out!r}: cannot create it ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"out_dir={out!r}: not writable")


def claim_out_dir(cfg):
    """A fresh run never overwrites a run by accident: without override=True it stops here if out_dir holds one;
    with it, rank 0 moves the old run's files aside (into out_dir/.replaced-run-*), deleted only once the new run
    has its first checkpoint."""
    found = run_files(cfg.out_dir)
    if not found:
        return
    if not cfg.override:
        raise UserError(f"out_dir={cfg.out_dir!r} holds a run ({', '.join(found)}): continue it with "
                        "--init_from=resume, choose another out_dir, or pass --override=True to replace it")
    if os.environ.get("RANK", "0") != "0":
        return
    aside = tempfile.mkdtemp(dir=cfg.out_dir, prefix=REPLACED)
    for f in found:
        os.replace(os.path.join(cfg.out_dir, f), os.path.join(aside, f))
    print(f"override=True: the run in {cfg.out_dir} moved to {aside} until this run's first checkpoint")


def drop_replaced_runs(out_dir):
    """The run that override=True replaced, now that the new one has a checkpoint."""
    for f in os.listdir(out_dir):
        if f.startswith(REPLACED):
            shutil.rmtree(os.path.join(out_dir, f), ignore_errors=True)


# keys a resumed run may change: its length, evaluation, logging and where and how fast it runs. Every other key
# gives the saved state (data position, phases, optimizer, schedule) its meaning.
RESUME_CHANGEABLE = ("out_dir", "init_from", "init_revision", "override", "max_iters", "max_tokens", "epochs",
                     "eval_interval", "eval_iters", "eval_at_start", "eval_only", "export_hf", "wandb_log",
                     "wandb_project", "wandb_run_name", "device", "dtype", "compile", "backend", "ddp_timeout_s",
                     "device_peak_flops", "max_nonfinite_steps", "parallelism", "activation_checkpointing")


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


def check_resume_data(cfg, checkpoint, meta, ckpt_path):
    """A resumed run reads data made with its model's tokenizer, as a fresh run must (a tokenizer_dir that is
    gone is build_model's error)."""
    tokenizer_dir = checkpoint["tokenizer_dir"]
    file = tokenizer_file(tokenizer_dir)
    if file and os.path.isfile(file):
        check_tokenizer(meta, tokenizer_dir, f"{ckpt_path} (tokenizer {tokenizer_dir})",
                        cfg.data_dir)


def check_resume_plan(phases, state, cfg):
    """A new length re-plans the phases: the embedding phase must still end where the saved run's did (or, if the
    run is still in it, not before its current step), else steps already taken would change phase."""
    if not state.phase_stats:  # a checkpoint older than the per-phase statistics: nothing to check against
        return
    emb_end = sum(p.steps for p in phases if p.name == "embedding")
    emb_done = state.phase_stats.get("embedding", {}).get("steps", 0)
    if emb_done < state.step and emb_end != emb_done or emb_done == state.step and emb_end < state.step:
        raise UserError(f"init_from=resume: with max_iters={cfg.max_iters}, max_tokens={cfg.max_tokens}, "
                        f"epochs={cfg.epochs:g} the embedding phase would be steps 0..{emb_end - 1}, but the saved "
                        f"run at step {state.step} has taken {emb_done} embedding steps; choose a length that keeps "
                        "the phase boundary (or start a fresh run)")


def load_checkpoint(ckpt_path):
    """ckpt.pt, or, when the sharded checkpoint beside it (out_dir/ckpt, an FSDP run's) is newer (a run may have
    changed its parallelism), that one's training state with its directory under 'sharded': its model and optimizer
    are read later, into the built model (restore_training)."""
    sharded_path = os.path.join(os.path.dirname(ckpt_path), "ckpt")
    sharded = latest_sharded(sharded_path)
    if sharded and (not os.path.isfile(ckpt_path) or os.path.getmtime(os.path.join(sharded, "train_state.pt"))
                    >= os.path.getmtime(ckpt_path)):
        ckpt_path = os.path.join(sharded, "train_state.pt")
    elif os.path.isfile(ckpt_path):
        sharded = None
    else:
        raise UserError(f"init_from='resume': no checkpoint at {ckpt_path} or {sharded_path}")
    try:  # memory-mapped: the processes share one copy of the file in the page cache
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{ckpt_path}: cannot read the checkpoint ({str(e).splitlines()[0]})") from None
    return {**checkpoint, "sharded": sharded}


def build_model(cfg, meta, checkpoint, ckpt_path, rt):
    """The raw model on the device (float32; sharded under FSDP) from the checkpoint, from scratch or from init_from,
    checked against the data; with the tokenizer directory the hf/ export copies and a name for the messages. Every
    process builds it on the meta device and allocates its own part (empty_model); rank 0 alone reads the weights
    and broadcasts them (load_weights), so host memory holds one copy of the model file, not one per process."""
    if checkpoint is not None:
        model_config = config_from_dict(checkpoint["model_config"])
        tokenizer_dir = checkpoint["tokenizer_dir"]
        if tokenizer_dir and cfg.export_hf:
            check_export_tokenizer(tokenizer_dir, f"{ckpt_path}: tokenizer_dir")
        model_source = f"{checkpoint['sharded'] or ckpt_path} (from {checkpoint['config']['init_from']})"
    elif cfg.init_from == "scratch":
        tokenizer_file = meta.get("tokenizer_file")  # relative to the data directory, or absolute
        tokenizer_dir = os.path.join(cfg.data_dir, tokenizer_file) if tokenizer_file else ""
        if tokenizer_dir and cfg.export_hf:
            check_export_tokenizer(tokenizer_dir, f"{os.path.join(cfg.data_dir, 'meta.json')}: tokenizer_file")
        if tokenizer_dir and os.path.exists(tokenizer_dir):  # as a resumed run checks it
            check_tokenizer(meta, tokenizer_dir, f"from scratch (tokenizer {tokenizer_dir})", cfg.data_dir)
        vocab_size = cfg.vocab_size or round_up(meta["vocab_size"])
        model_config = GPTNeoXConfig(vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                 intermediate_size=cfg.intermediate_size or 4 * cfg.n_embd, rotary_pct=cfg.rotary_pct,
                                 block_size=cfg.block_size, bos_token_id=meta["eos_token_id"],
                                 eos_token_id=meta["eos_token_id"])
        model_source = "scratch"
    else:
        tokenizer_dir = resolve_model_dir(cfg.init_from, cfg.init_revision or None)
        config_file = os.path.join(tokenizer_dir, "config.json")
        if not os.path.isfile(config_file):
            raise UserError(f"{tokenizer_dir}: no config.json (expected a Hugging Face model directory)")
        model_config = config_from_hf(read_json(config_file), source=config_file)
        model_source = cfg.init_from
        if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
            raise UserError(f"{cfg.init_from}: no tokenizer.json beside the model; the trainer checks that the data "
                            "was tokenized with the model's tokenizer")
        check_tokenizer(meta, tokenizer_dir, model_source, cfg.data_dir)
    if meta["vocab_size"] > model_config.vocab_size:
        raise UserError(f"{cfg.data_dir}: vocabulary of {meta['vocab_size']} tokens, but the model "
                        f"{model_source} has only {model_config.vocab_size} embedding rows")
    if cfg.block_size > model_config.block_size:
        raise UserError(f"block_size={cfg.block_size} exceeds the model's max_position_embeddings "
                        f"{model_config.block_size}")
    raw_model = empty_model(model_config, cfg, rt)
    load_weights(raw_model, initial_weights(model_config, cfg, checkpoint, tokenizer_dir) if rt.master else None, rt)
    if rt.ddp and cfg.parallelism == "fsdp":
        # FSDP2 fixes each group's gradient dtypes (bf16 grads reduced in fp32 into fp32 params) at its first forward,
        # from the parameters that require grad then: a block frozen at that moment (the embedding phase) would hand
        # bf16 gradients to its fp32 parameters after the switch. So the first forward runs now, nothing frozen yet.
        with torch.no_grad():
            raw_model(torch.zeros((1, 1), dtype=torch.long, device=rt.device))
        reshard(raw_model)
    return raw_model, tokenizer_dir, model_source


def empty_model(model_config, cfg, rt):
    """The model built on the meta device (no memory), with activation checkpointing and, under FSDP, sharded, then
    allocated on the device (uninitialised: load_weights fills it)."""
    with torch.device("meta"):
        model = model_from_config(model_config)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if rt.ddp and cfg.parallelism == "fsdp":
        apply_fsdp(model, rt.dtype)
    model.to_empty(device=rt.device)
    model.tie_weights()  # to_empty allocates a shared tensor twice
    return model


def initial_weights(model_config, cfg, checkpoint, tokenizer_dir):
    """Rank 0's full state dict: the checkpoint's (None for a sharded one: its weights come with the optimizer, in
    restore_training), a random init (rank 0's seed), or init_from's."""
    if checkpoint is not None:
        return checkpoint.get("model")
    if cfg.init_from == "scratch":
        return model_from_config(model_config).state_dict()
    return CausalLM.from_pretrained(tokenizer_dir).state_dict()


def load_weights(model, state, rt):
    """Rank 0's full state dict (None elsewhere) into the model on every rank: broadcast into each rank's shards or
    replica. A None on rank 0 (a sharded checkpoint) loads nothing."""
    if not rt.ddp:
        if state is not None:
            model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if broadcast_object(state is not None):  # whether weights come: every rank joins the broadcast, or none
        set_model_state_dict(model, state or {}, options=StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=True))


def restore_training(checkpoint, raw_model, optimizer, scaler, phases, cfg, rt):
    """The optimizer and scaler state (loaded with the parameters trainable as they were when saved) and the rng; from
    a sharded checkpoint the model's weights too."""
    phase = phase_at(phases, checkpoint["step"])
    if checkpoint["sharded"]:  # the optimizer covers the parameters that were trainable when it was saved
        set_trainable(raw_model, next((p for p in phases if p.name == checkpoint["phase"]), phase), cfg)
        load_sharded_checkpoint(checkpoint["sharded"], raw_model, optimizer)
    elif rt.ddp and cfg.parallelism == "fsdp":  # its optimizer state is whole tensors, not shards
        raise UserError(f"{cfg.out_dir}/ckpt.pt was written by a DDP run: resume it with parallelism=ddp")
    else:
        set_trainable(raw_model, phase, cfg)
        optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    if rt.master:  # the other ranks keep their seed + rank streams (nothing in training draws from them)
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if rt.device_type == "cuda" and checkpoint["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])


def checkpoint_path(cfg):
    """Where this run's checkpoints go: ckpt.pt, or under FSDP the sharded checkpoint directory."""
    return os.path.join(cfg.out_dir, "ckpt" if cfg.parallelism == "fsdp" else "ckpt.pt")


def save_checkpoint(ckpt_path, raw_model, optimizer, scaler, cfg, tokenizer_dir, phase, state, rt):
    """ckpt.pt, written atomically and fsynced by rank 0 (under FSDP the sharded checkpoint, every rank writing its
    shards: save_sharded_checkpoint); every rank waits for it."""
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if rt.device_type == "cuda" else None}
    checkpoint = {"scaler": scaler.state_dict(), "model_config": asdict(raw_model.config),
                  "tokenizer_dir": tokenizer_dir, "config": asdict(cfg), "phase": phase.name, **asdict(state),
                  "rng": rng}
    if cfg.parallelism == "fsdp":
        from torch.distributed.checkpoint.api import CheckpointException  # DCP's error, raised on every rank

        try:
            save_sharded_checkpoint(ckpt_path, raw_model, optimizer, checkpoint)
        except (OSError, RuntimeError, CheckpointException) as e:
            raise checkpoint_write_error(ckpt_path, e) from None
    elif rt.master:
        checkpoint.update(model=raw_model.state_dict(), optimizer=optimizer.state_dict())
        try:
            with atomic_path(ckpt_path) as tmp:
                with open(tmp, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:  # a full disk: OSError, or torch's writer's RuntimeError after it
            raise checkpoint_write_error(ckpt_path, e) from None
    if rt.ddp:
        dist.barrier()


def checkpoint_write_error(ckpt_path, e):
    """One line for a checkpoint that could not be written (its temp file is gone; the previous one is whole)."""
    while e.__context__ is not None and not isinstance(e, OSError):  # the cause under torch's RuntimeError
        e = e.__context__
    cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
    kept = os.path.isfile(ckpt_path) or latest_sharded(ckpt_path)
    kept = "the previous checkpoint is kept" if kept else "there is no earlier checkpoint"
    return UserError(f"{ckpt_path}: cannot write the checkpoint ({cause}); {kept}")


# -----------------------------------------------------------------------------
# one optimizer step, the evaluation, the metrics log


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


def agreed_batches(reader, state, phase, rt):
    """reader.next, and the error of a bad batch (an id beyond the vocabulary) instead of raising it; under DDP
    every rank learns that some rank had one, so that all of them can checkpoint together and stop."""
    try:
        batches, bad = reader.next(state, phase), None
    except UserError as e:
        batches, bad = None, e
    if rt.ddp:
        flag = torch.tensor([float(bad is not None)], device=rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and bad is None:
            bad = UserError(f"another rank read a bad batch at step {state.step + 1} (its error is above)")
    return batches, bad


def stop_at_bad_batch(bad, state, progressed, ckpt_path, save):
    """A fatal data error mid-run: the last good step is checkpointed (when this process took steps) before the run
    stops with the error, so no progress is lost."""
    if progressed:
        save()
        raise UserError(f"{bad}; stopped before step {state.step + 1}: the checkpoint {ckpt_path} holds step "
                        f"{state.step} (init_from=resume continues once the data is fixed)")
    raise bad


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
        except UserError:  # a bad batch: read again, and reported, at its own step (agreed_batches)
            self.ahead = None


def train_step(model, raw_model, optimizer, scaler, batches, lr, cfg, rt, verify_grads=False, read_ahead=None):
    """One optimizer step at learning rate lr: forward and backward over the micro-batches, gradient clipping, the
    update. Returns the loss (mean over the ranks). A non-finite loss skips the update (the gradients are dropped);
    counting it is the caller's. verify_grads (the first step after a phase switch): every trainable parameter got a
    gradient, and the ranks agree after the update. read_ahead, if given, runs while the device computes."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = forward_backward(model, batches, rt.autocast, scaler, isinstance(model, DDP), rt.device)
    if read_ahead is not None:
        read_ahead()
    loss = all_mean(loss.item(), rt)
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
    else:
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.grad is not None], cfg.grad_clip)
        if verify_grads:
            missing = [n for n, p in raw_model.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, f"no gradients after the phase switch for {missing[:3]}"
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if verify_grads and isinstance(model, DDP):
            assert ranks_identical(raw_model), "ranks diverged after the phase switch"
    if rt.device_type == "cuda":
        torch.cuda.synchronize(rt.device)
    return loss


def count_nonfinite(state, loss, cfg, rt, ckpt_path):
    """A skipped step counts, evaluates and checkpoints like any other; more than max_nonfinite_steps end the run."""
    state.nonfinite_steps += 1
    if state.nonfinite_steps > cfg.max_nonfinite_steps:
        raise UserError(f"non-finite training loss ({loss}) at step {state.step + 1}; the last good "
                        f"checkpoint is {ckpt_path}" + ("" if os.path.exists(ckpt_path) else " (none yet)")
                        + "; lower the learning rate or set max_nonfinite_steps to skip such steps")
    if rt.master:
        from tqdm import tqdm

        tqdm.write(f"step {state.step + 1}: non-finite loss, step skipped "
                   f"({state.nonfinite_steps}/{cfg.max_nonfinite_steps})")


def step_record(state, phase, lr, loss, dt, tok_s, peak, raw_model, cfg, rt):
    """The metrics.jsonl line of a training step (a skipped step's loss is null)."""
    record = {"step": state.step, "phase": phase.name, "tokens": state.tokens, "lr": lr, "loss": loss, "dt_s": dt,
              "tokens_per_s": tok_s}
    if not math.isfinite(loss):
        record.update(loss=None, skipped=True)
    if peak:
        record["mfu"] = raw_model.flops_per_token(cfg.block_size) * tok_s / rt.world_size / peak
    if rt.device_type == "cuda":
        record["peak_mem_mb"] = torch.cuda.max_memory_allocated(rt.device) / 2**20
    return record


def record_phase_stats(phase_stats, phase, step_tokens, dt, first_step, record):
    stats = phase_stats.setdefault(phase.name, {"steps": 0, "tokens": 0, "seconds": 0.0, "first_steps": 0,
                                                "first_steps_seconds": 0.0})
    stats["steps"] += 1
    stats["tokens"] += step_tokens
    stats["seconds"] += dt
    if first_step:  # reported apart, and left out of the phase's tokens/s
        stats["first_steps"] += 1
        stats["first_steps_seconds"] += dt
    if "peak_mem_mb" in record:
        stats["peak_mem_mb"] = record["peak_mem_mb"]


def eval_blocks(cfg, val_data):
    """The blocks a periodic evaluation scores: the same whatever the process count (they split them), so the
    validation curves of runs on 1 and N processes compare."""
    return min(val_data.n_blocks, cfg.eval_iters * cfg.batch_size)


def drop_reducer(model):
    """A DDP wrapper that is done with drops its Reducer now, while the process group is alive. Freed after
    destroy_process_group (at the end of run, at exit), the Reducer would be the group's last owner and destroy the
    gloo group holding the GIL: a deadlock with gloo's worker thread, which waits for the GIL to free a finished
    all-reduce (seen: a finished run's rank 1 hanging for ever after summary.json was written)."""
    if isinstance(model, DDP):
        model.reducer = None


def leave_process_group(rt, model=None):
    """The end of a distributed run: the wrapper's Reducer, then the process group."""
    if rt.ddp:
        drop_reducer(model)
        dist.destroy_process_group()


def unwrapped(model, rt):
    return model.module if isinstance(model, DDP) else model  # no DDP collectives during evaluation (FSDP needs its
    # own: every rank evaluates)


@torch.no_grad()
def evaluate(model, val_data, n, vocab_size, cfg, rt):
    """Mean validation loss over the first n blocks (the same every time; all of them for the final pass), on all
    ranks, token-weighted and summed across them. `model` is not DDP-wrapped."""
    model.eval()
    B = cfg.batch_size
    nll = torch.zeros(2, dtype=torch.float64, device=rt.device)
    for start in range(0, n, B * rt.world_size):
        x, y = check_ids(val_data.batch(start, B), val_data.path, vocab_size)
        keep = (start + rt.rank * B + torch.arange(B) < n).to(rt.device)  # the last global batch may be partial
        x, y = x.to(rt.device), y.to(rt.device)
        with rt.autocast:
            logits, _ = model(x)
        loss = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").sum(1)
        nll[0] += loss[keep].sum()
        nll[1] += keep.sum() * cfg.block_size
    if rt.ddp:
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


def should_stop(stop, rt):
    """A stop request on any rank stops all of them together, after the same step."""
    flag = float(bool(stop.received))
    if rt.ddp:
        t = torch.tensor([flag], device=rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = t.item()
    return flag > 0


# -----------------------------------------------------------------------------
# the run: signals, set-up, the loop, the end


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
    try:
        with signals_handled() as stop:
            try:
                run(sys.argv[1:] if argv is None else argv, defaults, stop)
            except RuntimeError as e:  # a dead or hung peer: say so in one line instead of a collective's traceback
                peer_failure = isinstance(e, dist.DistError) or any(k in str(e) for k in ("gloo", "NCCL", "Timed out"))
                if not dist.is_initialized() or not peer_failure or os.environ.get("DEBUG"):
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
    except Stop as e:
        print(f"stopped by {signal.Signals(e.args[0]).name} outside a training step (or a second time): exiting now; "
              "a checkpoint already written is complete", file=sys.stderr)
        sys.exit(128 + e.args[0])


def close_progress_bars():
    """A run that ends early leaves its progress bar open: closed, the error starts a line of its own."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(tqdm._instances):
            bar.close()


def run(argv, defaults, stop):
    cfg, checkpoint = load_config(argv, defaults)
    rt = setup_processes(cfg)
    ckpt_path = checkpoint_path(cfg)
    state = TrainState.from_checkpoint(checkpoint) if checkpoint else TrainState()

    # ---- data and the plan (a finished run stops here)
    meta = load_meta(cfg.data_dir)
    if checkpoint:
        check_resume_data(cfg, checkpoint, meta, ckpt_path)
    train_data = Blocks(os.path.join(cfg.data_dir, "train.bin"), meta["dtype"], cfg.block_size, cfg.seed, rt.rank,
                        rt.world_size)
    val_data = Blocks(os.path.join(cfg.data_dir, "val.bin"), meta["dtype"], cfg.block_size, None, rt.rank,
                      rt.world_size)
    phases = plan_phases(cfg, train_data.n_blocks, rt.world_size)
    total_steps = phases[-1].start + phases[-1].steps
    if checkpoint:
        check_resume_plan(phases, state, cfg)
    if checkpoint and state.step >= total_steps and not cfg.eval_only and \
            finished(os.path.join(cfg.out_dir, "summary.json"), state.step):
        if rt.master:
            print(f"nothing to do: {cfg.out_dir} finished at step {state.step} (raise max_iters, max_tokens or epochs "
                  "to train on)")
        leave_process_group(rt)
        return

    # ---- the model, its optimizer and the output directory
    raw_model, tokenizer_dir, model_source = build_model(cfg, meta, checkpoint, ckpt_path, rt)
    optimizer = configure_optimizer(raw_model, cfg, rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "float16")
    phase = phase_at(phases, state.step)
    if checkpoint:
        restore_training(checkpoint, raw_model, optimizer, scaler, phases, cfg, rt)
    del checkpoint
    set_trainable(raw_model, phase, cfg)
    model = wrap(raw_model, cfg, rt.ddp, rt.local_rank, rt.device_type)
    if rt.master:
        start_out_dir(cfg, rt, raw_model, model_source, phases, train_data.n_blocks)
    metrics = MetricsLog(cfg, rt.master, resume_step=state.step if cfg.init_from == "resume" else None)

    if cfg.eval_only or (cfg.eval_at_start and cfg.init_from != "resume"):
        n = val_data.n_blocks if cfg.eval_only else eval_blocks(cfg, val_data)
        val = evaluate(unwrapped(model, rt), val_data, n, raw_model.config.vocab_size, cfg, rt)
        metrics.log({"step": state.step, "phase": phase.name, "tokens": state.tokens, "val_loss": val,
                     "val_ppl": exp(val)})
        if rt.master:
            print(f"step {state.step}: val loss {val:.4f}, ppl {exp(val):.6g}")
        if cfg.eval_only:
            leave_process_group(rt, model)
            return

    model = train_loop(model, raw_model, optimizer, scaler, phases, train_data, val_data, state, metrics, stop, cfg,
                       rt, ckpt_path, tokenizer_dir)
    finish(model, raw_model, optimizer, val_data, state, phases[-1], metrics, cfg, rt, tokenizer_dir)


def start_out_dir(cfg, rt, raw_model, model_source, phases, n_blocks):
    """out_dir without the temp files of a write that was killed, its config.json, and the plan on stdout."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    for f in os.listdir(cfg.out_dir):
        if f.startswith(".tmp-"):
            tmp = os.path.join(cfg.out_dir, f)
            shutil.rmtree(tmp) if os.path.isdir(tmp) else os.remove(tmp)
    write_json(os.path.join(cfg.out_dir, "config.json"), asdict(cfg))
    print(f"{model_source}: {raw_model.num_params(non_embedding=False) / 1e6:.1f}M parameters, "
          f"{rt.world_size} process(es) on {rt.device}, {rt.dtype}; {n_blocks} train blocks of {cfg.block_size}")
    for p in phases:
        print(f"  {p.name} phase: steps {p.start}..{p.start + p.steps - 1}, batch {p.batch_size} x accum "
              f"{p.grad_accum} x {cfg.block_size} tokens, peak lr {p.peak_lr:g}, warmup {p.warmup}, {p.schedule}")


def train_loop(model, raw_model, optimizer, scaler, phases, train_data, val_data, state, metrics, stop, cfg, rt,
               ckpt_path, tokenizer_dir):
    """The optimizer steps from state.step to the end of the last phase: the switch exactly at a phase boundary, an
    evaluation and a checkpoint every eval_interval steps, a stop request honoured at the next step boundary (with a
    checkpoint). Returns the model (rebuilt at a switch)."""
    from tqdm import tqdm

    total_steps = phases[-1].start + phases[-1].steps
    vocab_size = raw_model.config.vocab_size
    reader = StepBatches(train_data, rt, vocab_size)
    peak = cfg.device_peak_flops or (peak_flops(torch.cuda.get_device_name(rt.device), rt.dtype)
                                     if rt.device_type == "cuda" else 0.0)
    bar = tqdm(total=total_steps, initial=state.step, disable=not rt.master, dynamic_ncols=True, unit="step",
               mininterval=1.0)
    phase = phase_at(phases, state.step)
    verify_grads = False
    first_step = True  # the first step after the model was (re)built: compile, allocator warm-up
    start_step = state.step
    stop.deferred = True  # from here a signal stops the run at the next step boundary, with a checkpoint
    while state.step < total_steps:
        if state.step >= phase.start + phase.steps:  # the switch, exactly at the boundary
            phase = phase_at(phases, state.step)
            set_trainable(raw_model, phase, cfg)
            drop_reducer(model)  # run still holds the first wrapper
            model = wrap(raw_model, cfg, rt.ddp, rt.local_rank, rt.device_type)
            verify_grads = first_step = True
            if rt.device_type == "cuda":
                torch.cuda.reset_peak_memory_stats(rt.device)
        lr = phase.lr(state.step, cfg.min_lr)
        t0 = time.time()
        batches, bad = agreed_batches(reader, state, phase, rt)
        if bad:
            stop_at_bad_batch(bad, state, state.step > start_step, ckpt_path,
                              lambda: save_checkpoint(ckpt_path, raw_model, optimizer, scaler, cfg, tokenizer_dir,
                                                      phase, state, rt))
        ahead = None  # on a GPU the next step's rows are read while this one computes
        if rt.device_type == "cuda" and state.step + 1 < total_steps:
            ahead = functools.partial(reader.read_ahead, state.pos, phase_at(phases, state.step + 1))
        loss = train_step(model, raw_model, optimizer, scaler, batches, lr, cfg, rt, verify_grads, ahead)
        if not math.isfinite(loss):  # only the update is skipped: the step counts, evaluates, checkpoints
            count_nonfinite(state, loss, cfg, rt, ckpt_path)
        else:
            verify_grads = False
        dt = time.time() - t0
        step_tokens = phase.batch_size * phase.grad_accum * cfg.block_size
        state.step += 1
        state.tokens += step_tokens
        tok_s = step_tokens / dt
        record = step_record(state, phase, lr, loss, dt, tok_s, peak, raw_model, cfg, rt)
        record_phase_stats(state.phase_stats, phase, step_tokens, dt, first_step, record)
        first_step = False
        evaluating = state.step % cfg.eval_interval == 0 or state.step == total_steps
        if evaluating:
            state.val_loss = evaluate(unwrapped(model, rt), val_data, eval_blocks(cfg, val_data), vocab_size, cfg, rt)
            state.best_val_loss = min(state.best_val_loss, state.val_loss)
            record.update(val_loss=state.val_loss, val_ppl=exp(state.val_loss))
            if rt.master:
                tqdm.write(f"step {state.step} ({phase.name}): train loss {loss:.4f}, val loss {state.val_loss:.4f}, "
                           f"ppl {exp(state.val_loss):.6g}")
        metrics.log(record)
        bar.update(1)
        bar.set_postfix(phase=phase.name, loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
        if evaluating:
            save_checkpoint(ckpt_path, raw_model, optimizer, scaler, cfg, tokenizer_dir, phase, state, rt)
            if rt.master:
                drop_replaced_runs(cfg.out_dir)
        if should_stop(stop, rt):
            if not evaluating:
                save_checkpoint(ckpt_path, raw_model, optimizer, scaler, cfg, tokenizer_dir, phase, state, rt)
                if rt.master:
                    drop_replaced_runs(cfg.out_dir)
            bar.close()
            exit_stopped(stop, state.step, ckpt_path, rt, model)
    bar.close()
    stop.deferred = False  # the end: a signal stops the run at once (the last step's checkpoint is complete)
    if stop.received:
        raise Stop(stop.received[0])
    return model


def exit_stopped(stop, step, ckpt_path, rt, model):
    signum = stop.received[0] if stop.received else signal.SIGTERM
    if rt.master:
        print(f"stopped by {signal.Signals(signum).name} at step {step}: checkpoint {ckpt_path}; continue "
              f"with init_from=resume", file=sys.stderr)
    leave_process_group(rt, model)
    sys.exit(128 + signum)


def finish(model, raw_model, optimizer, val_data, state, phase, metrics, cfg, rt, tokenizer_dir):
    """The whole validation set, the HF export, then summary.json (written last: the run is complete)."""
    eval_model = unwrapped(model, rt)
    if state.val_loss is not None and eval_blocks(cfg, val_data) == val_data.n_blocks:
        full = state.val_loss
    else:
        full = evaluate(eval_model, val_data, val_data.n_blocks, raw_model.config.vocab_size, cfg, rt)
    metrics.log({"step": state.step, "phase": phase.name, "tokens": state.tokens, "val_full_loss": full,
                 "val_full_ppl": exp(full)})
    fsdp = rt.ddp and cfg.parallelism == "fsdp"
    identical = ranks_identical(raw_model) if rt.ddp and not fsdp else None
    export_model = full_model_on_rank0(raw_model) if fsdp and cfg.export_hf else raw_model  # every rank gathers
    memory = {"rank0_param_bytes": local_bytes(raw_model.parameters()),  # measured, not assumed
              "rank0_optimizer_state_bytes": optimizer_state_bytes(optimizer)}
    if rt.master:
        print(f"step {state.step}: whole validation set loss {full:.4f}, ppl {exp(full):.6g}")
        assert identical is not False, "DDP ranks ended with different weights"
        if cfg.export_hf:
            hf_dir = os.path.join(cfg.out_dir, "hf")
            export_hf(export_model, tokenizer_dir, hf_dir)
            print(f"exported {hf_dir}")
        for s in state.phase_stats.values():  # tokens/s of the steps after each phase's first (compile) step
            timed, seconds = s["steps"] - s["first_steps"], s["seconds"] - s["first_steps_seconds"]
            s["tokens_per_s"] = s["tokens"] / s["steps"] * timed / seconds if timed and seconds > 0 else None
        summary = {"steps": state.step, "tokens": state.tokens, "best_val_loss": state.best_val_loss,
                   "final_val_loss": state.val_loss, "final_val_full_loss": full, "phases": state.phase_stats,
                   "world_size": rt.world_size, "ddp_ranks_identical": identical,
                   "parallelism": cfg.parallelism if rt.ddp else None, **memory,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    leave_process_group(rt, model)


if __name__ == "__main__":
    run_cli(main)
