"""train.py on tiny models over the ELTeC novels: learning, freezing, schedules, DDP, resume, config errors."""

import json
import math
import os
import re
import signal
import sys

import pytest
import torch
from conftest import ROOT, eltec_texts, metrics, run_py, stop_by_sigterm_while_reading, train_args as args, weights
from safetensors.torch import load_file

import data
import train
from checkpoint import load_checkpoint
from common import UserError, save_tokenizer
from model import GPTNeoX, GPTNeoXConfig


def test_loss_falls(corpus, tmp_path):
    train.main(args(corpus, tmp_path, "--max_iters=60", "--eval_interval=30", "--eval_at_start=True"))
    evals = [m["val_loss"] for m in metrics(tmp_path) if "val_loss" in m]
    assert evals[0] > evals[1] > evals[2] and evals[-1] < evals[0] - 0.5, evals
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["tokens"] == 60 * 4 * 2 * 32


def test_embedding_phase_freezes_transformer_then_everything_trains(corpus, tmp_path, monkeypatch):
    """Stop by SIGTERM inside the embedding phase: the checkpoint's transformer is bit-identical to the start while
    the embeddings moved; after resuming across the switch every parameter has moved; and the resumed run ends with
    exactly the weights and log of an uninterrupted one."""
    start = load_file(corpus / "init" / "model.safetensors")
    run_args = args(corpus, tmp_path / "whole", "--max_iters=12", "--eval_interval=4", "--embedding_tuning_frac=0.5")
    train.main(run_args)

    batch = data.Blocks.batch

    def batch_then_sigterm(self, pos, batch_size):  # a scheduler's SIGTERM arrives during step 3
        if self.shuffle_seed is not None and pos == 3 * 8:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch(self, pos, batch_size)

    monkeypatch.setattr(data.Blocks, "batch", batch_then_sigterm)
    stopped_args = [a.replace("whole", "stopped") for a in run_args]
    with pytest.raises(SystemExit) as stop:
        train.main(stopped_args)
    assert stop.value.code == 128 + signal.SIGTERM
    monkeypatch.setattr(data.Blocks, "batch", batch)
    ckpt = torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["phase"] == "embedding" and ckpt["pos"] == 4 * 8
    embeddings = {"gpt_neox.embed_in.weight", "embed_out.weight"}
    for name, tensor in ckpt["model"].items():
        if name in embeddings:
            assert not torch.equal(tensor, start[name]), f"{name} did not train in the embedding phase"
        else:
            assert torch.equal(tensor, start[name]), f"{name} changed while the transformer was frozen"
    # the optimizer holds state for the embeddings only
    assert len(ckpt["optimizer"]["state"]) == 2

    train.main([*stopped_args, "--init_from=resume"])
    end = weights(tmp_path / "stopped")
    for name, tensor in end.items():
        assert not torch.equal(tensor, start[name]), f"{name} never trained"
        assert torch.equal(tensor, weights(tmp_path / "whole")[name]), f"{name} differs from the uninterrupted run"
    losses = [[m.get("loss") for m in metrics(tmp_path / run)] for run in ("stopped", "whole")]
    assert losses[0] == losses[1]


def expected_lr(step, start, steps, warmup, peak, min_lr, schedule):
    """The documented schedule, written out independently: warmup (s+1)/(W+1), then decay, floored at min_lr."""
    s = step - start
    if s < warmup:
        return max(min_lr, peak * (s + 1) / (warmup + 1))
    p = (s - warmup) / (steps - warmup)
    lam = {"cosine": (1 + math.cos(math.pi * p)) / 2, "linear": 1 - p, "constant": 1.0}[schedule]
    return max(min_lr, peak * lam)


def test_learning_rates_and_batch_sizes_per_phase(corpus, tmp_path):
    """Variable batch size: the embedding phase is 25% of the tokens at 1 sequence per step, the rest 4 x 2; each
    phase warms up over 20% of its own steps and decays with its own schedule."""
    cmd = args(corpus, tmp_path, "--max_tokens=16384", "--embedding_tuning_frac=0.25", "--phase_unit=tokens",
               "--embedding_batch_size=1", "--embedding_gradient_accumulation_steps=1", "--warmup_relative_to=phase",
               "--embedding_warmup_frac=0.2", "--warmup_frac=0.2", "--lr_schedule=linear", "--eval_interval=1000")
    train.main(cmd)
    log = [m for m in metrics(tmp_path) if "lr" in m]
    emb = [m for m in log if m["phase"] == "embedding"]
    full = [m for m in log if m["phase"] == "full"]
    assert len(emb) == 16384 * 0.25 / 32 == 128 and len(full) == 16384 * 0.75 / (4 * 2 * 32) == 48
    assert all(b["tokens"] - a["tokens"] == 32 for a, b in zip(emb, emb[1:]))
    assert all(b["tokens"] - a["tokens"] == 4 * 2 * 32 for a, b in zip(full, full[1:]))
    for m in log:
        i = m["step"] - 1
        want = (expected_lr(i, 0, 128, round(0.2 * 128), 1e-2, 3e-4, "cosine") if i < 128 else
                expected_lr(i, 128, 48, round(0.2 * 48), 3e-3, 3e-4, "linear"))
        assert m["lr"] == pytest.approx(want, rel=1e-12), m
    assert log[0]["lr"] < log[10]["lr"] and full[0]["lr"] < full[5]["lr"]  # both phases warm up


