"""FSDP2 (parallelism='fsdp') against DDP on CPU (gloo, 2 processes under torchrun, fp32 so runs compare exactly):
the same losses and weights across the phase switch, a frozen body that stays bit-identical, sharded checkpoints
that survive kill -9 (also mid-write) and resume on another number of processes, the hf/ export, the memory each
rank holds; activation checkpointing gives the gradients of the plain model."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, metrics, train_args, weights
from safetensors.torch import load_file

import train
from checkpoint import latest_sharded
from model import GPTNeoX, GPTNeoXConfig

# a run of train.py under torchrun with optional faults: DIE_IN_SAVE=n kills rank 0 (kill -9) after the n-th sharded
# checkpoint's shards are written but before it is committed; DIE_AT_POS=p kills rank 1 when it reads the training
# batch at global position p (in the middle of a step). torch.compile runs dynamo with the aot_eager backend: graph
# capture and guards under FSDP hooks are what is under test, not inductor's code generation
LAUNCHER = f"""
import functools, os, signal, sys
sys.path.insert(0, {ROOT!r})
import torch
import torch.distributed.checkpoint as dcp
torch.compile = functools.partial(torch.compile, backend="aot_eager")
import data, train
from common import run_cli

real_save, real_batch, saves = dcp.save, data.Blocks.batch, []

def save(*args, **kwargs):
    result = real_save(*args, **kwargs)
    saves.append(1)
    if len(saves) == int(os.environ.get("DIE_IN_SAVE", 0)) and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return result

def batch(self, pos, batch_size):
    if self.shuffle_seed is not None and pos == int(os.environ.get("DIE_AT_POS", -1)) and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_batch(self, pos, batch_size)

dcp.save, data.Blocks.batch = save, batch
run_cli(train.main, sys.argv[1:])
"""

# 12 steps of 8 sequences (2 processes x 4, no accumulation), the first 6 in the embedding phase, a checkpoint every 3
COMMON = ("--max_iters=12", "--eval_interval=3", "--embedding_tuning_frac=0.5")
FSDP = ("--parallelism=fsdp", "--activation_checkpointing=True")
BODY_STEP = 8  # global blocks per step: DIE_AT_POS=7*8 dies in step 8


def torchrun(launcher, argv, nproc=2, env=None):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(launcher), *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    path = tmp_path_factory.mktemp("launcher") / "launch_train.py"
    path.write_text(LAUNCHER)
    return path


@pytest.fixture(scope="module")
def runs(corpus, launcher, tmp_path_factory):
    """The same run under DDP (eager) and under FSDP with activation checkpointing, compiled, uninterrupted."""
    out = {}
    for name, extra in (("ddp", ()), ("fsdp", (*FSDP, "--compile=True"))):
        out[name] = tmp_path_factory.mktemp(name)
        r = torchrun(launcher, train_args(corpus, out[name], *COMMON, *extra))
        assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_fsdp_matches_ddp_step_by_step_and_holds_half_the_memory(runs):
    """Losses step by step and the final weights agree (1e-5) across the switch (recompiled there); each FSDP rank
    holds about half of the parameter and optimizer-state bytes a DDP rank holds (measured by the trainer, at the
    end of the run)."""
    logs = {name: [m for m in metrics(out) if "lr" in m] for name, out in runs.items()}
    assert [m["phase"] for m in logs["fsdp"]] == ["embedding"] * 6 + ["full"] * 6
    for a, b in zip(logs["ddp"], logs["fsdp"], strict=True):
        assert a["step"] == b["step"] and a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
    ddp_w, fsdp_w = weights(runs["ddp"]), weights(runs["fsdp"])
    assert ddp_w.keys() == fsdp_w.keys()
    for name in ddp_w:
        torch.testing.assert_close(fsdp_w[name], ddp_w[name], rtol=0, atol=1e-5)
    ddp, fsdp = (json.loads((runs[name] / "summary.json").read_text()) for name in ("ddp", "fsdp"))
    assert (ddp["parallelism"], fsdp["parallelism"], fsdp["world_size"]) == ("ddp", "fsdp", 2)
    for key in ("rank0_param_bytes", "rank0_optimizer_state_bytes"):
        assert 0.45 < fsdp[key] / ddp[key] < 0.6, (key, fsdp[key], ddp[key])
    assert sorted(os.listdir(runs["fsdp"] / "ckpt")) == ["latest", "step-00000012"]  # the older ones removed
    assert not (runs["fsdp"] / "ckpt.pt").exists()


def test_fsdp_export_loads_in_transformers_like_ddps(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(runs["fsdp"] / "hf")("Der Bauer ging in den Wald.", return_tensors="pt")
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(runs[name] / "hf")(ids.input_ids).logits
                  for name in ("fsdp", "ddp")]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    assert sorted(os.listdir(runs["fsdp"] / "hf")) == sorted(os.listdir(runs["ddp"] / "hf"))


def sharded_to_dict(path, tmp_path):
    """A sharded checkpoint's model weights as one plain state dict (read without processes)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, tmp_path / "converted.pt")
    return torch.load(tmp_path / "converted.pt", weights_only=True)["model"]


