"""
make bench: what each piece costs, measured side by side with what users would run instead, in one run on this
machine. Prints a table and writes out/bench/bench.json (ratios > 1: ours faster / leaner, as each key says).

    train_vs_hf_tokens_per_s     train.py's training step against transformers' GPTNeoXForCausalLM with a plain AdamW
                                 loop (same model, batch, sequence length, dtype, optimizer), CPU fp32 and bf16
    train_vs_hf_tokens_per_s_llama   the same for the Llama family: a tied Llama with grouped-query attention and
                                 SwiGLU against transformers' LlamaForCausalLM of that shape
    embedding_vs_full_*          one optimizer step of the embedding phase (transformer frozen) against one of the
                                 full phase at a Pythia-160m shape, beside what their FLOPs and bytes predict
    clp_speedup_vs_loop          clp.py against the original per-token loop (re-implemented here, timed on a subset
                                 and scaled linearly) at 50k vocabulary, half shared, width 1024
    fvt_seconds                  clp.py's FVT at Pythia scale: the vendored Pythia tokenizer as source (two random
                                 50,304 x 1,024 fp16 matrices), GPT-2's as target; its tokenizing and its products
    data_vs_tokenizers_ceiling   data.py's tokens/s against a bare `tokenizers` encode_batch loop over the same text
                                 (German ELTeC: $ELTEC_DIR/deu when set, else the slices in tests/data/eltec)
    mfu, tokens_per_s            Pythia-160m and -410m shapes, bf16, compiled, T=2048, on a CUDA device (else null;
                                 mfu null too on a card whose peak FLOPS train.PEAK_FLOPS does not know)
    fsdp_vs_ddp_peak_memory_per_rank  train.py's FSDP against its DDP, 2 CPU processes (gloo), Pythia-160m shape,
                                 fp32 AdamW: the largest per-rank peak RSS of the training steps (lower: FSDP leaner)

    what_fits                    for Pythia 410m to 12b, Llama-3.2-1B/3B, Llama-3.1-8B and Qwen2.5-0.5B/1.5B/7B on 80 GB
                                 cards: the largest micro-batch per rank under DDP and FSDP over 8 GPUs, without and
                                 with activation checkpointing (train.py's memory model)

    python bench.py [--quick] [--only train,phases,clp,data,gpu,fsdp,fits] [--out out/bench]
"""

import argparse
import datetime
import glob
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import unittest.mock

import numpy as np
import torch

from common import UserError, run_cli, torch_dtype, write_json
import model as model_module
from model import GPTNeoX, GPTNeoXConfig, Llama, LlamaConfig, config_from_dict, model_from_config

HERE = os.path.dirname(os.path.abspath(__file__))
TESTDATA = os.path.join(HERE, "tests", "data")  # the vendored Pythia tokenizer and ELTeC slices: offline
PYTHIA_TOKENIZER_GZ = os.path.join(TESTDATA, "tokenizers", "pythia-gpt-neox-20b-tokenizer.json.gz")
DATA_MIB = {False: 30, True: 10}  # the data benchmark's text, repeated to about this size (--quick: True)
PYTHIA_160M = dict(n_layer=12, n_head=12, n_embd=768, intermediate_size=3072, vocab_size=50304)
PYTHIA_410M = dict(n_layer=24, n_head=16, n_embd=1024, intermediate_size=4096, vocab_size=50304)


def machine():
    cpu = platform.processor()
    if os.path.isfile("/proc/cpuinfo"):
        cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def timed(fn, repeat):
    """Median seconds of `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_matmul_flops(dtype=torch.float32, n=2048, device="cpu"):
    """This machine's measured matmul throughput (an n x n GEMM), the ceiling FLOP-based predictions use."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / timed(lambda: a @ b, 5)


def memory_bandwidth(n=1 << 26):
    """Bytes per second of a streaming fp32 update (read 2, write 1), the ceiling for AdamW's element-wise work."""
    a, b = torch.randn(n), torch.randn(n)
    return 3 * 4 * n / timed(lambda: a.add_(b, alpha=0.5), 5)


def synthetic_data(path, vocab, n_tokens, val_tokens=8192, seed=0):
    """A data directory train.py accepts: random token ids (speed does not depend on them), meta.json."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_tokens), ("val", val_tokens)):
        rng.integers(0, vocab, n, dtype=np.uint32).astype(np.uint16).tofile(os.path.join(path, f"{split}.bin"))
    write_json(os.path.join(path, "meta.json"), {"dtype": "uint16", "vocab_size": vocab, "eos_token_id": 0,
                                                 "tokenizer_sha256": "synthetic", "tokenizer_file": ""})
    return path


def child(name, *args, nproc=0, env=None, timeout=1800):
    """Run `bench.py --child name args...` in a fresh process (its own peak memory), or in nproc processes under
    torchrun; it prints one JSON line last (rank 0's). A child that hangs is killed after `timeout` seconds."""
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                                  "--no-python", sys.executable] if nproc else [])
    try:
        r = subprocess.run([*launch, os.path.join(HERE, "bench.py"), "--child", name, *map(str, args)], cwd=HERE,
                           capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"benchmark child {name} did not finish in {timeout} s") from None
    if r.returncode:
        raise RuntimeError(f"benchmark child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -----------------------------------------------------------------------------
# 1. train.py's step against transformers + a plain AdamW loop

def train_run_child(data_dir, out_dir, dtype, steps, kw):
    """A short train.py run on synthetic data: the median tokens/s of its steps after the first two."""
    import train

    train.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--init_from=scratch", f"--dtype={dtype}",
                f"--max_iters={steps}", "--eval_at_start=False", f"--eval_interval={10**9}", "--eval_iters=1",
                "--export_hf=False", "--embedding_tuning_frac=0", *[f"--{k}={v}" for k, v in json.loads(kw).items()]])
    rows = [json.loads(line) for line in open(f"{out_dir}/metrics.jsonl") if '"dt_s"' in line][2:]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows)}