def test_plan_matches_the_study(corpus):
    """Steps mode: 10% of N steps, warmups 1% of the run; unified: one curve over both phases."""
    cfg = train.parse_config(["config/oscar_de_embedding_tuning.py", "--max_iters=1000"])
    emb, full = train.plan_phases(cfg, train_blocks=10**6)
    assert (emb.start, emb.steps, emb.warmup, emb.peak_lr) == (0, 100, 10, 1e-3)
    assert (full.start, full.steps, full.warmup, full.peak_lr) == (100, 900, 10, 3e-4)
    assert full.lr(100, 3e-5) == 3e-5 and full.lr(102, 3e-5) == pytest.approx(3e-4 * 3 / 11)  # warms up again
    cfg = train.parse_config(["config/oscar_de_variable_batch_size.py", "--max_iters=0", "--epochs=1.0"])
    emb, full = train.plan_phases(cfg, train_blocks=64_000)  # 10% of 64,000 blocks at batch 1; 90% at 64
    assert (emb.steps, emb.batch_size, full.steps, full.batch_size * full.grad_accum) == (6400, 1, 900, 64)
    cfg = train.parse_config(["--lr_schedule=unified", "--embedding_tuning_frac=0.2", "--max_iters=100",
                              "--learning_rate=1e-3", "--warmup_frac=0.1"])
    emb, full = train.plan_phases(cfg, train_blocks=10**6)
    assert emb.lr(50, 0.0) == full.lr(50, 0.0) and full.lr(20, 0.0) == pytest.approx(
        1e-3 * (1 + math.cos(math.pi * 10 / 90)) / 2)


def test_plan_spends_max_iters_or_the_token_budget():
    """max_iters is the number of optimizer steps in tokens mode too; a token budget is spent in steps mode too,
    whatever the embedding batch; accumulation below the number of processes means one micro-batch each."""
    cfg = train.parse_config(["config/oscar_de_variable_batch_size.py", "--max_iters=1000"])
    emb, full = train.plan_phases(cfg, train_blocks=64_000)  # t = 1000 / (0.1 / 512 + 0.9 / 32768) tokens
    assert (emb.steps, full.steps) == (877, 123)
    assert emb.steps * 512 / (emb.steps * 512 + full.steps * 64 * 512) == pytest.approx(0.1, abs=0.001)
    cfg = train.parse_config(["config/oscar_de_variable_batch_size.py", "--max_iters=10",
                              "--embedding_tuning_frac=0.0001"])
    assert [p.steps for p in train.plan_phases(cfg, train_blocks=64_000)] == [1, 9]  # a phase asked for is there
    cfg = train.parse_config(["config/oscar_de_embedding_tuning.py", "--embedding_batch_size=1",
                              "--embedding_gradient_accumulation_steps=1", "--max_tokens=16384000"])
    emb, full = train.plan_phases(cfg, train_blocks=10**6)
    spent = emb.steps * 512 + full.steps * 8 * 4 * 512
    assert emb.steps == math.ceil(0.1 * (emb.steps + full.steps)) and 16384000 - 8 * 4 * 512 < spent <= 16384000
    for unit in ("steps", "tokens"):  # the budget to within one step, never over (both phases used to round up)
        cfg = train.parse_config(["--embedding_tuning_frac=0.1", f"--phase_unit={unit}", "--max_tokens=20000",
                                  "--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=2",
                                  "--embedding_batch_size=1", "--embedding_gradient_accumulation_steps=1"])
        emb, full = train.plan_phases(cfg, train_blocks=10**6)
        assert 20000 - 4 * 2 * 32 < emb.steps * 32 + full.steps * 4 * 2 * 32 <= 20000, unit
    cfg = train.parse_config(["config/oscar_de_variable_batch_size.py", "--max_iters=0", "--epochs=1.0"])
    emb, full = train.plan_phases(cfg, train_blocks=64_000, world_size=2)
    assert (emb.grad_accum, full.grad_accum, emb.steps, full.steps) == (2, 4, 3200, 900)


def test_config_files_load_their_base_from_any_directory(tmp_path, monkeypatch):
    """A config file's own location is the base of its exec(...) of another; its helpers (os, __file__, _names)
    are not config keys, a typo still is an error."""
    monkeypatch.chdir(tmp_path)
    for name in os.listdir(os.path.join(ROOT, "config")):
        if name.endswith(".py"):
            train.parse_config([os.path.join(ROOT, "config", name)])
    cfg = train.parse_config([os.path.join(ROOT, "config", "oscar_de_variable_batch_size.py")])
    assert (cfg.embedding_tuning_frac, cfg.learning_rate, cfg.min_lr, cfg.batch_size) == (0.1, 3e-4, 3e-5, 16)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.py").write_text("learning_rate = 1e-4\n")
    (tmp_path / "sub" / "mine.py").write_text("import os\n_here = os.path.dirname(__file__)\n"
                                              "exec(open(os.path.join(_here, 'base.py')).read())\nbatch_size = 3\n")
    cfg = train.parse_config(["sub/mine.py"])
    assert (cfg.learning_rate, cfg.batch_size) == (1e-4, 3)
    (tmp_path / "sub" / "typo.py").write_text("import os\nlearing_rate = 1e-4\n")
    with pytest.raises(UserError, match="unknown config key 'learing_rate'.*'learning_rate'"):
        train.parse_config(["sub/typo.py"])


