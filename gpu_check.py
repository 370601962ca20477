"""
The GPU check: the project's CUDA paths, each part on its own, in one short slot of GPU time (8 minutes on one H200,
compiles included). It needs only the machine's own python3 with torch, transformers, tokenizers and safetensors
(no .venv, no network, nothing outside the checkout) and writes under --out: gpu_check.json (every part's status,
figures and error) and gpu_check.log (everything the parts printed).

    python3 gpu_check.py --out out/gpu-check            # make gpu-check OUT=out/gpu-check
    python3 gpu_check.py --out /tmp/dry --dry-run       # every part at toy sizes on the CPU: the script tested

Parts (PARTS), most valuable first; each is skipped, saying so, when the time left cannot cover its estimate:
    bf16_parity      ours in bf16 against transformers in fp32, GPT-NeoX and Llama: the relative logit error within
                     twice transformers' own bf16 error, and the same argmax wherever fp32's top-1 margin exceeds
                     twice that error
    train_160m       a compiled bf16 train.py run at Pythia-160m's shape (random init, the study's 512 x 8 x 4 batch)
                     across the phase switch, the embedding phase at batch 1: tokens/s, MFU and peak memory per
                     phase, the batch-1 step time
    train_410m       the same at Pythia-410m's shape
    memory_model     bench.py's memory model (what_fits) against torch.cuda.max_memory_allocated of train_410m
    fsdp_resume      one rank (torchrun's worker environment), NCCL: FSDP2 with compile and activation checkpointing,
                     DCP checkpoints, killed (SIGKILL) after its first checkpoint and resumed to the end, the steps
                     both ran agreeing
    eval_clp         eval.py (perplexity) and clp.py on the device against the same on the CPU
    float16          a float16 run with an overflowing step: skipped by the GradScaler, its scale halved, training on
"""

import argparse
import contextlib
import gzip
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import unittest.mock

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZERS = os.path.join(HERE, "tests", "data", "tokenizers")
ELTEC = os.path.join(HERE, "tests", "data", "eltec")
BUDGET_S = 480  # the whole check, compiles included

PYTHIA_160M = dict(n_layer=12, n_head=12, n_embd=768, intermediate_size=3072)
PYTHIA_410M = dict(n_layer=24, n_head=16, n_embd=1024, intermediate_size=4096)
TOY = dict(n_layer=2, n_head=2, n_embd=64, intermediate_size=128)


class Check:
    """What every part gets: the device, toy sizes or real ones, a scratch directory, the log, figures other parts
    left (results)."""

    def __init__(self, out, dry_run):
        self.out, self.dry_run = out, dry_run
        self.device = "cpu" if dry_run else "cuda"
        self.dtype = "float32" if dry_run else "bfloat16"  # bf16 on a CPU without it: 17x slower
        self.vocab = 512 if dry_run else 50304  # the synthetic data's (Pythia's rows)
        self.work = tempfile.mkdtemp(prefix="gpu-check-")
        self.log = open(os.path.join(out, "gpu_check.log"), "a", encoding="utf-8")
        self.results = {}
        self.deadline = math.inf  # when the whole check must end (main sets it)

    def say(self, line):
        print(line, file=sys.__stdout__, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def path(self, *parts):
        return os.path.join(self.work, *parts)

    def run(self, argv, env=None, timeout=600):
        """A subprocess with this interpreter in the checkout, its output into the log; the CompletedProcess."""
        self.log.flush()
        return subprocess.run([sys.executable, *argv], cwd=HERE, stdout=self.log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=timeout)


# -----------------------------------------------------------------------------
# bf16 parity with transformers


def bf16_agreement(exact, ours, reference):
    """Ours (bf16) against the fp32 logits `exact`, with transformers' own bf16 logits `reference` as the yardstick
    of bf16 rounding: the relative logit error (Frobenius norms) of each, and ours' top-1 agreement with fp32 at the
    positions whose fp32 top-1 margin exceeds twice transformers' largest bf16 error (where no rounding of that size
    can change the argmax). A random model's logits are nearly tied, so plain argmax agreement would measure the
    ties, not the model."""
    exact, ours, reference = exact.float(), ours.float(), reference.float()
    budget = (reference - exact).abs().max().item()
    top2 = exact.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) > 2 * budget
    agree = (ours.argmax(-1) == exact.argmax(-1))[decided]
    return {"rel_err": ((ours - exact).norm() / exact.norm()).item(),
            "reference_rel_err": ((reference - exact).norm() / exact.norm()).item(),
            "max_err": (ours - exact).abs().max().item(), "reference_max_err": budget,
            "decided_positions": int(decided.sum()), "positions": decided.numel(),
            "decided_agreement": agree.float().mean().item() if agree.numel() else None}