def train_vs_hf_child(kw, dtype, steps):
    """train.py's train_step and transformers' model of the same family and shape (GPTNeoXForCausalLM, or
    LlamaForCausalLM for kw's model_type llama) with a plain AdamW loop (both clipping gradients at 1.0), step by
    step in alternation on the same batches: each side's fastest step, in tokens/s."""
    import transformers

    import train

    kw, steps = json.loads(kw), int(steps)
    T, B, V = kw["block_size"], kw["batch_size"], kw["vocab_size"]
    torch.manual_seed(0)
    if kw.get("model_type") == "llama":
        ours = Llama(LlamaConfig(vocab_size=V, n_layer=kw["n_layer"], n_head=kw["n_head"], n_kv_head=kw["n_kv_head"],
                                 n_embd=kw["n_embd"], intermediate_size=kw["intermediate_size"], block_size=T,
                                 tie_word_embeddings=kw["tie_word_embeddings"]))
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=kw["n_embd"], num_hidden_layers=kw["n_layer"], num_attention_heads=kw["n_head"],
            num_key_value_heads=kw["n_kv_head"], intermediate_size=kw["intermediate_size"],
            max_position_embeddings=T, tie_word_embeddings=kw["tie_word_embeddings"]))
    else:
        ours = GPTNeoX(GPTNeoXConfig(vocab_size=V, n_layer=kw["n_layer"], n_head=kw["n_head"], n_embd=kw["n_embd"],
                                     intermediate_size=4 * kw["n_embd"], block_size=T))
        hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=V, hidden_size=kw["n_embd"], num_hidden_layers=kw["n_layer"], num_attention_heads=kw["n_head"],
            intermediate_size=4 * kw["n_embd"], rotary_pct=0.25, max_position_embeddings=T, hidden_act="gelu"))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    cfg = train.TrainConfig(learning_rate=3e-4, weight_decay=0.1)
    rt = train.Runtime(device="cpu", dtype=dtype)  # one process; autocast for bfloat16
    ours_opt = train.configure_optimizer(ours, cfg=cfg, device_type="cpu")
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def ours_step(x):  # train.py's step: forward_backward, clipping, its optimizer
        train.train_step(model=ours, raw_model=ours, optimizer=ours_opt, scaler=scaler,
                         batches=[(x[:, :-1], x[:, 1:])], lr=cfg.learning_rate, grad_clip=cfg.grad_clip, rt=rt)

    def hf_step(x):  # transformers with a plain AdamW loop
        with rt.autocast:
            loss = hf(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.grad_clip)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        loss.item()

    g = torch.Generator().manual_seed(0)
    times = {"ours": [], "hf": []}
    for i in range(steps + 2):
        x = torch.randint(0, V, (B, T + 1), generator=g)
        for name, step in (("ours", ours_step), ("hf", hf_step)) if i % 2 else (("hf", hf_step), ("ours", ours_step)):
            t0 = time.perf_counter()
            step(x)
            if i >= 2:  # two warm-up steps
                times[name].append(time.perf_counter() - t0)
    return {k: B * T / min(v) for k, v in times.items()}