@pytest.mark.parametrize("overrides, message", [
    (["--block_size=0"], "block_size=0, expected a positive integer"),
    (["--batch_size=-1"], "batch_size=-1, expected a positive integer"),
    (["--gradient_accumulation_steps=0"], "gradient_accumulation_steps=0, expected a positive integer"),
    (["--eval_interval=0"], "eval_interval=0, expected a positive integer"),
    (["--eval_iters=0"], "eval_iters=0, expected a positive integer"),
    (["--embedding_batch_size=-2"], "embedding_batch_size=-2, expected a positive integer"),
    (["--embedding_gradient_accumulation_steps=-1"], "embedding_gradient_accumulation_steps=-1, expected"),
    (["--max_iters=-5"], "max_iters=-5, expected a positive integer"),
    (["--max_tokens=-1"], "max_tokens=-1, expected a positive integer"),
    (["--epochs=0"], "epochs=0.0, expected a positive number"),
    (["--epochs=-1"], "epochs=-1.0, expected a positive number"),
    (["--learning_rate=-1e-3", "--min_lr=0"], "learning_rate=-0.001, expected a number >= 0"),
    (["--learning_rate=1e999"], "learning_rate=inf, expected a finite number"),
    (["--min_lr=0.01"], "min_lr=0.01 is above learning_rate=0.003"),
    (["--embedding_tuning_frac=0.1", "--embedding_learning_rate=1e-4"], "min_lr=0.0003 is above embedding_learning"),
    (["--warmup_frac=1.5"], "warmup_frac=1.5, expected a fraction in [0, 1]"),
    (["--embedding_tuning_frac=-0.1"], "embedding_tuning_frac=-0.1, expected a fraction in [0, 1]"),
    (["--device=gpu"], "device='gpu', expected auto, cpu, cuda or cuda:N"),
    (["--device=cuda"], "device='cuda': no CUDA device available"),
    (["--wandb_log=True"], "wandb_log=True, but wandb is not installed"),
])
def test_values_out_of_range_are_errors_before_the_model_loads(corpus, tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "wandb", None)  # what find_spec sees when wandb is not installed
    monkeypatch.setattr(train, "load_meta", lambda *a: pytest.fail("the data and the model must not load"))
    with pytest.raises(UserError, match=re.escape(message)):
        train.main(args(corpus, tmp_path, *overrides))


def test_resume_keeps_the_phase_statistics_and_leaves_a_finished_run_alone(corpus, tmp_path, monkeypatch, capsys):
    """Stopped in the embedding phase and resumed: summary.json covers the whole run, and each phase's tokens/s
    leaves out the first step after the model was built (start, resume, switch: compile time). Resuming the finished
    run says so and touches nothing; one stopped before its summary was written redoes only the end."""
    run_args = args(corpus, tmp_path, "--max_iters=6", "--eval_interval=3", "--embedding_tuning_frac=0.5")
    stop_by_sigterm_while_reading(monkeypatch, 8, lambda: train.main(run_args))  # during step 2
    train.main([*run_args, "--init_from=resume"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    emb, full = summary["phases"]["embedding"], summary["phases"]["full"]
    assert (emb["steps"], emb["tokens"], emb["first_steps"]) == (3, 3 * 256, 2)  # the start and the resume
    assert (full["steps"], full["tokens"], full["first_steps"]) == (3, 3 * 256, 1)  # the switch
    dt = {m["step"]: m["dt_s"] for m in metrics(tmp_path) if "dt_s" in m}
    assert emb["tokens_per_s"] == pytest.approx(256 / dt[2])
    assert full["tokens_per_s"] == pytest.approx(512 / (dt[5] + dt[6]))
    assert emb["first_steps_seconds"] == pytest.approx(dt[1] + dt[3])
    if sys.platform == "linux":  # each phase's own peak host memory (VmHWM, reset at its start)
        assert 0 < emb["peak_rss_mb"] <= summary["peak_rss_mb"] and 0 < full["peak_rss_mb"] <= summary["peak_rss_mb"]

    files = [tmp_path / "summary.json", tmp_path / "metrics.jsonl", tmp_path / "hf" / "model.safetensors"]
    before = [(f.read_bytes(), f.stat().st_mtime_ns) for f in files]
    capsys.readouterr()
    train.main([*run_args, "--init_from=resume"])
    assert f"nothing to do: {tmp_path} finished at step 6" in capsys.readouterr().out
    assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in files] == before
    # stopped in the end phase (the last checkpoint written, no summary yet): a resume redoes only the end
    (tmp_path / "summary.json").unlink()
    train.main([*run_args, "--init_from=resume"])
    again = json.loads((tmp_path / "summary.json").read_text())
    assert {k: v for k, v in again.items() if k != "peak_rss_mb"} == {k: v for k, v in summary.items()
                                                                      if k != "peak_rss_mb"}


def test_peak_flops_for_the_runs_dtype():
    assert train.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert train.peak_flops("NVIDIA H100 80GB HBM3", "float32") == 494.7e12  # TF32, which the trainer turns on
    assert train.peak_flops("NVIDIA A10", "float16") == 125e12 and train.peak_flops("Some CPU", "float32") == 0.0


def test_peak_flops_card_names_as_cuda_reports_them():
    """torch.cuda.get_device_name's names, each its own card and form factor: a PCIe or NVL card is not the SXM one,
    and no name is read as another it contains (L4 in L40, A10 in A10G)."""
    bf16 = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
            "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA A100-SXM4-40GB": 312e12,
            "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
            "NVIDIA L40S": 362e12, "NVIDIA L40": 181e12, "NVIDIA L4": 121e12, "NVIDIA A10G": 70e12,
            "NVIDIA A10": 125e12, "NVIDIA GeForce RTX 4090": 165e12, "NVIDIA GeForce RTX 3090": 71e12,
            "NVIDIA RTX A6000": 0.0, "NVIDIA L20": 0.0, "NVIDIA H20": 0.0}
    assert {name: train.peak_flops(name, "bfloat16") for name in bf16} == bf16
    assert train.card("NVIDIA H100 PCIe") == ("H100", "PCIe") and train.card("NVIDIA L40") == ("L40", "")
    assert train.peak_flops("NVIDIA H100 NVL", "float32") == 417.5e12