def bf16_parity(c):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    from model import CausalLM

    width, heads, layers, T = (64, 2, 2, 32) if c.dry_run else (512, 8, 4, 256)
    common = dict(vocab_size=4096, hidden_size=width, num_attention_heads=heads, num_hidden_layers=layers,
                  intermediate_size=4 * width, max_position_embeddings=1024)
    families = {"gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**common, rotary_pct=0.25)),
                "llama": lambda: LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=heads // 2))}
    figures = {}
    for name, make in families.items():
        torch.manual_seed(0)
        ref = make()
        path = c.path(f"parity-{name}")
        ref.save_pretrained(path)
        idx = torch.randint(0, 4096, (4, T), generator=torch.Generator().manual_seed(0)).to(c.device)
        ref = ref.to(c.device).eval()
        with torch.no_grad():
            exact = ref(input_ids=idx).logits.float()
            reference = ref.to(torch.bfloat16)(input_ids=idx).logits.float()
            ours = CausalLM.from_pretrained(path, dtype="bfloat16", device=c.device).eval()(idx)[0].float()
        f = figures[name] = bf16_agreement(exact, ours, reference)
        assert f["rel_err"] <= 2 * f["reference_rel_err"] + 1e-3, (name, f)
        assert f["decided_positions"] > 0 and f["decided_agreement"] == 1.0, (name, f)
    return figures


# -----------------------------------------------------------------------------
# train.py at the study's shapes


def synthetic_data(c, vocab):
    import bench

    path = c.path(f"data-{vocab}")
    return path if os.path.isdir(path) else bench.synthetic_data(path, vocab, 300_000 if c.dry_run else 4_000_000)


def train_run(c, name, shape, argv=()):
    """train.py in this process: the study's variable-batch regime over random init (the embedding phase at batch 1,
    then 8 x 4 sequences of 512), bf16, compile as the device makes it (the dry run: float32, 2 x 2 x 32). Returns
    summary.json and metrics.jsonl's step lines."""
    import train

    out = c.path(name)
    block, batch, accum, steps = (32, 2, 2, 6) if c.dry_run else (512, 8, 4, 24)
    argv = [f"--data_dir={synthetic_data(c, c.vocab)}", f"--out_dir={out}", "--init_from=scratch",
            f"--vocab_size={c.vocab}", *[f"--{k}={v}" for k, v in shape.items()], f"--block_size={block}",
            f"--batch_size={batch}", f"--gradient_accumulation_steps={accum}", "--embedding_batch_size=1",
            "--embedding_gradient_accumulation_steps=1", "--embedding_tuning_frac=0.5", f"--max_iters={steps}",
            f"--eval_interval={steps}", "--eval_iters=1", "--eval_at_start=False", "--export_hf=False",
            f"--device={c.device}", f"--dtype={c.dtype}", *argv]
    c.say(f"  train.py {' '.join(argv)}")
    train.main(argv)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "dt_s" in r]
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f), steps


def phase_figures(summary, steps):
    """Per phase: tokens/s after its first (compile) step, MFU, peak memory, the median step time, the compile."""
    figures = {}
    for name, s in summary["phases"].items():
        timed = [r for r in steps if r["phase"] == name][1:]
        figures[name] = {"tokens_per_s": s["tokens_per_s"], "mfu": s.get("mfu"), "peak_mem_mb": s.get("peak_mem_mb"),
                         "median_step_s": statistics.median(r["dt_s"] for r in timed) if timed else None,
                         "first_step_s": s["first_steps_seconds"], "steps": s["steps"]}
    return figures