def test_kill9_mid_checkpoint_and_mid_step_then_resume_on_two_or_one_process(corpus, launcher, runs, tmp_path):
    """Rank 0 is killed after the second checkpoint's shards are written, before it is committed: the first
    (step 3, embedding phase) stays the checkpoint, its transformer bit-identical to the start. Resumed, a rank is
    killed in the middle of step 8; resumed again on 2 processes the run ends with exactly the uninterrupted run's
    weights, and a copy resumed on 1 process (DCP reshards) with the same weights up to float rounding."""
    out = tmp_path / "run"
    argv = train_args(corpus, out, *COMMON, *FSDP)
    r = torchrun(launcher, argv, env={"DIE_IN_SAVE": "2"})
    assert r.returncode != 0 and "SIGKILL" in r.stderr, r.stderr[-3000:]
    assert [f for f in os.listdir(out / "ckpt") if f.startswith(".tmp-step-00000006")], "the killed write's dir"
    latest = latest_sharded(str(out / "ckpt"))  # what a resume reads
    assert latest == str(out / "ckpt" / "step-00000003")
    state = torch.load(os.path.join(latest, "train_state.pt"), weights_only=True)
    assert (state["step"], state["phase"]) == (3, "embedding")
    start, saved = load_file(corpus / "init" / "model.safetensors"), sharded_to_dict(latest, tmp_path)
    for name, tensor in start.items():
        if name in ("gpt_neox.embed_in.weight", "embed_out.weight"):
            assert not torch.equal(saved[name], tensor), f"{name} did not train in the embedding phase"
        else:
            assert torch.equal(saved[name], tensor), f"{name} changed while the transformer was frozen"

    r = torchrun(launcher, [*argv, "--init_from=resume"], env={"DIE_AT_POS": str(7 * BODY_STEP)})
    assert r.returncode != 0, r.stderr[-3000:]
    assert sorted(os.listdir(out / "ckpt")) == ["latest", "step-00000006"]  # the phase boundary; the dead write gone
    shutil.copytree(out, tmp_path / "one")

    r = torchrun(launcher, [*argv, "--init_from=resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in metrics(out) if "lr" in m] == list(range(1, 13))  # every step logged once
    reference = weights(runs["fsdp"])
    for name, tensor in weights(out).items():
        assert torch.equal(tensor, reference[name]), f"{name} differs from the uninterrupted run"

    one = [a.replace(str(out), str(tmp_path / "one")) for a in argv]
    r = torchrun(launcher, [*one, "--init_from=resume"], nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["world_size"] == 1
    for name, tensor in weights(tmp_path / "one").items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    """Per-block recomputation: the same loss and gradients as the plain model, the same parameter names, and
    fewer activations kept for backward."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=97, n_layer=3, n_head=2, n_embd=32, intermediate_size=64, block_size=64)
    plain, recomputed = GPTNeoX(config), GPTNeoX(config)
    recomputed.load_state_dict(plain.state_dict())
    train.apply_activation_checkpointing(recomputed)
    assert recomputed.state_dict().keys() == plain.state_dict().keys()
    idx = torch.randint(0, 97, (2, 16))
    kept = {}
    for name, model in (("plain", plain), ("recomputed", recomputed)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            _, loss = model(idx, idx)
        loss.backward()
        kept[name] = (loss.item(), sum(saved))
    assert kept["recomputed"][0] == kept["plain"][0] and kept["recomputed"][1] < kept["plain"][1] / 2, kept
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6, msg=name)


def test_bf16_mixed_precision_across_the_switch(corpus, launcher, runs, tmp_path):
    """dtype=bfloat16: FSDP computes in bf16 and reduces in fp32 into fp32 master weights, also for the blocks that
    were frozen when FSDP first ran (their gradient dtypes are fixed then); the losses follow the fp32 run's."""
    r = torchrun(launcher, train_args(corpus, tmp_path, *COMMON, "--parallelism=fsdp", "--dtype=bfloat16"))
    assert r.returncode == 0, r.stderr[-3000:]
    fp32 = [m["loss"] for m in metrics(runs["ddp"]) if "lr" in m]
    bf16 = [m["loss"] for m in metrics(tmp_path) if "lr" in m]
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, abs=0.02)
    start = load_file(corpus / "init" / "model.safetensors")
    end = weights(tmp_path)
    assert all(end[name].dtype == torch.float32 and not torch.equal(end[name], start[name]) for name in start)