def test_compile_follows_the_device_unless_given(corpus, tmp_path):
    """compile='auto' (the default) compiles on a GPU only; an explicit value wins; anything else is refused."""
    assert train.parse_config([]).compile == "auto"
    assert not train.setup_processes(train.parse_config(["--device=cpu"])).compile
    assert train.setup_processes(train.parse_config(["--device=cpu", "--compile=True"])).compile is True
    with pytest.raises(UserError, match="compile='yes', expected one of auto, True, False"):
        train.parse_config(["--compile=yes"])


def test_float16_resume_of_a_float32_run(corpus, tmp_path):
    """dtype may change on resume: a float32 run saved an empty GradScaler state, from which a float16 resume starts
    its scale afresh (and trains: its steps are finite)."""
    run_args = args(corpus, tmp_path, "--max_iters=2", "--eval_interval=2", "--export_hf=False")
    train.main(run_args)
    train.main([*run_args, "--init_from=resume", "--max_iters=4", "--dtype=float16"])
    steps = [m for m in metrics(tmp_path) if "lr" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4] and all(math.isfinite(m["loss"]) for m in steps)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["scaler"]["scale"] > 0


def test_torchrun_two_processes_across_the_switch(corpus, tmp_path):
    """DDP on CPU (gloo) through train_variable_bs.py, whose embedding phase accumulates 1 micro-batch, fewer than
    the processes: each runs one (a step of 2 x 1 sequences). Ranks stay identical through the switch, and the run
    equals a single process with the same global batch (the same blocks per step, gradients averaged instead of
    accumulated), and the periodic evaluation scores the same blocks (split across the processes): the start's
    validation loss is the single process's."""
    from train_variable_bs import VARIABLE_BATCH_DEFAULTS

    common = args(corpus, tmp_path, "--max_iters=8", "--eval_interval=4", "--embedding_tuning_frac=0.5",
                  "--eval_at_start=True")
    r = run_py(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_variable_bs.py",
                *[a.replace(str(tmp_path), str(tmp_path / "ddp")) for a in common]], env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("embedding_gradient_accumulation_steps=1 is fewer than the 2 processes") == 1, r.stdout
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ddp_ranks_identical"] is True
    assert summary["phases"]["embedding"]["steps"] == 6 and summary["phases"]["full"]["steps"] == 2
    assert summary["tokens"] == 6 * 2 * 32 + 2 * 4 * 2 * 32  # the effective accumulation counts
    train.main([*[a.replace(str(tmp_path), str(tmp_path / "single")) for a in common],
                "--embedding_gradient_accumulation_steps=2"], defaults=VARIABLE_BATCH_DEFAULTS)
    assert json.loads((tmp_path / "single" / "summary.json").read_text())["tokens"] == summary["tokens"]
    start_val = [[m["val_loss"] for m in metrics(tmp_path / run) if m["step"] == 0] for run in ("ddp", "single")]
    assert len(start_val[0]) == 1 and start_val[0] == pytest.approx(start_val[1], abs=1e-6)
    ddp_w, single_w = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    for name in single_w:
        torch.testing.assert_close(ddp_w[name], single_w[name], rtol=1e-4, atol=1e-5)


STOPPED_UNDER_TORCHRUN = """
import os, signal, sys
sys.path.insert(0, {root!r})
import data, train
from common import run_cli
from train_variable_bs import VARIABLE_BATCH_DEFAULTS

batch = data.Blocks.batch


def batch_then_sigterm(self, pos, batch_size):  # every rank reads the step's global position: all stop together
    if self.shuffle_seed is not None and pos == {pos}:
        os.kill(os.getpid(), signal.SIGTERM)
    return batch(self, pos, batch_size)


data.Blocks.batch = batch_then_sigterm
run_cli(lambda argv: train.main(argv, defaults=VARIABLE_BATCH_DEFAULTS))
"""