def train_shape(shape):
    def part(c):
        summary, steps = train_run(c, part.__name__, TOY if c.dry_run else shape)
        figures = phase_figures(summary, steps)
        assert set(figures) == {"embedding", "full"} and all(math.isfinite(r["loss"]) for r in steps), figures
        for name, f in figures.items():
            assert f["tokens_per_s"] and f["tokens_per_s"] > 0, (name, f)
            if not c.dry_run:
                assert f["peak_mem_mb"] > 0 and (f["mfu"] is None or 0 < f["mfu"] < 1), (name, f)
        figures["batch1_step_s"] = figures["embedding"]["median_step_s"]
        c.results[part.__name__] = {"summary": summary, "shape": shape}
        return figures
    return part


train_160m, train_410m = train_shape(PYTHIA_160M), train_shape(PYTHIA_410M)
train_160m.__name__, train_410m.__name__ = "train_160m", "train_410m"


def memory_model(c):
    """bench.memory_model's prediction for train_410m's full phase (one rank, bf16, a micro-batch of 8 x 512) against
    the peak torch.cuda.max_memory_allocated measured there. The model is for planning (what_fits): it must not
    promise less than the run takes, and not waste half the card either. Compiled runs keep fewer activations than
    the eager trace the model counts."""
    import bench

    run = c.results.get("train_410m")
    if run is None:
        raise Skip("train_410m did not run")
    shape, block = (TOY, 32) if c.dry_run else (PYTHIA_410M, 512)
    m = bench.memory_model(dict(shape, vocab_size=c.vocab), dtype=c.dtype, block_size=block)
    predicted = bench.bytes_per_gpu(m, "ddp", 1, False, 8 * block) / 2**20
    measured = run["summary"]["phases"]["full"].get("peak_mem_mb")
    figures = {"predicted_mb": predicted, "measured_mb": measured}
    if measured is None:  # a CPU has no allocator counter: the dry run computes the prediction only
        return figures
    figures["measured_over_predicted"] = measured / predicted
    assert 0.5 <= measured / predicted <= 1.1, figures
    return figures


# -----------------------------------------------------------------------------
# FSDP in a process group of one: compile, activation checkpointing, DCP, a kill, a resume


def fsdp_resume(c):
    from checkpoint import SHARDED, latest_sharded

    out = c.path("fsdp")
    shape, block, steps = (TOY, 32, 16) if c.dry_run else (dict(PYTHIA_160M, n_layer=4), 512, 40)
    argv = ["train.py", f"--data_dir={synthetic_data(c, c.vocab)}", f"--out_dir={out}", "--init_from=scratch",
            *[f"--{k}={v}" for k, v in shape.items()], f"--block_size={block}", "--batch_size=4",
            "--gradient_accumulation_steps=1", f"--max_iters={steps}", "--eval_interval=4", "--eval_iters=1",
            "--eval_at_start=False", "--embedding_tuning_frac=0.25", "--parallelism=fsdp",
            "--activation_checkpointing=True", f"--dtype={c.dtype}", f"--device={c.device}",
            *(() if c.dry_run else ("--compile=True", "--backend=nccl"))]
    c.log.flush()
    # rank 0 of one, started as torchrun starts its worker: the kill must reach the trainer itself (torchrun runs
    # its worker in a session of its own, out of reach of a kill of the launcher's group)
    killed = subprocess.Popen([sys.executable, *argv], cwd=HERE, stdout=c.log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **one_rank_env()}, start_new_session=True)
    record = os.path.join(out, "checkpoint.json")  # written once the first checkpoint is complete
    while killed.poll() is None and time.time() < c.deadline and not os.path.exists(record):
        time.sleep(0.01)
    if killed.poll() is None:
        os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, f"the run ended before the kill (exit {killed.returncode})"
    before = {r["step"]: r["loss"] for r in read_metrics(out) if "lr" in r}
    saved = int(latest_sharded(os.path.join(out, SHARDED)).rsplit("-", 1)[1])
    r = c.run([*argv, "--init_from=resume"], env=one_rank_env(), timeout=max(30.0, c.deadline - time.time()))
    assert r.returncode == 0, f"resume exited {r.returncode} (the log has its output)"
    after = {r["step"]: r["loss"] for r in read_metrics(out) if "lr" in r}
    assert saved < steps, f"the checkpoint it resumed from is the last step's ({saved}): nothing was resumed"
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    again = sorted(set(before) & set(after) - set(range(saved + 1)))  # taken before the kill and again after
    figures = {"killed_after_step": max(before), "resumed_from_step": saved, "steps_run_twice": len(again),
               "max_loss_diff": max((abs(before[s] - after[s]) for s in again), default=None),
               "steps": summary["steps"], "phases": phase_figures(summary, [])}
    assert summary["steps"] == steps and sorted(after) == list(range(1, steps + 1)), figures
    assert latest_sharded(os.path.join(out, SHARDED)).endswith(f"step-{steps:08d}"), figures
    assert figures["max_loss_diff"] is None or figures["max_loss_diff"] <= 0.02, figures
    return figures