def native_bf16_cpu():
    """Whether this CPU computes bf16 natively (AVX512-BF16, AMX), as oneDNN sees it; False where torch cannot say."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bench_train(work, quick, family="gpt_neox"):
    """Same model (6 layers, width 512, vocab 8192), batch 8 x 256 tokens, AdamW, gradients clipped at 1.0; fp32 and
    bf16 autocast. train.py's train_step (its optimizer: the fused AdamW kernel) and transformers' model of the
    family (GPTNeoXForCausalLM; for 'llama' LlamaForCausalLM, tied, 8 heads sharing 2 key/value heads, SwiGLU 8/3
    as wide) with torch's default AdamW run in one process, step by step in alternation, on the same batches; each
    side's fastest step counts (the least disturbed on a shared machine). bf16 only on a CPU with native bf16
    (oneDNN's check): elsewhere autocast emulates it about 17x slower than fp32, a quarter of an hour of benchmark
    that says nothing about training."""
    shape = dict(n_layer=2 if quick else 6, n_head=8, n_embd=256 if quick else 512, vocab_size=8192,
                 block_size=128 if quick else 256, batch_size=8)
    if family == "llama":
        shape.update(model_type="llama", n_kv_head=2, intermediate_size=-(-8 * shape["n_embd"] // 3 // 64) * 64,
                     tie_word_embeddings=True)
    out = {"shape": shape}
    for dtype in ("float32", "bfloat16"):
        if dtype == "bfloat16" and not native_bf16_cpu():
            out[dtype] = {"skipped": f"this CPU has no native bf16 ({torch.backends.cpu.get_cpu_capability()})",
                          "ratio": None}
            continue
        r = child("train_vs_hf", json.dumps(shape), dtype, 4 if quick else 10)
        out[dtype] = {"ours_tokens_per_s": r["ours"], "hf_tokens_per_s": r["hf"], "ratio": r["ours"] / r["hf"]}
    return out


# -----------------------------------------------------------------------------
# 2. one step of the embedding phase against one of the full phase

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def phase_memory_child(data_dir, out_dir, frac, steps, kw):
    """A short train.py run (embedding_tuning_frac=frac): its peak RSS less what the process held before."""
    import train

    base = rss()  # torch and the project imported, no model yet
    train.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--init_from=scratch", "--dtype=float32",
                f"--max_iters={steps}", "--eval_at_start=False", f"--eval_interval={10**9}", "--eval_iters=1",
                "--export_hf=False", f"--embedding_tuning_frac={frac}",
                *[f"--{k}={v}" for k, v in json.loads(kw).items()]])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": peak - base}

def phase_time_child(kw, steps):
    """train.py's train_step, one phase after the other (the same conditions for both): each one's fastest step."""
    import train

    kw, steps = json.loads(kw), int(steps)
    B, T = kw.pop("batch_size"), kw.pop("block_size")
    torch.manual_seed(0)
    model = GPTNeoX(GPTNeoXConfig(**kw, block_size=T))
    cfg = train.TrainConfig()
    rt = train.Runtime(device="cpu", dtype="float32")
    optimizer = train.configure_optimizer(model, cfg=cfg, device_type="cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    phases = {name: train.Phase(name=name, batch_size=B, grad_accum=1, block_size=T, peak_lr=1e-4, schedule="constant",
                                steps=1) for name in ("embedding", "full")}
    g = torch.Generator().manual_seed(0)
    times = {name: [] for name in phases}
    for i in range(steps + 1):
        for name, phase in phases.items():
            train.set_trainable(model, phase=phase, cfg=cfg)
            x = torch.randint(0, kw["vocab_size"], (B, T + 1), generator=g)
            t0 = time.perf_counter()
            train.train_step(model=model, raw_model=model, optimizer=optimizer, scaler=scaler,
                             batches=[(x[:, :-1], x[:, 1:])], lr=phase.peak_lr, grad_clip=cfg.grad_clip, rt=rt)
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def meta_model(shape, frozen):
    """The model on the meta device (no memory), trainable as in the embedding phase (frozen) or the full one."""
    import train

    with torch.device("meta"):
        model = GPTNeoX(GPTNeoXConfig(**{k: shape[k] for k in PYTHIA_160M}, block_size=shape["block_size"]))
    phase = train.Phase(name="embedding" if frozen else "full", batch_size=1, grad_accum=1,
                        block_size=shape["block_size"], peak_lr=0.0, schedule="constant", steps=1)
    train.set_trainable(model, phase=phase, cfg=train.TrainConfig())
    return model


def saved_activation_bytes(model, B, T):
    """Bytes autograd keeps for the backward pass of one forward, traced on the meta device: a frozen layer keeps
    less (no inputs for weight gradients)."""
    params = {id(p) for p in model.parameters()}
    sizes = {}

    def pack(t):
        if id(t) not in params and id(t._base) not in params:  # a weight's view (its transpose) is the weight
            sizes[id(t)] = t.numel() * t.element_size()
        return t

    idx = torch.zeros(B, T, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return sum(sizes.values())


def bench_phases(work, quick):
    """Pythia-160m shape (fp32, AdamW), one batch of 4 x 128 tokens per step. Time: train.py's step in one process,
    the two phases in alternation (set_trainable switching them), each phase's fastest step. Memory: a short
    train.py run per phase in its own process (peak RSS less what the process held before building the model)."""
    shape = dict(PYTHIA_160M, n_layer=4 if quick else 12, block_size=128, batch_size=4, gradient_accumulation_steps=1)
    steps = 3 if quick else 5
    data_dir = synthetic_data(os.path.join(work, "phase-data"), 50277, 100_000)
    kw = json.dumps({k: v for k, v in shape.items() if k != "vocab_size"} | {"vocab_size": shape["vocab_size"]})
    emb = child("phase_memory", data_dir, os.path.join(work, "phase-emb"), 1.0, 2, kw)
    full = child("phase_memory", data_dir, os.path.join(work, "phase-full"), 0.0, 2, kw)
    step_s = child("phase_time", json.dumps({k: shape[k] for k in (*PYTHIA_160M, "batch_size", "block_size")}),
                   steps)

    # the prediction. Time: the step's matmul FLOPs at the rate this machine's GEMM reaches at this shape (tokens x d
    # times d x 4d), plus AdamW's bytes at the measured bandwidth. Memory: fp32 weights, plus gradients and two Adam
    # moments of what trains, plus the activations autograd saves for the backward pass (counted on the meta device)
    # and the logits' gradient
    B, T = shape["batch_size"], shape["block_size"]
    x, w = torch.randn(B * T, shape["n_embd"]), torch.randn(shape["intermediate_size"], shape["n_embd"])
    gemm = 2 * x.shape[0] * w.shape[0] * w.shape[1] / timed(lambda: x @ w.T, 5)
    bw = memory_bandwidth()
    predicted = {}
    for phase, frozen in (("embedding", True), ("full", False)):
        model = meta_model(shape, frozen)
        n_all = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        adam_bytes = 4 * 7 * n_train  # read weight, grad, 2 moments; write weight, 2 moments (fp32)
        predicted[phase] = {"step_s": model.flops_per_token(T) * B * T / gemm + adam_bytes / bw,
                            "bytes": 4 * (n_all + 3 * n_train) + saved_activation_bytes(model, B, T)
                            + 4 * B * T * shape["vocab_size"]}
    t_emb, t_full = predicted["embedding"]["step_s"], predicted["full"]["step_s"]
    m_emb, m_full = predicted["embedding"]["bytes"], predicted["full"]["bytes"]
    return {"shape": shape, "embedding_step_s": step_s["embedding"], "full_step_s": step_s["full"],
            "embedding_peak_bytes": emb["peak_bytes"], "full_peak_bytes": full["peak_bytes"],
            "time_ratio": step_s["embedding"] / step_s["full"], "time_ratio_predicted": t_emb / t_full,
            "memory_ratio": emb["peak_bytes"] / full["peak_bytes"], "memory_ratio_predicted": m_emb / m_full,
            "predicted": predicted, "gemm_flops": gemm, "bandwidth": bw}


# -----------------------------------------------------------------------------
# 3. clp.py against the original per-token loop

def clp_child(V_h, V_s, d_h, d_s, n_shared):
    """clp.py's clp_embeddings on random matrices of the given sizes: its fastest of two runs and its extra memory."""
    import clp

    V_h, V_s, d_h, d_s, n_shared = map(int, (V_h, V_s, d_h, d_s, n_shared))
    g = torch.Generator().manual_seed(0)
    # helper rows: a shared direction plus noise, the anisotropy trained embedding spaces have
    helper = torch.randn(V_h, d_h, generator=g) + 2.0 * torch.randn(d_h, generator=g)
    src_in, src_out = torch.randn(V_s, d_s, generator=g) * 0.02, torch.randn(V_s, d_s, generator=g) * 0.02
    perm = torch.randperm(V_h, generator=g)
    shared_helper, missing = perm[:n_shared], perm[n_shared:]
    shared_src = torch.randperm(V_s, generator=g)[:n_shared]
    clp.clp_embeddings([src_in, src_out], helper, clp.Match(shared_src, shared_helper, missing[:2048], V_s))  # warm-up
    match = clp.Match(shared_src, shared_helper, missing, V_s)
    base = rss()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        clp.clp_embeddings([src_in, src_out], helper, match)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": min(times), "extra_peak_bytes": peak - base}


def vendored_tokenizers(work):
    """The real Pythia tokenizer and GPT-2's vocab.json + merges.txt, unpacked from tests/data into work."""
    import gzip

    paths = {"pythia": os.path.join(work, "pythia-tokenizer.json"), "gpt2": os.path.join(work, "gpt2")}
    os.makedirs(paths["gpt2"], exist_ok=True)
    for gz, dst in ((PYTHIA_TOKENIZER_GZ, paths["pythia"]),
                    *((os.path.join(TESTDATA, "tokenizers", f"gpt2-{n}.gz"), os.path.join(paths["gpt2"], n))
                      for n in ("vocab.json", "merges.txt"))):
        with gzip.open(gz, "rb") as f, open(dst, "wb") as out:
            shutil.copyfileobj(f, out)
    return paths


def bench_fvt(work):
    """clp.py's FVT at Pythia scale, its two steps timed apart: the source tokenizer's encode_batch over the target's
    new tokens, and the sparse averaging products for the input and the output matrix."""
    import clp
    from common import load_tokenizer

    paths = vendored_tokenizers(work)
    source_tok, target_tok = load_tokenizer(paths["pythia"]), load_tokenizer(paths["gpt2"])
    source_vocab = source_tok.get_vocab(with_added_tokens=True)
    new = [t for t in target_tok.get_vocab(with_added_tokens=True) if t not in source_vocab]
    g = torch.Generator().manual_seed(0)
    matrices = [(torch.randn(50304, 1024, generator=g) * 0.02).half() for _ in range(2)]
    t0 = time.perf_counter()
    pieces, _ = clp.fvt_pieces(new, source_tok)
    t1 = time.perf_counter()
    clp.fvt_embeddings(matrices, [p for p in pieces if p])
    t2 = time.perf_counter()
    return {"new_tokens": len(new), "mean_pieces": sum(map(len, pieces)) / len(pieces), "tokenize_seconds": t1 - t0,
            "products_seconds": t2 - t1, "seconds": t2 - t0}


def original_loop(source, helper, shared_src, shared_helper, missing):
    """The original clp.py's algorithm (malteos/clp-transfer), per token in Python: cosine similarities of the token
    to every shared token in the helper space, normalised by their sum, and np.average of the shared source rows."""
    H = helper.numpy()
    overlap_h = H[shared_helper.numpy()]
    overlap_h = overlap_h / np.linalg.norm(overlap_h, axis=1, keepdims=True)
    S = source.numpy()[shared_src.numpy()]
    out = {}
    for t in missing.tolist():
        h = H[t] / np.linalg.norm(H[t])
        sims = overlap_h @ h
        w = sims / sims.sum()
        out[t] = np.average(S, axis=0, weights=w)
    return out


def bench_clp(quick):
    V_h, V_s, d_h, d_s = 50257, 50304, 768, 1024
    n_shared = V_h // 2
    ours = child("clp", V_h, V_s, d_h, d_s, n_shared)
    # the loop on a subset of the missing tokens, scaled to all of them (input and output embeddings: two passes)
    g = torch.Generator().manual_seed(0)
    helper = torch.randn(V_h, d_h, generator=g) + 2.0 * torch.randn(d_h, generator=g)
    source = torch.randn(V_s, d_s, generator=g) * 0.02
    perm = torch.randperm(V_h, generator=g)
    subset = 20 if quick else 100
    t0 = time.perf_counter()
    original_loop(source, helper, torch.randperm(V_s, generator=g)[:n_shared], perm[:n_shared],
                  perm[n_shared:n_shared + subset])
    per_token = (time.perf_counter() - t0) / subset
    loop_seconds = 2 * per_token * (V_h - n_shared)
    # the FLOPs clp.py's dense path needs: per matrix, the shared helper^T @ source product and one product per
    # missing row (the similarity sum and the norms are lower order)
    flops = 2 * (2 * n_shared * d_h * d_s + 2 * (V_h - n_shared) * d_h * d_s)
    gemm = peak_matmul_flops()
    return {"vocab": V_h, "shared": n_shared, "width": d_s, "helper_width": d_h, "clp_seconds": ours["seconds"],
            "clp_extra_peak_bytes": ours["extra_peak_bytes"], "loop_seconds_scaled": loop_seconds,
            "loop_tokens_timed": subset, "speedup": loop_seconds / ours["seconds"], "flops": flops,
            "matmul_seconds_at_peak": flops / gemm, "vs_matmul_time": ours["seconds"] / (flops / gemm)}


# -----------------------------------------------------------------------------
# 4. data.py against a bare tokenizers loop


def bench_data(work, quick):
    """German ELTeC text (as JSON lines, repeated to ~30 MiB; ~10 MiB with --quick), the Pythia tokenizer."""
    import data
    from common import load_tokenizer

    eltec = os.path.join(os.environ["ELTEC_DIR"], "deu") if os.environ.get("ELTEC_DIR") else None
    folder = eltec or os.path.join(TESTDATA, "eltec", "deu")
    novels = sorted(glob.glob(os.path.join(folder, "*.xml")) + glob.glob(os.path.join(folder, "*.xml.gz")))
    if not novels:
        raise UserError(f"{folder}: no German ELTeC novels (*.xml, *.xml.gz) there (ELTEC_DIR={eltec and eltec[:-4]})")
    tokenizer_file = vendored_tokenizers(work)["pythia"]
    docs = [p for f in novels for p in data.read_tei(f).split("\n") if p]  # paragraphs as documents
    repeat = max(1, round(DATA_MIB[quick] * 2**20 / sum(len(d.encode()) + 12 for d in docs)))
    path = os.path.join(work, "corpus.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    size = os.path.getsize(path)
    texts = [d for _ in range(repeat) for d in docs]
    tok = load_tokenizer(tokenizer_file)
    tok.encode_batch(texts[:1000])  # warm the thread pool
    t0 = time.perf_counter()
    n_tokens, batch, nbytes = 0, [], 0
    for t in texts:  # the ceiling: encode_batch over ~1 MiB batches of the same text, nothing else
        batch.append(t)
        nbytes += len(t)
        if nbytes >= 1 << 20:
            n_tokens += sum(len(e.ids) for e in tok.encode_batch(batch))
            batch, nbytes = [], 0
    n_tokens += sum(len(e.ids) for e in tok.encode_batch(batch)) + len(texts)  # + one eos per document
    bare = time.perf_counter() - t0
    out_dir = os.path.join(work, "data-out")
    t0 = time.perf_counter()
    meta = data.prepare([path], out_dir, tokenizer_file, subsample_size_mb=size / 2**20 * 0.9, valid_percent=5,
                        override=True, progress=False)
    ours = time.perf_counter() - t0
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    return {"text": os.path.relpath(folder, HERE) if not eltec else folder, "repeat": repeat,
            "mib": size / 2**20, "tokens": tokens, "data_tokens_per_s": tokens / ours,
            "data_mib_per_s": size / 2**20 / ours, "bare_tokens_per_s": n_tokens / bare,
            "ratio": (tokens / ours) / (n_tokens / bare)}


# -----------------------------------------------------------------------------
# 5. GPU: MFU at Pythia shapes


def bench_gpu(work, quick):
    if not torch.cuda.is_available():
        return None
    results = {}
    for name, shape, batch in (("pythia-160m", PYTHIA_160M, 16), ("pythia-410m", PYTHIA_410M, 8)):
        data_dir = synthetic_data(os.path.join(work, f"gpu-data-{name}"), 50277, 4_000_000)
        out_dir = os.path.join(work, f"gpu-{name}")
        kw = dict(shape, block_size=2048, batch_size=batch, gradient_accumulation_steps=1)
        r = child("train_run", data_dir, out_dir, "bfloat16", 20, json.dumps(kw | {"compile": True}))
        results[name] = gpu_figures(os.path.join(out_dir, "metrics.jsonl"), r["tokens_per_s"],
                                    torch.cuda.get_device_name(), batch)
    return results


def gpu_figures(metrics_path, tokens_per_s, device, batch):
    """A GPU run's figures: the median MFU of its steps after the first five (compile, warm-up); on a card whose peak
    train.PEAK_FLOPS does not know the steps have no MFU, and it is null with the reason."""
    rows = [json.loads(line) for line in open(metrics_path) if '"dt_s"' in line][5:]
    mfu = [x["mfu"] for x in rows if "mfu" in x]
    figures = {"tokens_per_s": tokens_per_s, "mfu": statistics.median(mfu) if mfu else None, "batch": batch,
               "block_size": 2048, "device": device}
    if not mfu:
        figures["mfu_skipped"] = f"peak FLOPS of {device} unknown (train.PEAK_FLOPS; device_peak_flops sets it)"
    return figures


# -----------------------------------------------------------------------------
# 6. FSDP against DDP: memory per rank


def proc_status(field):
    """A /proc/self/status figure in bytes (VmRSS: now; VmHWM: the peak since the last reset)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) * 1024


def fsdp_memory_child(parallelism, shape, steps):
    """(Under torchrun, 2 CPU processes.) train.py's own pieces (build_model, wrap, train_step, its AdamW) for a few
    steps: the largest per-rank peak RSS during the steps over the RSS before the model was built (model, gradients,
    optimizer state, activations; not the one-off load on rank 0), the parameter and optimizer-state bytes a rank
    holds, and tokens/s over the steps after the first (the slowest rank's time). Prints on rank 0 only."""
    import torch.distributed as dist

    import train

    cfg = train.TrainConfig(parallelism=parallelism, init_from="scratch", dtype="float32", device="cpu",
                            backend="gloo", **json.loads(shape), block_size=128)
    rt = train.setup_processes(cfg)
    base = proc_status("VmRSS")  # the interpreter, torch and gloo
    model, _, _ = train.build_model(cfg, meta={"vocab_size": cfg.vocab_size, "eos_token_id": 0}, checkpoint=None,
                                    rt=rt)
    optimizer = train.configure_optimizer(model, cfg=cfg, device_type="cpu")
    wrapped = train.wrap(model, cfg=cfg, rt=rt)
    with open("/proc/self/clear_refs", "w") as f:  # the peak from here on: training, not loading
        f.write("5")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for i in range(int(steps)):
        x = torch.randint(0, cfg.vocab_size, (1, 129))
        if i == 1:  # the first step builds the optimizer state: not timed
            t0 = time.perf_counter()
        train.train_step(model=wrapped, raw_model=model, optimizer=optimizer, scaler=scaler,
                         batches=[(x[:, :-1], x[:, 1:])], lr=cfg.learning_rate, grad_clip=cfg.grad_clip, rt=rt)
    seconds = time.perf_counter() - t0
    mine = torch.tensor([proc_status("VmHWM") - base, train.local_bytes(model.parameters()),
                         train.optimizer_state_bytes(optimizer), seconds],
                        dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    train.leave_process_group(rt, model=wrapped)
    if rt.master:
        return {"peak_growth_bytes": mine[0].item(), "param_bytes": mine[1].item(),
                "optimizer_state_bytes": mine[2].item(),
                "tokens_per_s": rt.world_size * cfg.block_size * (int(steps) - 1) / mine[3].item()}
    return None


# what fits where: train.py's memory by its own accounting, for the Pythia suite and the Llama-family models people
# adapt, on 80 GB cards. Each shape is its hub config.json's (hidden_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings) in model.py's names.
def llama(model_type, n_embd, n_layer, n_head, n_kv_head, intermediate_size, vocab_size, tie_word_embeddings):
    return dict(model_type=model_type, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                intermediate_size=intermediate_size, vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings)


FITS_MODELS = {
    "pythia-410m": dict(n_layer=24, n_head=16, n_embd=1024, vocab_size=50304),
    "pythia-1.4b": dict(n_layer=24, n_head=16, n_embd=2048, vocab_size=50304),
    "pythia-2.8b": dict(n_layer=32, n_head=32, n_embd=2560, vocab_size=50304),
    "pythia-6.9b": dict(n_layer=32, n_head=32, n_embd=4096, vocab_size=50432),
    "pythia-12b": dict(n_layer=36, n_head=40, n_embd=5120, vocab_size=50688),
    "Qwen2.5-0.5B": llama("qwen2", 896, 24, 14, 2, 4864, 151936, True),
    "Qwen2.5-1.5B": llama("qwen2", 1536, 28, 12, 2, 8960, 151936, True),
    "Qwen2.5-7B": llama("qwen2", 3584, 28, 28, 4, 18944, 152064, False),
    "Llama-3.2-1B": llama("llama", 2048, 16, 32, 8, 8192, 128256, True),
    "Llama-3.2-3B": llama("llama", 3072, 28, 24, 8, 8192, 128256, True),
    "Llama-3.1-8B": llama("llama", 4096, 32, 32, 8, 14336, 128256, False),
}


class FlashAttentionMemory(torch.autograd.Function):
    """A stand-in for scaled_dot_product_attention in a memory trace: what flash attention (SDPA on a GPU) keeps for
    backward, q, k, v, the output and an fp32 log-sum-exp per row. The math path a meta-device trace takes would keep
    the T x T attention matrix instead."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


def flash_attention_memory(q, k, v, is_causal=True, enable_gqa=False):
    """(grouped-query attention: k and v keep their n_kv_head heads, as the flash kernel reads them in place)"""
    return FlashAttentionMemory.apply(q, k, v)


def memory_model(shape, dtype="bfloat16", block_size=2048):
    """train.py's training memory, per parameter and per token, from its own code (any family: `shape` holds model.py
    config fields, model_type among them; none: GPT-NeoX with a 4x MLP): parameters counted on the meta
    device, the activations autograd saves for backward traced there (at two lengths: the slope is per token), with
    and without activation checkpointing, plus the loss's transient logits (model.Head: one chunk of positions at a
    time, its logits in the compute dtype, their fp32 copy and fp32 gradient). The model is traced in `dtype` (autocast
    does not act on the meta device; on a GPU it keeps a few ops in fp32: an approximation), the logits upcast for
    the loss as in train.py, attention as flash attention keeps it. Returns n_params, the largest FSDP group and a
    block's parameters, and activation bytes per token (plain; checkpointed, which includes one block recomputed in
    backward)."""
    import train

    neox_mlp = {} if "model_type" in shape else {"intermediate_size": 4 * shape["n_embd"]}
    config = config_from_dict({**neox_mlp, **shape, "block_size": block_size})
    per_token = {}
    for checkpointed in (False, True):
        with torch.device("meta"):
            model = model_from_config(config).to(torch_dtype(dtype))
        if checkpointed:
            train.apply_activation_checkpointing(model)
        with unittest.mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", flash_attention_memory):
            half, full = [saved_activation_bytes(model, 1, t) for t in (block_size // 2, block_size)]
        per_token[checkpointed] = (full - half) / (block_size - block_size // 2)
    per_block = (per_token[False] - per_token[True]) / config.n_layer  # what one block keeps, per token
    block = sum(p.numel() for p in model.blocks()[0].parameters())
    return {"n_params": sum(p.numel() for p in model.parameters()), "block_params": block,
            "largest_group": max(model.input_embeddings().weight.numel(), model.output_embeddings().weight.numel(),
                                 block),
            "activation_bytes_per_token": per_token[False],
            "checkpointed_activation_bytes_per_token": per_token[True] + per_block,
            "loss_bytes_per_token": (torch_dtype(dtype).itemsize + 8) * config.vocab_size,
            "loss_chunk_tokens": model_module.LOSS_CHUNK_TOKENS}


def bytes_per_gpu(m, parallelism, world_size, checkpointed, tokens, param_bytes=2):
    """Peak bytes of one rank for a step of `tokens` tokens per micro-batch: fp32 master weights, fp32 gradients and
    AdamW's two fp32 moments (16 B per parameter; FSDP: 1/world_size of them); under DDP autocast's weight copies
    in a 2-byte dtype (param_bytes each, kept for backward), under FSDP the largest group unsharded with its
    unsharded gradient (param_bytes each: the compute dtype's) and an fp32 reduce buffer, and the next block
    prefetched; the activations; the loss's logits (one chunk of at most loss_chunk_tokens positions)."""
    states = 16 * m["n_params"] / (world_size if parallelism == "fsdp" else 1)
    if parallelism == "fsdp":
        transient = m["largest_group"] * (2 * param_bytes + 4) + m["block_params"] * param_bytes
    else:
        transient = m["n_params"] * param_bytes if param_bytes < 4 else 0
    per_token = m["checkpointed_activation_bytes_per_token" if checkpointed else "activation_bytes_per_token"]
    return states + transient + per_token * tokens + m["loss_bytes_per_token"] * min(tokens, m["loss_chunk_tokens"])


def what_fits(card_bytes=80e9, world_size=8, block_size=2048, usable=0.9):
    """For each model of FITS_MODELS: the largest micro-batch (sequences of block_size) one rank fits in `usable` of a
    card, under DDP and under FSDP over world_size GPUs, without and with activation checkpointing (0: does not fit).
    A tied model's one embedding matrix is one FSDP group with the head (train.apply_fsdp)."""
    rows = {}
    for name, shape in FITS_MODELS.items():
        m = memory_model(shape, block_size=block_size)
        fits = {}
        for parallelism in ("ddp", "fsdp"):
            for checkpointed in (False, True):
                def need(n):  # bytes of a micro-batch of n sequences
                    return bytes_per_gpu(m, parallelism, world_size, checkpointed, n * block_size)

                k = -(-m["loss_chunk_tokens"] // block_size)  # from k sequences on, the loss chunk is full
                per_seq = need(k + 1) - need(k)
                fixed = need(k) - k * per_seq
                fits[f"{parallelism}{'+ac' if checkpointed else ''}"] = max(0, int((usable * card_bytes - fixed)
                                                                                 // per_seq))
        rows[name] = {**m, "ddp_state_bytes_per_gpu": bytes_per_gpu(m, "ddp", world_size, False, 0),
                      "fsdp_state_bytes_per_gpu": bytes_per_gpu(m, "fsdp", world_size, False, 0),
                      "max_micro_batch": fits}
    return rows


def bench_fsdp(quick):
    """fsdp_memory_child under DDP and under FSDP: FSDP should need about half; the unsharded group in flight, its
    gradients and the activations make it somewhat more. Its tokens/s is reported, not judged: on CPU gloo the
    all-gathers and reduce-scatters cost what NVLink hides."""
    shape = dict(PYTHIA_160M, n_layer=4) if quick else PYTHIA_160M
    results = {}
    for parallelism in ("ddp", "fsdp"):  # a fixed mmap threshold: freed tensors go back to the system, RSS shows
        results[parallelism] = child("fsdp_memory", parallelism, json.dumps(shape), 2 if quick else 3, nproc=2,
                                     env={"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 17)})
    results["ratio"] = results["fsdp"]["peak_growth_bytes"] / results["ddp"]["peak_growth_bytes"]
    results["tokens_per_s_ratio"] = results["fsdp"]["tokens_per_s"] / results["ddp"]["tokens_per_s"]
    m = memory_model(shape, "float32", 128)  # the memory model's figures for this run (fp32, 1 x 128 tokens)
    for parallelism in ("ddp", "fsdp"):
        results[parallelism]["predicted_bytes"] = bytes_per_gpu(m, parallelism, 2, False, 128, param_bytes=4)
    results["ratio_predicted"] = results["fsdp"]["predicted_bytes"] / results["ddp"]["predicted_bytes"]
    results["shape"] = shape
    return results


# -----------------------------------------------------------------------------

CHILDREN = {"train_run": train_run_child, "train_vs_hf": train_vs_hf_child, "phase_memory": phase_memory_child,
            "phase_time": phase_time_child, "clp": clp_child, "fsdp_memory": fsdp_memory_child}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer steps (a smoke test, not figures)")
    p.add_argument("--only", default="train,phases,clp,data,gpu,fsdp,fits", help="comma-separated parts to run")
    p.add_argument("--out", default="out/bench")
    p.add_argument("--child", choices=CHILDREN, help="(internal) run one measurement in this process, print JSON")
    p.add_argument("child_args", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        out = CHILDREN[args.child](*args.child_args)
        if out is not None:  # (under torchrun: rank 0's)
            print(json.dumps(out))
        return None
    parts = set(args.only.split(","))
    unknown = parts - {"train", "phases", "clp", "data", "gpu", "fsdp", "fits"}
    if unknown:
        raise UserError(f"--only: unknown parts {', '.join(sorted(unknown))} (known: train, phases, clp, data, gpu, "
                        "fsdp, fits)")
    result = {"machine": machine(), "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        if "train" in parts:
            print("train step: train.py against transformers + AdamW ...", flush=True)
            result["train"] = bench_train(work, args.quick)
            result["train_vs_hf_tokens_per_s"] = {d: result["train"][d]["ratio"] for d in ("float32", "bfloat16")}
            print("train step, Llama family: train.py against transformers' LlamaForCausalLM + AdamW ...", flush=True)
            result["train_llama"] = bench_train(work, args.quick, family="llama")
            result["train_vs_hf_tokens_per_s_llama"] = {d: result["train_llama"][d]["ratio"]
                                                        for d in ("float32", "bfloat16")}
        if "phases" in parts:
            print("embedding phase against full phase ...", flush=True)
            ph = result["phases"] = bench_phases(work, args.quick)
            result["embedding_vs_full_step_time"] = ph["time_ratio"]
            result["embedding_vs_full_peak_memory"] = ph["memory_ratio"]
        if "clp" in parts:
            print("clp.py against the per-token loop ...", flush=True)
            result["clp"] = bench_clp(args.quick)
            result["clp_speedup_vs_loop"] = result["clp"]["speedup"]
            result["clp"]["fvt"] = bench_fvt(work)
            result["fvt_seconds"] = result["clp"]["fvt"]["seconds"]
        if "data" in parts:
            print("data.py against bare tokenizers ...", flush=True)
            try:
                result["data"] = bench_data(work, args.quick)
            except UserError as e:  # what could not be measured: null and the reason, the other figures kept
                result["data"] = {"skipped": str(e)}
            result["data_vs_tokenizers_ceiling"] = result["data"].get("ratio")
        if "gpu" in parts:
            gpu = bench_gpu(work, args.quick)
            result["gpu"] = gpu if gpu else {"skipped": "no CUDA device"}
            result["mfu"] = {k: v["mfu"] for k, v in gpu.items()} if gpu else None  # null: see gpu.skipped
            result["tokens_per_s"] = {k: v["tokens_per_s"] for k, v in gpu.items()} if gpu else None
        if "fsdp" in parts:
            print("FSDP against DDP, memory per rank (2 processes) ...", flush=True)
            result["fsdp"] = bench_fsdp(args.quick)
            result["fsdp_vs_ddp_peak_memory_per_rank"] = result["fsdp"]["ratio"]
            result["fsdp_vs_ddp_tokens_per_s"] = result["fsdp"]["tokens_per_s_ratio"]
        if "fits" in parts:
            print("what fits on 80 GB cards (the memory model) ...", flush=True)
            result["what_fits"] = what_fits()
    path = os.path.join(args.out, "bench.json")
    write_json(path, result)
    print(table(result))
    print(f"wrote {path}")
    return result


def table(r):
    m = r["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}, torch {m['torch']}, {m['date']}",
             f"{'measure':<44} {'value':>10}  detail"]

    def row(name, value, detail=""):
        lines.append(f"{name:<44} {value:>10}  {detail}")

    for part, key in (("train", "train_vs_hf_tokens_per_s"), ("train_llama", "train_vs_hf_tokens_per_s_llama")):
        for d in ("float32", "bfloat16") if part in r else ():
            t = r[part][d]
            if t["ratio"] is None:
                row(f"{key} ({d})", "null", t["skipped"])
                continue
            row(f"{key} ({d})", f"{t['ratio']:.2f}",
                f"ours {t['ours_tokens_per_s']:,.0f} tok/s, transformers {t['hf_tokens_per_s']:,.0f} tok/s")
    if "phases" in r:
        ph = r["phases"]
        row("embedding_vs_full_step_time", f"{ph['time_ratio']:.2f}",
            f"{ph['embedding_step_s']:.2f} s vs {ph['full_step_s']:.2f} s; predicted {ph['time_ratio_predicted']:.2f}")
        row("embedding_vs_full_peak_memory", f"{ph['memory_ratio']:.2f}",
            f"{ph['embedding_peak_bytes'] / 2**30:.2f} GiB vs {ph['full_peak_bytes'] / 2**30:.2f} GiB; predicted "
            f"{ph['memory_ratio_predicted']:.2f} (weights, grads, Adam state, saved activations)")
    if "clp" in r:
        c = r["clp"]
        row("clp_speedup_vs_loop", f"{c['speedup']:,.0f}",
            f"clp.py {c['clp_seconds']:.2f} s ({c['clp_extra_peak_bytes'] / 2**30:.2f} GiB extra), loop "
            f"{c['loop_seconds_scaled']:,.0f} s (scaled from {c['loop_tokens_timed']} tokens); "
            f"{c['vs_matmul_time']:.2f}x the matmul time of its FLOPs")
        f = c["fvt"]
        row("fvt_seconds", f"{f['seconds']:.2f}",
            f"{f['new_tokens']:,} new tokens (GPT-2's against Pythia's), {f['mean_pieces']:.2f} source pieces each: "
            f"encode_batch {f['tokenize_seconds']:.2f} s, products {f['products_seconds']:.2f} s (50,304 x 1,024, in "
            "and out)")
    if "data" in r and "skipped" in r["data"]:
        row("data_vs_tokenizers_ceiling", "null", r["data"]["skipped"])
    elif "data" in r:
        d = r["data"]
        row("data_vs_tokenizers_ceiling", f"{d['ratio']:.2f}",
            f"data.py {d['data_tokens_per_s']:,.0f} tok/s ({d['data_mib_per_s']:.1f} MiB/s), bare encode_batch "
            f"{d['bare_tokens_per_s']:,.0f} tok/s")
    if "gpu" in r:
        if "skipped" not in r["gpu"]:
            for k, v in r["gpu"].items():
                row(f"mfu {k} (bf16, compile, T=2048)", "null" if v["mfu"] is None else f"{v['mfu']:.1%}",
                    f"{v['tokens_per_s']:,.0f} tok/s on {v['device']}" + (f"; {v['mfu_skipped']}" if v["mfu"] is None
                                                                          else ""))
        else:
            row("mfu / tokens_per_s (GPU)", "null", "no CUDA device")
    if "fsdp" in r:
        f = r["fsdp"]
        row("fsdp_vs_ddp_peak_memory_per_rank", f"{f['ratio']:.2f}",
            f"peak RSS growth {f['fsdp']['peak_growth_bytes'] / 2**30:.2f} GiB vs "
            f"{f['ddp']['peak_growth_bytes'] / 2**30:.2f} GiB; parameters + Adam state per rank "
            f"{(f['fsdp']['param_bytes'] + f['fsdp']['optimizer_state_bytes']) / 2**30:.2f} GiB vs "
            f"{(f['ddp']['param_bytes'] + f['ddp']['optimizer_state_bytes']) / 2**30:.2f} GiB; the memory model "
            f"predicts {f['fsdp']['predicted_bytes'] / 2**30:.2f} vs {f['ddp']['predicted_bytes'] / 2**30:.2f} GiB "
            f"({f['ratio_predicted']:.2f})")
        row("fsdp_vs_ddp_tokens_per_s", f"{f['tokens_per_s_ratio']:.2f}",
            f"{f['fsdp']['tokens_per_s']:,.0f} against {f['ddp']['tokens_per_s']:,.0f} tok/s (2 ranks, 1 x 128 tokens "
            "each; gloo on CPU: no floor)")
    for name, m in r.get("what_fits", {}).items():
        row(f"what_fits {name}", f"{m['n_params'] / 1e9:.2f}B",
            "max micro-batch x 2048 per 80 GB rank: " + ", ".join(f"{k} {v}" for k, v in m["max_micro_batch"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