def test_variable_batch_run_resumed_on_another_number_of_processes_keeps_its_plan(corpus, tmp_path, monkeypatch,
                                                                                   capsys):
    """train_variable_bs.py on 2 processes (the embedding phase: 1 sequence per process, 2 per step), stopped in
    the embedding phase and resumed on 1: the batches stay as planned for 2 (2 micro-batches per step on the one
    process), so the phases keep their steps, the learning rate its curve, max_tokens holds, and the run ends as a
    single process with that batch from the start ends. A run planned for 1 cannot be shared by 2: refused."""
    from train_variable_bs import VARIABLE_BATCH_DEFAULTS

    common = args(corpus, tmp_path, "--max_tokens=2560", "--eval_interval=100")
    driver = tmp_path / "stopped.py"
    driver.write_text(STOPPED_UNDER_TORCHRUN.format(root=ROOT, pos=2))  # during step 2
    r = run_py(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
                *[a.replace(str(tmp_path), str(tmp_path / "resumed")) for a in common]], env={"OMP_NUM_THREADS": "1"})
    assert "stopped by SIGTERM at step 2" in r.stderr, r.stderr[-3000:]
    resumed = [a.replace(str(tmp_path), str(tmp_path / "resumed")) for a in common]
    capsys.readouterr()
    train.main([*resumed, "--init_from=resume"], defaults=VARIABLE_BATCH_DEFAULTS)
    assert ("resume: the batches stay as planned for 2 process(es), on 1: embedding phase 2 micro-batch(es) of 1 "
            "per process, full phase 2 micro-batch(es) of 4 per process") in capsys.readouterr().out

    cfg = train.parse_config(resumed, VARIABLE_BATCH_DEFAULTS)
    n_blocks = data.Blocks(str(corpus / "data" / "train.bin"), "uint16", 32).n_blocks
    plan = train.plan_phases(cfg, n_blocks, world_size=2)  # 4 embedding steps of 2 x 32 tokens, 9 full of 256
    assert [(p.name, p.steps, p.tokens_per_step) for p in plan] == [("embedding", 4, 64), ("full", 9, 256)]
    log = [m for m in metrics(tmp_path / "resumed") if "lr" in m]
    assert [m["step"] for m in log] == list(range(1, 14))
    for m in log:
        phase = train.phase_at(plan, m["step"] - 1)
        assert (m["phase"], m["lr"]) == (phase.name, pytest.approx(phase.lr(m["step"] - 1, cfg.min_lr), rel=1e-12))
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["tokens"] == 4 * 64 + 9 * 256 == 2560  # max_tokens, not exceeded
    assert (summary["phases"]["embedding"]["steps"], summary["phases"]["full"]["steps"]) == (4, 9)

    single = [a.replace(str(tmp_path), str(tmp_path / "single")) for a in common]
    train.main([*single, "--embedding_gradient_accumulation_steps=2"], defaults=VARIABLE_BATCH_DEFAULTS)
    single_w = weights(tmp_path / "single")
    for name, tensor in weights(tmp_path / "resumed").items():
        torch.testing.assert_close(tensor, single_w[name], rtol=1e-4, atol=1e-5)

    planned_for_1 = [a.replace(str(tmp_path), str(tmp_path / "one")) for a in common]
    stop_by_sigterm_while_reading(monkeypatch, 2, lambda: train.main(planned_for_1, defaults=VARIABLE_BATCH_DEFAULTS))
    checkpoint = load_checkpoint(str(tmp_path / "one"))
    with pytest.raises(UserError, match=re.escape(
            "the batches of {} were planned for 1 process(es): its embedding phase takes 1 micro-batch(es) of 1 "
            "sequences per optimizer step, which 2 processes cannot share; resume it on 1 process(es)".format(
                tmp_path / "one"))):
        train.resume_phases(train.parse_config(planned_for_1, VARIABLE_BATCH_DEFAULTS), checkpoint,
                            train.TrainState.from_checkpoint(checkpoint), n_blocks, world_size=2)


def test_export_loads_in_transformers(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train.main(args(corpus, tmp_path, "--max_iters=2", "--eval_interval=100"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok("Der Bauer ging in den Wald.", return_tensors="pt").input_ids
    ours = GPTNeoX.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours(ids)[0], rtol=1e-4, atol=1e-4)


def test_clear_errors(corpus, tmp_path, eltec_tokenizers):
    with pytest.raises(UserError, match="unknown config key 'embeding_tuning_frac'.*'embedding_tuning_frac'"):
        train.main(args(corpus, tmp_path, "--embeding_tuning_frac=0.1"))
    with pytest.raises(UserError, match="data directory not found"):
        train.main([*args(corpus, tmp_path), f"--data_dir={tmp_path / 'nope'}"])
    with pytest.raises(UserError, match="max_iters='ten' is a str, expected an int"):
        train.main(args(corpus, tmp_path, "--max_iters=ten"))
    # a model whose tokenizer is not the one the data was made with
    other = tmp_path.parent / f"{tmp_path.name}-english-model"
    GPTNeoX(GPTNeoXConfig(vocab_size=1024, n_layer=1, n_head=2, n_embd=32, intermediate_size=64)).save_pretrained(other)
    save_tokenizer(str(eltec_tokenizers["eng"]), str(other))
    with pytest.raises(UserError, match="different tokenizer"):
        train.main([*args(corpus, tmp_path), f"--init_from={other}"])
    r = run_py(["train.py", *args(corpus, tmp_path, "--lr_schedul=cosine")])
    assert r.returncode == 1 and r.stderr.strip().startswith("error: ") and "Traceback" not in r.stderr


def test_compiled_run_across_the_switch(corpus, tmp_path, monkeypatch):
    """torch.compile: the frozen phase traces a graph without body weight gradients; at the switch dynamo is reset
    and the model recompiled, so the body trains afterwards and the run matches the eager one. (aot_eager
    backend: dynamo's graph capture and guards are what is under test, not inductor's code generation.)"""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    common = ("--max_iters=6", "--eval_interval=3", "--embedding_tuning_frac=0.5")
    train.main(args(corpus, tmp_path / "compiled", *common, "--compile=True"))
    train.main(args(corpus, tmp_path / "eager", *common))
    start = load_file(corpus / "init" / "model.safetensors")
    compiled, eager = weights(tmp_path / "compiled"), weights(tmp_path / "eager")
    for name in start:
        assert not torch.equal(compiled[name], start[name]), f"{name} did not train in the compiled run"
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5)


def test_fresh_run_into_a_finished_run_refuses_and_override_replaces_it(corpus, tmp_path, capsys):
    """A fresh run (a rerun after Ctrl-C without init_from=resume, a config with a fixed out_dir) never destroys a
    run: it stops before anything loads and every file stays; override=True moves the old run aside until the new
    run's first checkpoint, then deletes it. An out_dir that is a file is an error before anything loads too."""
    train.main(args(corpus, tmp_path, "--max_iters=4", "--eval_interval=2"))
    files = ["ckpt.pt", "metrics.jsonl", "summary.json", "hf/model.safetensors"]
    before = {f: (tmp_path / f).read_bytes() for f in files}
    with pytest.raises(UserError, match=r"holds a run \(ckpt.pt, hf, metrics.jsonl, summary.json\).*"
                                        r"--init_from=resume.*--override=True"):
        train.main(args(corpus, tmp_path, "--max_iters=2"))
    assert {f: (tmp_path / f).read_bytes() for f in files} == before
    (tmp_path / "ckpt.pt").unlink()  # killed before its first checkpoint: the metrics alone are a run
    with pytest.raises(UserError, match=r"holds a run \(hf, metrics.jsonl, summary.json\)"):
        train.main(args(corpus, tmp_path, "--max_iters=2"))

    train.main(args(corpus, tmp_path, "--max_iters=2", "--eval_interval=2", "--override=True"))
    assert "moved to" in capsys.readouterr().out
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 2]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".replaced-run-")]  # gone at the first checkpoint

    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="out_dir=.*a-file' is a file, expected a directory"):
        train.main(args(corpus, tmp_path / "a-file"))