def one_rank_env():
    """The environment torchrun gives its one worker (a process group of one, on a free port)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# -----------------------------------------------------------------------------
# eval.py and clp.py on the device


def eval_clp(c):
    """eval.py's perplexity of a small model over a German novel slice, and clp.py from that model and a helper with
    another tokenizer, each on the device against the same on the CPU. On the GPU the real tokenizers (Pythia's
    source, GPT-2's helper: 50k rows each); in the dry run BPEs of a few hundred tokens trained on the spot."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import eval as evaluate
    from clp import apply_clp
    from common import load_tokenizer, round_up, save_tokenizer
    from data import read_tei, train_bpe
    from model import GPTNeoX, GPTNeoXConfig

    # as eval.py and clp.py run on their own: fp32 matmuls in fp32 (the training parts switched TF32 on)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    source, helper = c.path("eval-source"), c.path("eval-helper")
    os.makedirs(helper, exist_ok=True)
    novels = {lang: read_tei(os.path.join(ELTEC, lang, sorted(os.listdir(os.path.join(ELTEC, lang)))[0]))
              for lang in ("eng", "deu")}
    if c.dry_run:
        train_bpe([novels["eng"][:50_000]], 400).save(c.path("tokenizer.json"))
        train_bpe([novels["deu"][:50_000]], 500).save(os.path.join(helper, "tokenizer.json"))
    else:
        unzip(os.path.join(TOKENIZERS, "pythia-gpt-neox-20b-tokenizer.json.gz"), c.path("tokenizer.json"))
        for name in ("vocab.json", "merges.txt"):  # the helper's tokenizer as GPT-2 repos ship it
            unzip(os.path.join(TOKENIZERS, f"gpt2-{name}.gz"), os.path.join(helper, name))
    vocab = {name: load_tokenizer(path).get_vocab_size() for name, path in (("source", c.path("tokenizer.json")),
                                                                            ("helper", helper))}
    torch.manual_seed(0)
    GPTNeoX(GPTNeoXConfig(vocab_size=round_up(vocab["source"]), block_size=256, **TOY)).save_pretrained(source)
    save_tokenizer(c.path("tokenizer.json"), source)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab["helper"], n_embd=48, n_layer=1, n_head=2, n_positions=64)) \
        .save_pretrained(helper)
    text = c.path("novel.txt")
    with open(text, "w", encoding="utf-8") as f:
        f.write(novels["deu"][:5_000 if c.dry_run else 200_000])

    ppl, clp = {}, {}
    for device in ("cpu", c.device):
        t0 = time.time()
        ppl[device] = evaluate.main(["--model", source, "--ppl_files", text, "--device", device,
                                     "--max_length", "256", "--batch_size", "16"])
        t1 = time.time()
        clp[device] = apply_clp(source, helper, device=device, extrapolation_fallback=True)
        c.say(f"  {device}: eval.py {t1 - t0:.1f} s, clp.py {time.time() - t1:.1f} s")
    figures = {"eval_tokens": ppl["cpu"]["tokens"],
               "eval_nll_rel_diff": abs(ppl[c.device]["nll"] / ppl["cpu"]["nll"] - 1),
               "clp_rows": clp["cpu"][0].shape[0], "clp_shared_tokens": clp["cpu"][2].get("shared_tokens_exact"),
               "clp_max_diff": max((a.float() - b.float().cpu()).abs().max().item()
                                   for a, b in zip(clp["cpu"][:2], clp[c.device][:2]))}
    assert figures["eval_tokens"] > 1000 and figures["eval_nll_rel_diff"] <= 1e-3, figures
    assert figures["clp_max_diff"] <= 1e-4, figures
    return figures


def unzip(src, dst):
    with gzip.open(src, "rb") as f, open(dst, "wb") as g:
        shutil.copyfileobj(f, g)