def test_resume_refuses_changes_that_corrupt_the_run_and_accepts_a_longer_one(corpus, tmp_path, capsys):
    """Keys that give the saved state its meaning (block_size: the data position counts blocks) are refused with
    both values; a longer max_iters continues."""
    run_args = args(corpus, tmp_path, "--max_iters=4", "--eval_interval=2")
    train.main(run_args)
    with pytest.raises(UserError, match=r"init_from=resume: block_size=16 \(saved: 32\), seed=1 \(saved: 42\) "
                                        "would change what the saved state"):
        train.main([*run_args, "--init_from=resume", "--max_iters=6", "--block_size=16", "--seed=1"])
    capsys.readouterr()
    train.main([*run_args, "--init_from=resume", "--max_iters=6"])
    assert "resume: max_iters 4 -> 6" in capsys.readouterr().out
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6
    assert [m["step"] for m in metrics(tmp_path) if "loss" in m] == [1, 2, 3, 4, 5, 6]



def test_a_run_extended_after_its_switch_keeps_its_embedding_phase(corpus, tmp_path, monkeypatch, capsys):
    """12 steps at embedding_tuning_frac=0.25 (embedding steps 0..2), then resumed to 16: ceil(0.25 x 16) = 4 would
    move the boundary under steps taken in full, so the embedding phase stays as it was and the full phase has the
    rest: steps 13-16 train in full, its cosine re-planned over its 13 steps (warmup kept), at min_lr at step 16.
    Before the switch the rule stands: a length whose embedding phase ends before the steps taken is refused."""
    run_args = args(corpus, tmp_path, "--max_iters=12", "--eval_interval=6", "--embedding_tuning_frac=0.25")
    train.main(run_args)
    first = {m["step"]: m for m in metrics(tmp_path) if "lr" in m}
    capsys.readouterr()
    train.main([*run_args, "--init_from=resume", "--max_iters=16"])
    assert "  embedding phase: steps 0..2," in capsys.readouterr().out
    log = {m["step"]: m for m in metrics(tmp_path) if "lr" in m}
    assert sorted(log) == list(range(1, 17)) and all(log[s] == first[s] for s in range(1, 13))
    assert [log[s]["phase"] for s in range(1, 17)] == ["embedding"] * 3 + ["full"] * 13
    warmup = round(0.1 * 12)  # warmup_frac of the run as it was planned
    for step in range(13, 17):
        assert log[step]["lr"] == pytest.approx(expected_lr(step - 1, 3, 13, warmup, 3e-3, 3e-4, "cosine"), rel=1e-12)
    assert log[13]["lr"] > 2 * 3e-4 and log[16]["lr"] == 3e-4  # the decay starts again and ends at 16
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["phases"]["embedding"]["steps"], summary["phases"]["full"]["steps"]) == (3, 13)
    plan = torch.load(tmp_path / "ckpt.pt", weights_only=True)["plan"]
    assert [(p["name"], p["start"], p["steps"]) for p in plan["phases"]] == [("embedding", 0, 3), ("full", 3, 13)]

    before = args(corpus, tmp_path / "before", "--max_iters=8", "--eval_interval=4", "--embedding_tuning_frac=0.5")
    stop_by_sigterm_while_reading(monkeypatch, 16, lambda: train.main(before))  # stopped after step 3 of 0..3
    with pytest.raises(UserError, match="embedding phase would be steps 0..1, but the saved run at step 3 has taken "
                                        "3 embedding steps"):
        train.main([*before, "--init_from=resume", "--max_iters=4"])


def test_resume_refuses_data_made_with_another_tokenizer(corpus, tmp_path, eltec_tokenizers):
    """The data directory rebuilt with another tokenizer under the same path: a resume refuses it as a fresh run
    does, instead of training on the wrong ids and exporting the old tokenizer."""
    import shutil

    data_dir = tmp_path / "data"
    shutil.copytree(corpus / "data", data_dir)
    run_args = args(corpus, tmp_path / "run", f"--data_dir={data_dir}", "--max_iters=2", "--eval_interval=2")
    train.main(run_args)
    (tmp_path / "english").mkdir()
    for i, text in enumerate(eltec_texts("eng")):
        (tmp_path / "english" / f"{i}.txt").write_text(text[:30_000])
    data.prepare([str(tmp_path / "english" / "*.txt")], str(data_dir), str(eltec_tokenizers["eng"]), subsample_size_mb=0.05,
                 valid_percent=20, progress=False, override=True)
    with pytest.raises(UserError, match="was tokenized with .* but the model .*ckpt.pt .* has a different tokenizer"):
        train.main([*run_args, "--init_from=resume", "--max_iters=4"])


def test_resume_refuses_data_prepared_again_from_other_text(corpus, tmp_path, capsys, eltec_tokenizers):
    """The checkpoint records its data (sizes, meta.json, sampled content). The same text prepared again into the
    data directory is the same data and resumes; other text with the same tokenizer is refused in one line naming
    data_dir and the way out; a checkpoint of an older train.py (no record) resumes, warned once."""
    import shutil

    data_dir = tmp_path / "data"
    shutil.copytree(corpus / "data", data_dir)
    run_args = args(corpus, tmp_path / "run", f"--data_dir={data_dir}", "--max_iters=2", "--eval_interval=2")
    train.main(run_args)
    record = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["data"]
    assert record == data.data_fingerprint(str(data_dir))
    assert record["train_bytes"] == (data_dir / "train.bin").stat().st_size

    def prepare(texts):
        data.prepare([str(texts / "*.txt")], str(data_dir), str(eltec_tokenizers["deu"]), subsample_size_mb=0.25,
                     valid_percent=20, progress=False, override=True)

    prepare(corpus / "texts")  # the same text again: a new meta.json "created", the same data
    train.main([*run_args, "--init_from=resume", "--max_iters=4"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4
    other = tmp_path / "other"
    other.mkdir()
    for i in range(6):  # the same documents in the opposite order: other token files, the same tokenizer
        shutil.copyfile(corpus / "texts" / f"{5 - i}.txt", other / f"{i}.txt")
    prepare(other)
    refused = (f"data_dir='{data_dir}' is not the data {tmp_path / 'run' / 'ckpt.pt'} was trained on (train.bin "
               f"{record['train_bytes']:,} -> {(data_dir / 'train.bin').stat().st_size:,} bytes")
    with pytest.raises(UserError, match=re.escape(refused) + r".*put that data back to resume, or train on this data "
                                                              "in a fresh run"):
        train.main([*run_args, "--init_from=resume", "--max_iters=6"])

    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    del ckpt["data"], ckpt["plan"]  # as an older train.py wrote it
    torch.save(ckpt, tmp_path / "run" / "ckpt.pt")
    capsys.readouterr()
    train.main([*run_args, "--init_from=resume", "--max_iters=6"])
    assert capsys.readouterr().out.count("was written by an older train.py and does not record its data") == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6


def test_data_framed_otherwise_than_the_models_tokenizer_is_refused(corpus, tmp_path, bos_tokenizer):
    """A model whose tokenizer adds BOS trains on token files that start each document with it; the same files as an
    older data.py left them (no framing in meta.json: no BOS) are refused in one line naming both, whether the model
    comes from init_from, from scratch (the data's own tokenizer) or from a checkpoint (resume)."""
    data_dir = tmp_path / "data"
    data.prepare([str(corpus / "texts" / "*.txt")], str(data_dir), str(bos_tokenizer), subsample_size_mb=0.25,
                 valid_percent=20, progress=False)
    init = tmp_path / "init"
    GPTNeoX(GPTNeoXConfig(vocab_size=1200, n_layer=1, n_head=2, n_embd=32, intermediate_size=64, block_size=64,
                          bos_token_id=1, eos_token_id=2)).save_pretrained(init)
    save_tokenizer(str(bos_tokenizer), str(init))
    run_args = args(corpus, tmp_path / "run", f"--data_dir={data_dir}", f"--init_from={init}", "--max_iters=2",
                    "--eval_interval=2")
    train.main(run_args)
    meta = json.loads((data_dir / "meta.json").read_text())
    (data_dir / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "framing"}))
    refused = (f"{data_dir} frames each document as text + EOS, no BOS (its meta.json has no framing: an older "
               "data.py), but the tokenizer of the model {} frames a text as BOS (id 1) + text + EOS; prepare the data "
               "again with data.py and the model's tokenizer")
    with pytest.raises(UserError, match=re.escape(refused.format(init))):
        train.main([*run_args, f"--out_dir={tmp_path / 'again'}"])
    with pytest.raises(UserError, match=re.escape(refused.format(f"from scratch (tokenizer {bos_tokenizer})"))):
        train.main([*args(corpus, tmp_path / "scratch", f"--data_dir={data_dir}", "--init_from=scratch",
                          "--n_layer=1", "--n_head=2", "--n_embd=32", "--max_iters=2")])
    resumed = f"{tmp_path / 'run' / 'ckpt.pt'} (tokenizer {init})"
    with pytest.raises(UserError, match=re.escape(refused.format(resumed))):
        train.main([*run_args, "--init_from=resume", "--max_iters=4"])


def test_help_lists_every_key_with_its_default_and_comment():
    for script, defaults in (("train.py", train.TrainConfig()), ("train_variable_bs.py", None)):
        r = run_py([script, "--help"])
        assert r.returncode == 0 and r.stderr == "", r.stderr
        for f in train.fields(train.TrainConfig):
            line = next((line for line in r.stdout.splitlines() if line.startswith(f"  --{f.name}=")), None)
            assert line is not None, f.name
            for said in (f.metadata["help"], *(f.metadata["choices"] or ())):
                assert str(said) in line, (f.name, said)
        if defaults:
            assert "  --block_size=512" in r.stdout and "# sequences per micro-batch per process" in r.stdout
            assert "\n# system\n" in r.stdout
        else:
            assert "  --phase_unit='tokens'" in r.stdout  # its own defaults
    assert run_py(["train.py", "-h"]).stdout.startswith("Pre-train")
    with pytest.raises(UserError, match="-x: expected a config file or --key=value"):
        train.parse_config(["-x"])
    assert train.parse_config(["--max_iters=1e3"]).max_iters == 1000
    with pytest.raises(UserError, match="expected an int"):
        train.parse_config(["--max_iters=ten"])