# -----------------------------------------------------------------------------
# float16: an overflowing step skipped


def float16(c):
    """A float16 run whose third step's loss is scaled so far that its fp16 gradients overflow: the GradScaler skips
    that update and halves its scale (65536 -> 32768); the steps around it train."""
    from model import CausalLM

    forward, calls = CausalLM.forward, []

    def overflow_third_step(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if targets is not None:
            calls.append(1)
            if len(calls) == 3 * (2 if c.dry_run else 4):  # step 3's last micro-batch
                loss = loss * 1e30
        return logits, loss

    with unittest.mock.patch.object(CausalLM, "forward", overflow_third_step):
        summary, steps = train_run(c, "float16", TOY, ["--dtype=float16", "--compile=False",
                                                       "--embedding_tuning_frac=0", "--max_iters=6"])
    state = torch.load(os.path.join(c.path("float16"), "ckpt.pt"), map_location="cpu", weights_only=False)
    figures = {"scale": state["scaler"]["scale"], "losses": [r["loss"] for r in steps]}
    assert figures["scale"] == 32768.0 and summary["steps"] == 6, figures
    assert steps[2]["loss"] > 1e29 and all(r["loss"] < 20 for i, r in enumerate(steps) if i != 2), figures
    return figures


# -----------------------------------------------------------------------------
# the runner


class Skip(Exception):
    """A part that cannot run here (its reason)."""


# (name, function, the seconds it takes on one H200, compiles included): the most valuable first
PARTS = [("bf16_parity", bf16_parity, 30), ("train_160m", train_160m, 90), ("train_410m", train_410m, 130),
         ("memory_model", memory_model, 5), ("fsdp_resume", fsdp_resume, 110), ("eval_clp", eval_clp, 40),
         ("float16", float16, 25)]


def environment(device):
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": device}
    if device.startswith("cuda"):
        import train

        env.update(card=torch.cuda.get_device_name(), peak_bf16_flops=train.peak_flops(torch.cuda.get_device_name(),
                                                                                      "bfloat16"))
    return env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.log")
    p.add_argument("--dry-run", action="store_true", help="every part at toy sizes on the CPU (tests the script)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
    p.add_argument("--only", default="", help="comma-separated part names")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (--dry-run runs the check on the CPU)", file=sys.stderr)
        return 2
    sys.path.insert(0, HERE)
    c = Check(args.out, args.dry_run)
    start = time.time()
    c.deadline = start + args.budget
    results = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dry_run": args.dry_run,
               "budget_s": args.budget, **environment(c.device), "parts": {}}
    only = [n for n in args.only.split(",") if n]
    for name, part, estimate in PARTS:
        left = args.budget - (time.time() - start)
        if only and name not in only:
            continue
        if left < (0 if args.dry_run else estimate):  # the dry run's toy parts take seconds
            r = {"status": "SKIP", "reason": f"{left:.0f} s left, the part takes about {estimate} s on one H200"}
        else:
            c.say(f"--- {name}")
            t0 = time.time()
            try:
                with contextlib.redirect_stdout(c.log), contextlib.redirect_stderr(c.log):
                    r = {"status": "PASS", "figures": part(c)}
            except Skip as e:
                r = {"status": "SKIP", "reason": str(e)}
            except Exception as e:  # noqa: BLE001 -- a failed part is a result; the next part still runs
                c.log.write(traceback.format_exc())
                r = {"status": "FAIL", "error": f"{type(e).__name__}: {e}"[:2000]}
            r["seconds"] = round(time.time() - t0, 1)
            if c.device.startswith("cuda"):
                torch.cuda.empty_cache()
        results["parts"][name] = r
        detail = r.get("reason") or r.get("error") or json.dumps(r["figures"], default=str)[:300]
        c.say(f"{r['status']} {name} ({r.get('seconds', 0):.1f} s): {detail}")
        results["seconds"] = round(time.time() - start, 1)
        with open(os.path.join(args.out, "gpu_check.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)
    shutil.rmtree(c.work, ignore_errors=True)
    failed = [n for n, r in results["parts"].items() if r["status"] == "FAIL"]
    c.say(f"gpu check: {len(results['parts']) - len(failed)} of {len(results['parts'])} parts not failed "
          f"({results['seconds']:.0f} s); results {os.path.join(args.out, 'gpu_check.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