def test_print_needs_names_the_model_and_data_the_run_reads():
    """`make train` asks train.py (config files and --key=value as the run reads them) what to build first."""
    r = run_py(["train.py", "config/oscar_de_random_init.py", "--print_needs"])
    assert (r.returncode, r.stdout) == (0, "init_from=out/pythia-410m-small_init-german\ndata_dir=data/oscar_de\n")
    r = run_py(["train_variable_bs.py", "config/oscar_de_variable_batch_size.py", "--data_dir=/elsewhere",
                "--print_needs"])
    assert r.stdout.splitlines() == ["init_from=out/pythia-410m-clp-german", "data_dir=/elsewhere"]
    r = run_py(["train.py", "--print_needs", "--data_dri=x"])
    assert r.returncode == 1 and r.stderr.startswith("error: --data_dri=x: unknown config key"), r.stderr


def test_a_steps_loss_is_read_once_the_next_step_is_queued(corpus, tmp_path, monkeypatch):
    """The host never waits for a step before queueing the next: step N's loss is read (end_step) after step N+1's
    train_step, except where the loop needs it at once (an evaluation and checkpoint, the phase switch, the end)."""
    order, train_step, end_step = [], train.train_step, train.end_step

    def queue(*a, **kw):
        order.append("queue")
        return train_step(*a, **kw)

    def end(run, queued, bar):
        order.append(f"end {queued.step}")
        return end_step(run, queued, bar)

    monkeypatch.setattr(train, "train_step", queue)
    monkeypatch.setattr(train, "end_step", end)
    train.main(args(corpus, tmp_path, "--max_iters=7", "--eval_interval=3", "--embedding_tuning_frac=0.3"))
    # embedding phase: steps 1..3 (3: the switch, an evaluation); full phase: 4..7 (6: an evaluation; 7: the end)
    assert order == ["queue", "queue", "end 1", "queue", "end 2", "end 3", "queue", "queue", "end 4", "queue",
                     "end 5", "end 6", "queue", "end 7"]
    assert [m["step"] for m in metrics(tmp_path) if "lr" in m] == list(range(1, 8))


def test_a_nonfinite_step_changes_nothing_and_is_not_waited_for():
    """train_step with a non-finite loss: weights and AdamW state (moments, step counts) stay as they were, decided
    on the device (the fused kernel's found_inf), and the loss comes back as a tensor, unread."""
    torch.manual_seed(0)
    model = GPTNeoX(GPTNeoXConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, intermediate_size=32, block_size=8))
    cfg = train.TrainConfig()
    optimizer = train.configure_optimizer(model, cfg, "cpu")
    scaler, rt = torch.amp.GradScaler("cpu", enabled=False), train.Runtime()
    x = torch.randint(0, 64, (2, 9))
    batch = [(x[:, :-1], x[:, 1:])]
    assert torch.isfinite(train.train_step(model, model, optimizer, scaler, batch, 1e-3, 1.0, rt))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    forward = model.forward
    model.forward = lambda idx, targets=None: (None, forward(idx, targets)[1] * float("nan"))
    loss = train.train_step(model, model, optimizer, scaler, batch, 1e-3, 1.0, rt)
    assert torch.is_tensor(loss) and torch.isnan(loss)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
        assert all(torch.equal(v, state[id(p)][k]) for k, v in optimizer.state[p].items()), n
    model.forward = forward
    train.train_step(model, model, optimizer, scaler, batch, 1e-3, 1.0, rt)
    assert not torch.equal(model.embed_out.weight, weights["embed_out.weight"])
    assert all(s["step"] == 2 for s in optimizer.state.values())


def test_cuda_rng_state_is_the_runs_devices(monkeypatch, tmp_path):
    """A single process on cuda:1 saves and restores cuda:1's RNG state, not cuda:0's (torch.cuda's default). The
    CUDA calls are stood in for: this runs without a GPU."""
    from types import SimpleNamespace

    saved, restored = [], []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": saved.append(device) or torch.ones(3))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((device, state)))
    monkeypatch.setattr(train, "save_checkpoint", lambda out_dir, training, *a, **kw: checkpoints.append(training))
    checkpoints = []
    model = GPTNeoX(GPTNeoXConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, intermediate_size=32, block_size=8))
    cfg, rt = train.TrainConfig(out_dir=str(tmp_path)), train.Runtime(device="cuda:1")
    optimizer, scaler = train.configure_optimizer(model, cfg, "cpu"), torch.amp.GradScaler("cpu", enabled=False)
    phase = train.Phase("full", 1, 1, 8, 1e-3, "cosine")
    run = SimpleNamespace(cfg=cfg, rt=rt, model=model, optimizer=optimizer, scaler=scaler, tokenizer_dir="",
                          phase=phase, phases=[phase], planned_for=1, data_record={}, state=train.TrainState(),
                              new_rows=None)
    train.Run.checkpoint(run)
    assert saved == ["cuda:1"] and torch.equal(checkpoints[0]["rng"]["cuda"], torch.ones(3))
    checkpoint = SimpleNamespace(training=checkpoints[0], sharded=False, optimizer=optimizer.state_dict())
    train.restore_training(checkpoint, model, optimizer, scaler, [run.phase], cfg, rt)
    assert [device for device, _ in restored] == ["cuda:1"]
