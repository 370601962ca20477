"""
The whole study at toy scale, on a CPU: `make demo` (about 34 minutes on 2 CPU cores; it downloads the novels once)
or `make demo DEMO=quick` (about 80 seconds, offline: the test suite's end-to-end run). `make demo DEMO=init`
(DEMO=init-quick: its small size) compares the initialisations instead: random, mean, FVT, CLP, CLP with the fallback
and CLP+ (sparsemax), same budget; the runs it shares with `make demo` are trained once (same out directory), and it
writes report-init.md and ppl_curves-init.png.

1. data: English and German ELTeC novels (config/demo_eltec.tsv: files, sha256, public URLs at pinned commits; with
   ELTEC_DIR set, a local copy is read instead; the quick modes without it read the slices of some of them vendored
   in tests/data/eltec, so they run offline), a byte-level BPE per language, token files. Validation: the first
   characters of each held-out novel (the same slices score every variant below).
2. pre-train a small English source model and a smaller German helper model from scratch.
3. initialise German targets from the source: CLP (clp.py, with and without --extrapolation_fallback), the
   random-init baseline (clp.py --random_init), and a from-scratch model of the same architecture.
4. train every German variant on the same token budget: from scratch; random embeddings + source body; CLP with the
   paper's formula; CLP with the extrapolation fallback (clp.py --extrapolation_fallback); from that start, the
   embedding phase (10%), and the embedding phase with variable batch size.
5. evaluate each on the held-out German slices (eval.py: word perplexity, bits per byte) before and after training,
   and write out/demo/report.md and out/demo/ppl_curves.png.

Each finished stage is kept: a rerun skips it (a training run that was interrupted resumes from its checkpoint).

`--arch llama` (make demo ARCH=llama) runs any mode with Llama-shaped models instead of GPT-NeoX ones: the source and
the helper are Llamas (RMSNorm, SwiGLU, full rotary, half as many key/value heads as query heads, one tied matrix
for the embedding and the head), and so every German target built from the source; the data and tokenizers are the
same. Its stages go to their own directory (out/demo-llama, out/demo-quick-llama).

`make demo DEMO=study` (DEMO=study-quick: its small size; docs/study.md) answers the study's own two questions with
error bars: every regime it compared, at three seeds or more (--seeds), on one German budget (--tokens) from the
demo's source, helper and initialisations, and which differences exceed the seeds' spread: report-study.md and
ppl_curves-study.png.
"""

import argparse
import dataclasses
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

import clp
import data
import eval as evaluation
import train as trainer
import train_variable_bs
from bench import machine
from common import (UserError, atomic_dir, atomic_path, load_tokenizer, read_json, round_up, run_cli, save_tokenizer,
                    sha256_file, write_json)
from model import CausalLM, model_from_config

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST = os.path.join(HERE, "config", "demo_eltec.tsv")
SLICES = os.path.join(HERE, "tests", "data", "eltec")  # the vendored slices (and their MANIFEST.tsv): quick, offline

# the two settings: sizes and budgets beyond the config files (config/demo_*.py hold the default)
MODES = {
    "default": dict(vocab_size=4096, heldout_chars=100_000, train_novels=None, source=[], helper=[], target=[]),
    "quick": dict(
        vocab_size=1024, heldout_chars=15_000, train_novels=3,
        source=["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=8",
                "--max_tokens=150000", "--eval_interval=50", "--eval_iters=4"],
        helper=["--n_layer=1", "--n_head=1", "--n_embd=32", "--block_size=64", "--batch_size=8",
                "--max_tokens=100000", "--eval_interval=50", "--eval_iters=4"],
        target=["--block_size=64", "--batch_size=8",
                "--max_tokens=60000", "--eval_interval=10", "--eval_iters=4"]),
}

# name, label, initial model, entry point, extra train.py arguments
VARIANTS = [
    ("scratch", "from scratch", "init-scratch", "train.py", []),
    ("random", "random embeddings + source body", "init-random", "train.py", []),
    ("clp", "CLP (the paper's formula)", "init-clp", "train.py", []),
    # the tiny helper's nearly isotropic embedding space gives some tokens a similarity sum just above zero, whose
    # weights extrapolate (clp_report.json: extrapolated_rows); clp.py --extrapolation_fallback averages them over
    # their positive similarities instead, and the training regimes start from that initialisation
    ("clp_guarded", "CLP + extrapolation fallback", "init-clp-guarded", "train.py", []),
    ("clp_et", "CLP (fallback) + embedding phase (10%)", "init-clp-guarded", "train.py",
     ["--embedding_tuning_frac=0.1"]),
    ("clp_et_vbs", "CLP (fallback) + embedding phase + variable batch size", "init-clp-guarded",
     "train_variable_bs.py", ["--embedding_tuning_frac=0.1", "--embedding_batch_size=2"]),
]
# DEMO=init: every initialisation, plain training; from scratch is the yardstick
INIT_VARIANTS = [v for v in VARIANTS if v[0] in ("scratch", "random")] + [
    ("mean", "mean of the source rows", "init-mean", "train.py", []),
    ("fvt", "FVT (mean of the source pieces)", "init-fvt", "train.py", []),
] + [v for v in VARIANTS if v[0] in ("clp", "clp_guarded")] + [
    ("clp_plus", "CLP+ (sparsemax)", "init-clp-plus", "train.py", []),
]
# the initial models: directory -> (stage, clp.apply_clp options); from scratch is scratch_init's
INITS = {
    "init-clp": ("CLP initialisation", {}),
    "init-clp-guarded": ("CLP initialisation, --extrapolation_fallback", dict(extrapolation_fallback=True)),
    "init-random": ("random-init baseline", dict(random_init=True)),
    "init-mean": ("mean initialisation (--method mean)", dict(method="mean")),
    "init-fvt": ("FVT initialisation (--method fvt)", dict(method="fvt")),
    "init-clp-plus": ("CLP+ initialisation (--weighting sparsemax)", dict(weighting="sparsemax")),
    "init-extend": ("extension: the source's tokenizer + German tokens (--extend, CLP with the fallback)",
                    dict(extrapolation_fallback=True)),  # + extend=mode["extend"]
}
# DEMO=init and init-quick: the sizes of default and quick, the other variants, their own report
MODES["init"] = dict(MODES["default"], variants=INIT_VARIANTS, out="out/demo", suffix="-init")
MODES["init-quick"] = dict(MODES["quick"], variants=INIT_VARIANTS, out="out/demo-quick", suffix="-init")

# DEMO=extend and extend-quick: extend the English vocabulary with German tokens (clp.py --extend, CLP with the
# fallback for the appended rows) instead of replacing it, against CLP's replacement on the same German budget, both
# with the 10% embedding phase; the extension's phase trains the appended rows alone, or every row
EXTEND_VARIANTS = [
    next(v for v in VARIANTS if v[0] == "clp_et"),
    ("extend_new_rows", "extension + embedding phase on the new rows only", "init-extend", "train.py",
     ["--embedding_tuning_frac=0.1", "--train_new_rows_only=True"]),
    ("extend", "extension + embedding phase on every row", "init-extend", "train.py",
     ["--embedding_tuning_frac=0.1"]),
]
MODES["extend"] = dict(MODES["default"], variants=EXTEND_VARIANTS, out="out/demo", suffix="-extend", extend=2048)
MODES["extend-quick"] = dict(MODES["quick"], variants=EXTEND_VARIANTS, out="out/demo-quick", suffix="-extend",
                             extend=512)
DATA_OF_INIT = {"init-extend": "data-deu-extend"}  # German token files of an init whose tokenizer is not the helper's

# DEMO=study: the regimes the study compared, each at several seeds, on one German budget from the same source body,
# helper and tokenizer (VARIANTS' shape). The CLP runs start where the demo's training regimes do (CLP with the
# extrapolation fallback); from_clp_plus and from_fvt repeat the best of them from CLP+ and from FVT (script and
# arguments None: the best's).
STUDY_REGIMES = [
    ("baseline", "regular pre-training (one phase)", "init-clp-guarded", "train.py", []),
    ("et5", "embedding phase 5%", "init-clp-guarded", "train.py", ["--embedding_tuning_frac=0.05"]),
    ("et10", "embedding phase 10%", "init-clp-guarded", "train.py", ["--embedding_tuning_frac=0.1"]),
    ("et25", "embedding phase 25%", "init-clp-guarded", "train.py", ["--embedding_tuning_frac=0.25"]),
    ("et50", "embedding phase 50%", "init-clp-guarded", "train.py", ["--embedding_tuning_frac=0.5"]),
    ("frozen", "transformer frozen throughout", "init-clp-guarded", "train.py", ["--embedding_tuning_frac=1.0"]),
    ("accelerated", "accelerated start (10% at the embedding LR, nothing frozen)", "init-clp-guarded", "train.py",
     ["--embedding_tuning_frac=0.1", "--freeze_transformer=False"]),
    ("unified", "embedding phase 10%, one schedule over the run", "init-clp-guarded", "train.py",
     ["--embedding_tuning_frac=0.1", "--lr_schedule=unified"]),
    ("warmup10", "embedding phase 10%, warmup 10% of each phase", "init-clp-guarded", "train.py",
     ["--embedding_tuning_frac=0.1", "--warmup_relative_to=phase", "--embedding_warmup_frac=0.1",
      "--warmup_frac=0.1"]),
    ("vbs", "embedding phase 10% of the tokens at batch 2", "init-clp-guarded", "train_variable_bs.py",
     ["--embedding_tuning_frac=0.1", "--embedding_batch_size=2"]),
    ("scratch", "from scratch", "init-scratch", "train.py", []),
    ("from_clp_plus", "CLP+", "init-clp-plus", None, None),
    ("from_fvt", "FVT", "init-fvt", None, None),
]
YARDSTICKS = ("baseline", "scratch")  # what the others are measured against: always run
# the study's own settings beyond the sizes it shares: the German budget of each run (demo.py --tokens) and the
# evaluation interval (twice the demo's resolution: the tokens to reach a perplexity are read off these curves)
MODES["study"] = dict(MODES["default"], variants=STUDY_REGIMES, out="out/demo", suffix="-study",
                      study=dict(tokens=250_000, target=["--eval_interval=10"]))
MODES["study-quick"] = dict(MODES["quick"], variants=STUDY_REGIMES, out="out/demo-quick", suffix="-study",
                            study=dict(tokens=10_240, target=["--eval_interval=2"]))
# mode keys that are not sizes: modes of one size share their stages
SHARED = ("variants", "out", "suffix", "study", "extend")
# --arch: the family of the source and the helper (train.py's scratch keys), hence of every German target
ARCHS = ("gpt_neox", "llama")


def arch_args(arch, name, mode):
    """train.py's extra arguments for the source or helper of `arch`: a Llama with n_head // 2 key/value heads (at
    least one) and tied embeddings, as Llama-3.2 and Qwen2.5's small models are."""
    if arch == "gpt_neox":
        return []
    n_head = trainer.parse_config([config_path(name), *mode[name]]).n_head
    return ["--model_type=llama", f"--n_kv_head={max(1, n_head // 2)}", "--tie_word_embeddings=True"]


def claim_out(out, mode_name, mode):
    """The stages kept in `out` are those of one size of the demo (demo_mode.json: its sizes and budgets): stages of
    other sizes are not done stages of this one, so a demo of other sizes into it is refused. DEMO=init and
    DEMO=study share the stages of the demo of their size (quick, init-quick and study-quick; default, init and
    study), so they only train what is new."""
    path = os.path.join(out, "demo_mode.json")
    sizes = json.loads(json.dumps({k: v for k, v in mode.items() if k not in SHARED}))
    saved = read_json(path) if os.path.isfile(path) else None
    if saved is not None and saved.get("sizes") != sizes:
        raise UserError(f"{out} holds the stages of a --mode {saved.get('mode')} demo (or of other sizes, {path}): "
                        f"give --mode {mode_name} its own --out, or delete {out}")
    write_json(path, {"mode": saved["mode"] if saved else mode_name, "sizes": sizes})


def stage(name, done):
    """Print what runs; True when the stage's output already exists (and so it is skipped)."""
    print(f"== {name}: " + ("cached" if done else "running"), flush=True)
    return done


# -----------------------------------------------------------------------------
# 1. data


def novels(eltec_dir, manifest=MANIFEST):
    """{(lang, split): [source, ...]} from the manifest: local files (checked against their sha256) when
    eltec_dir is given, else the pinned URLs with their sha256 (data.py downloads, caches and checks them)."""
    out = {}
    with open(manifest, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")  # lang, split, file, sha256, bytes, url (or source_url)
        rows = [dict(zip(header, line.rstrip("\n").split("\t"))) for line in f]
    for row in rows:
        if eltec_dir:
            path = os.path.join(eltec_dir, row["lang"], row["file"])
            if not os.path.isfile(path):
                raise UserError(f"{path}: not found (ELTEC_DIR={eltec_dir} should hold {row['lang']}/{row['file']})")
            if sha256_file(path) != row["sha256"]:
                raise UserError(f"{path}: sha256 differs from the manifest {manifest}")
            source = path
        else:
            source = f"{row['url']}#sha256={row['sha256']}"
        out.setdefault((row["lang"], row["split"]), []).append(source)
    return out


def mode_novels(mode_name, eltec_dir):
    """The novels a mode reads: ELTEC_DIR's when set; else the quick modes (quick, init-quick, study-quick,
    extend-quick) read the slices vendored in tests/data/eltec (offline, on a fresh clone), the others the pinned
    URLs."""
    if mode_name.endswith("quick") and not eltec_dir:
        return novels(SLICES, os.path.join(SLICES, "MANIFEST.tsv"))
    return novels(eltec_dir)


def prepare_data(out, mode, sources):
    for lang in ("eng", "deu"):
        heldout = os.path.join(out, f"heldout-{lang}")
        if not stage(f"held-out {lang} slices", os.path.isdir(heldout)):
            with atomic_dir(heldout) as tmp:
                for i, doc in enumerate(data.iter_documents(sources[lang, "valid"])):
                    with open(os.path.join(tmp, f"{i}.txt"), "w", encoding="utf-8") as f:
                        f.write(doc[:mode["heldout_chars"]])
        token_dir = os.path.join(out, f"data-{lang}")
        if not stage(f"{lang} tokenizer and token files", os.path.isfile(os.path.join(token_dir, "meta.json"))):
            train = sources[lang, "train"][:mode["train_novels"]]
            data.prepare(train, token_dir, train_tokenizer=True, vocab_size=mode["vocab_size"],
                         validation_sources=[heldout], override=True)


def prepare_extended_data(out, mode, sources):
    """The German novels tokenized with the extended tokenizer (init-extend's), the same held-out slices."""
    token_dir = os.path.join(out, DATA_OF_INIT["init-extend"])
    if not stage("deu token files, extended tokenizer", os.path.isfile(os.path.join(token_dir, "meta.json"))):
        data.prepare(sources["deu", "train"][:mode["train_novels"]], token_dir, os.path.join(out, "init-extend"),
                     validation_sources=[os.path.join(out, "heldout-deu")], override=True)


# -----------------------------------------------------------------------------
# 2-4. models


def train(runs, jobs=1):
    """Train each run (out, name, script, args, label) not yet finished in its own process (so its peak memory is
    its own), up to `jobs` at once; an interrupted run resumes. One at a time, a run prints to the terminal;
    several at once share the cores (OMP_NUM_THREADS, unless set) and each writes its output to <run dir>.log."""
    waiting = []
    for out, name, script, args, label in runs:
        run_dir = os.path.join(out, name)
        if os.path.isfile(os.path.join(run_dir, "summary.json")):
            stage(f"train {label or name}", True)
        else:  # said when it starts
            waiting.append((run_dir, script, args, label or name))
    env = dict(os.environ)
    if jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    running, failed = {}, []
    try:
        while waiting and not failed or running:
            while waiting and len(running) < jobs and not failed:
                run_dir, script, args, label = waiting.pop(0)
                running[start_run(run_dir, script, args, label, jobs, env)] = (run_dir, label, time.time())
            proc = wait_any(running)
            run_dir, label, t0 = running.pop(proc)
            if proc.returncode:  # the runs already going finish; no other starts
                failed.append((label, run_dir))
                if jobs > 1:
                    with open(run_dir + ".log", encoding="utf-8", errors="replace") as f:
                        print("".join(f.readlines()[-20:]), end="", file=sys.stderr, flush=True)
            else:
                write_json(os.path.join(run_dir, "demo_wall_time.json"), {"seconds": time.time() - t0, "jobs": jobs})
    except BaseException as e:  # the runs going stop too, each at a checkpoint to resume from
        for proc in running:
            if not isinstance(e, KeyboardInterrupt):  # Ctrl-C reached them already
                proc.terminate()
        for proc in running:
            proc.wait()
        raise
    if failed:
        label, run_dir = failed[0]
        where = "above" if jobs == 1 else f"its log: {run_dir}.log"
        raise UserError(f"training {label} failed ({where}); rerun `make demo` to resume it")


def start_run(run_dir, script, args, label, jobs, env):
    # a run killed before its first checkpoint left only metrics: it starts again
    resume = ["--init_from=resume" if os.path.isfile(os.path.join(run_dir, "ckpt.pt")) else "--override=True"]
    cmd = [sys.executable, os.path.join(HERE, script), *args, f"--out_dir={run_dir}", *resume]
    shown = " ".join(os.path.relpath(c) if c.endswith(".py") else c for c in cmd[1:])
    stage(f"train {label}", False)
    if jobs == 1:
        print("   " + shown, flush=True)
        return subprocess.Popen(cmd, cwd=HERE, env=env)
    print(f"   {shown} > {run_dir}.log", flush=True)
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    with open(run_dir + ".log", "w", encoding="utf-8") as log:
        return subprocess.Popen(cmd, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_any(procs):
    """The first of the running processes to end."""
    while True:
        for proc in procs:
            if proc.poll() is not None:
                return proc
        time.sleep(0.05)


SCRATCH_SEED = 1337  # the demo's from-scratch start; the study's seed s > the demo's starts from this + (s - it)


def scratch_init(out, like, tokenizer_dir, name="init-scratch", seed=SCRATCH_SEED):
    """A randomly initialised model with the source's architecture and the German tokenizer: the from-scratch
    variant's start, saved so that it is evaluated like the other starting points."""
    path = os.path.join(out, name)
    if stage("from-scratch initialisation" + (f" ({name})" if name != "init-scratch" else ""),
             os.path.isfile(os.path.join(path, "config.json"))):
        return
    config = CausalLM.from_pretrained(like).config
    torch.manual_seed(seed)
    model = model_from_config(dataclasses.replace(config, vocab_size=clp_vocab_rows(tokenizer_dir)))
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer_dir, tmp)


def clp_vocab_rows(tokenizer_dir, multiple=128):
    return round_up(load_tokenizer(tokenizer_dir).get_vocab_size(), multiple)


# -----------------------------------------------------------------------------
# 5. evaluation and the report


def word_ppl(out, model_dir, heldout, key, block):
    """eval.py's perplexities of a model on the held-out slices (windows of the training block), cached in
    out/evals/<key>.json."""
    path = os.path.join(out, "evals", f"{key}.json")
    if os.path.isfile(path):
        return read_json(path)
    model, tok, prefix = evaluation.load_model(model_dir)
    docs = list(data.iter_documents(heldout))
    result = evaluation.perplexity(model, tok, docs, max_length=block, prefix_token_id=prefix, progress=False)
    write_json(path, result)
    return result


def tokens_to_reach(curve, target):
    """Tokens at which a validation curve [(tokens, ppl), ...] first reaches `target` (linear between evals)."""
    if curve and curve[0][1] <= target:
        return curve[0][0]
    for (t0, p0), (t1, p1) in zip(curve, curve[1:]):
        if p1 <= target:  # p0 > target >= p1; from a diverged evaluation (inf) there is no line to follow
            return t1 if math.isinf(p0) else t0 + (t1 - t0) * (p0 - target) / (p0 - p1)
    return None


def report(out, mode_name, variants=VARIANTS, suffix="", arch="gpt_neox"):
    rows, curves = [], {}
    block = read_json(os.path.join(out, "runs", variants[0][0], "config.json"))["block_size"]
    for name, label, init, _, _ in variants:
        run_dir = os.path.join(out, "runs", name)
        curves[label] = [(t, p) for t, p, _ in read_curve(run_dir)]
        summary = read_json(os.path.join(run_dir, "summary.json"))
        start = word_ppl(out, os.path.join(out, init), os.path.join(out, "heldout-deu"), init, block)
        end = word_ppl(out, os.path.join(run_dir, "hf"), os.path.join(out, "heldout-deu"), f"final-{name}", block)
        rows.append(dict(name=name, label=label, start=start, end=end, curve=curves[label],
                         **wall_time(run_dir),
                         train_seconds=sum(p["seconds"] for p in summary["phases"].values()),
                         peak_mb=summary["peak_rss_mb"], tokens=summary["tokens"]))
    scratch_final = rows[0]["curve"][-1][1]
    shape = "" if arch == "gpt_neox" else ", Llama-shaped models"
    lines = [f"# CLP-Transfer at toy scale ({mode_name} demo{shape})", "",
             f"German targets trained on {rows[0]['tokens']:,} tokens of ELTeC novels each. Perplexity on the held-out "
             "German novel slices: word perplexity and bits per byte from eval.py (tokenizer-independent); the "
             "validation curve is token perplexity on the first validation batches (every German variant shares the "
             "helper's tokenizer, so these compare too).", "",
             "| variant | word ppl before | word ppl after | bits/byte after | val ppl before → after | tokens to "
             "reach scratch's final val ppl | wall time | train time | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reach = tokens_to_reach(r["curve"], scratch_final)
        reach = f"{reach:,.0f} ({reach / r['tokens']:.0%})" if reach is not None else "not reached"
        lines.append(f"| {r['label']} | {big(r['start']['word_perplexity'])} | {big(r['end']['word_perplexity'])} | "
                     f"{r['end']['bits_per_byte']:.3f} | {big(r['curve'][0][1])} → {r['curve'][-1][1]:,.1f} | "
                     f"{reach} | {r['seconds']:.0f} s | {r['train_seconds']:.0f} s | {r['peak_mb']:,.0f} MB |")
    lines += ["", stages_line(out, "init-clp")]
    if any(v[2] == "init-fvt" for v in variants):
        lines.append(f"FVT: {fvt_report_summary(read_json(os.path.join(out, 'init-fvt', 'clp_report.json')))}.")
    lines.append(f"Machine: {machine_line(max(r['jobs'] for r in rows))}.")
    write_text(os.path.join(out, f"report{suffix}.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out, {label: [curve] for label, curve in curves.items()}, f"ppl_curves{suffix}.png")


def extend_report(out, mode_name, variants, suffix):
    """DEMO=extend: German fertility under the three tokenizers, German bits per byte and word perplexity before and
    after the same budget, and English retention (each model scored on held-out English with its own tokenizer:
    bits per byte compares across tokenizers)."""
    block = read_json(os.path.join(out, "runs", variants[0][0], "config.json"))["block_size"]
    heldout = {lang: os.path.join(out, f"heldout-{lang}") for lang in ("deu", "eng")}
    german = [d for d in data.iter_documents(heldout["deu"])]
    tokenizers = {"English source": f"{out}/source/hf", "German helper (replacement)": f"{out}/helper/hf",
                  "extended (source + German)": f"{out}/init-extend"}
    fert = {name: clp.fertility(load_tokenizer(path), german) for name, path in tokenizers.items()}
    models = [("English source", "source/hf", "source", None)] + [
        (label, os.path.join("runs", name, "hf"), f"final-{name}", init) for name, label, init, _, _ in variants]
    rows = []
    for label, path, key, init in models:
        row = {"label": label}
        for lang in ("deu", "eng"):
            row[lang] = word_ppl(out, os.path.join(out, path), heldout[lang], key + ("-eng" if lang == "eng" else ""),
                                 block)
            if init:
                row[lang + "_start"] = word_ppl(out, os.path.join(out, init), heldout[lang],
                                                init + ("-eng" if lang == "eng" else ""), block)
        rows.append(row)
    ext = read_json(os.path.join(out, "init-extend", "clp_report.json"))["extend"]
    tokens = read_json(os.path.join(out, "runs", variants[0][0], "summary.json"))["tokens"]
    lines = [f"# Extension against replacement ({mode_name} demo)", "",
             f"The English source's vocabulary extended with {ext['appended_tokens']:,} German tokens (clp.py "
             f"--extend, ids {ext['first_appended_id']:,} on; CLP with the fallback for their rows) against CLP's "
             f"replacement by the German helper's vocabulary; every German run trains on {tokens:,} tokens with a "
             "10% embedding phase. Bits per byte and word perplexity from eval.py on the held-out novel slices, "
             "each model with its own tokenizer.", "",
             "German held-out text, tokens per word:", "", "| tokenizer | vocabulary | tokens per word |",
             "|---|---|---|"]
    for name, path in tokenizers.items():
        lines.append(f"| {name} | {load_tokenizer(path).get_vocab_size():,} | {fert[name]['tokens_per_word']:.3f} |")
    lines += ["", "| model | German bits/byte (start → after) | German word ppl after | English bits/byte "
                  "(start → after) | English word ppl after |", "|---|---|---|---|---|"]
    for r in rows:
        def pair(lang):
            start = f"{r[lang + '_start']['bits_per_byte']:.3f} → " if lang + "_start" in r else ""
            return start + f"{r[lang]['bits_per_byte']:.3f}"
        lines.append(f"| {r['label']} | {pair('deu')} | {big(r['deu']['word_perplexity'])} | {pair('eng')} | "
                     f"{big(r['eng']['word_perplexity'])} |")
    lines += ["", stages_line(out, "init-clp-guarded"), f"Machine: {machine_line()}."]
    write_text(os.path.join(out, f"report{suffix}.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def read_curve(run_dir):
    """A run's validation curve [(tokens, perplexity, training seconds so far), ...] from its metrics.jsonl (a
    diverged evaluation, null there, is inf)."""
    curve, seconds = [], 0.0
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for m in map(json.loads, f):
            seconds += m.get("dt_s", 0.0)  # a step's own time (its evaluation is not in it)
            if "val_ppl" in m:
                curve.append((m["tokens"], math.inf if m["val_ppl"] is None else m["val_ppl"], seconds))
    return curve


def stages_line(out, init):
    """The shared stages in a sentence: the source, the helper and the CLP initialisation `init`."""
    source = read_json(os.path.join(out, "source", "summary.json"))
    helper = read_json(os.path.join(out, "helper", "summary.json"))
    return (f"English source: {source['tokens']:,} tokens, final validation loss {source['final_val_full_loss']:.3f}; "
            f"German helper: {helper['tokens']:,} tokens, {helper['final_val_full_loss']:.3f}. CLP: "
            f"{clp_report_summary(read_json(os.path.join(out, init, 'clp_report.json')))}.")


def big(x):
    """A perplexity for the table: digits up to a billion, then powers of ten (a diverged start reaches 1e190);
    beyond floating point (null in the JSON files): inf."""
    return "inf" if x is None or x == math.inf else f"{x:,.0f}" if x < 1e9 else f"{x:.1e}"


def clp_report_summary(r):
    return (f"{r['shared_tokens']:,} shared tokens ({r['shared_fraction']:.1%} of the helper's vocabulary); of the "
            f"{r['new_tokens']:,} new tokens {r['fallback_rows']:,} have a similarity sum that is not positive (the "
            f"fallback) and {r['extrapolated_rows']:,} a sum so close to zero that their rows come out longer than "
            "every shared source row (extrapolated; with --extrapolation_fallback they take the fallback too)")


def fvt_report_summary(r):
    hist = ", ".join(f"{n:,} into {k}" for k, n in r["fvt"]["pieces_histogram"].items())
    return (f"the source tokenizer splits the {r['new_tokens']:,} new tokens into {r['fvt']['mean_pieces']:.2f} "
            f"pieces on average ({hist}; {r['fvt']['split_byte_by_byte']:,} byte by byte)")


def wall_time(run_dir):
    """{"seconds": a run's wall time, "jobs": how many runs demo.py let train at once beside it}."""
    return {"jobs": 1, **read_json(os.path.join(run_dir, "demo_wall_time.json"))}


def machine_line(jobs=1):
    """The machine; and, when runs trained beside others (demo.py --jobs: the most at once), how many."""
    m = machine()
    return f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}" + (
        f"; up to {jobs} training runs at once (--jobs): their times include sharing the cores" if jobs > 1 else "")


def write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def plot(out, curves, name="ppl_curves.png", title="CLP-Transfer at toy scale: German targets from an English source",
         zoom=False):
    """Validation perplexity against tokens, {label: [curve, ...]}: per label the mean of its curves (runs at several
    seeds, evaluated at the same tokens) in a band from their minimum to their maximum. zoom: a second panel on the
    second half of the runs, where the regimes part."""
    path = os.path.join(out, name)
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipped the plot (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = {}  # label -> (thousands of tokens, mean, min, max)
    for label, group in curves.items():
        points = [[c[i][1] for c in group] for i in range(min(len(c) for c in group))]
        lines[label] = ([t / 1e3 for t, _ in group[0][:len(points)]], [statistics.fmean(p) for p in points],
                        [min(p) for p in points], [max(p) for p in points])
    fig, axes = plt.subplots(1, 1 + zoom, figsize=(13, 5.5) if zoom else (7, 4.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(lines) > len(colors):  # ten strong colours, then their light twins
        colors = plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2]
    # the y axis stops at twice the highest start below 1e6: a diverged start (1e189) would flatten every curve
    top = 2 * max((p for _, mean, _, _ in lines.values() for p in mean if p < 1e6), default=1e6)
    for ax in axes[0]:
        for (label, (x, mean, low, high)), color in zip(lines.items(), itertools.cycle(colors)):
            start = f" (starts at {big(mean[0])})" if mean and mean[0] > top else ""
            ax.plot(x, mean, label=label + start, color=color, linestyle="--" if label == "from scratch" else "-")
            if len(curves[label]) > 1:
                ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
        ax.set_yscale("log")
        ax.set_xlabel("German training tokens (thousands)")
        ax.set_ylabel("validation perplexity (token)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylim(0.8 * min(p for _, _, low, _ in lines.values() for p in low), top)
    axes[0][0].set_title(title)
    axes[0][0].legend(fontsize="small" if zoom else None)
    if zoom:  # from-scratch, the yardstick far above, may leave the top
        half = max(x[-1] for x, *_ in lines.values()) / 2
        seen = [p for label, (x, _, low, high) in lines.items() if label != "from scratch"
                for t, lo, hi in zip(x, low, high) if t >= half for p in (lo, hi)]
        axes[0][1].set_xlim(half, None)
        axes[0][1].set_ylim(0.97 * min(seen), 1.03 * max(seen))
        axes[0][1].set_title("the second half of the runs")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


# -----------------------------------------------------------------------------
# 6. the study: every regime at several seeds (DEMO=study, study-quick)

DEMO_SEED = 42  # train.py's default seed, which the demo's configs keep: the study's first seed is the demo's
SCRIPT_DEFAULTS = {"train.py": None, "train_variable_bs.py": train_variable_bs.VARIABLE_BATCH_DEFAULTS}
FEWER = ("fewer", "more")  # the report's words for a count of tokens below / above another


def target_args(out, mode, init, extra):
    """train.py's arguments (all but --out_dir) for a German run from the initial model `init`."""
    return [config_path("target"), f"--data_dir={out}/{DATA_OF_INIT.get(init, 'data-deu')}",
            f"--init_from={out}/{init}", *mode["target"], *extra]


def config_path(name):
    return os.path.join(HERE, "config", f"demo_{name}.py")


def scratch_start(seed):
    """The from-scratch start of a seed: the demo's for its seed, another random init for each other seed."""
    return ("init-scratch", SCRATCH_SEED) if seed == DEMO_SEED else (f"init-scratch-seed{seed}",
                                                                     SCRATCH_SEED + seed - DEMO_SEED)


def study_run(out, mode, tokens, seed, regime, label, init, script, extra, folder=None):
    """One run of the study: its train.py arguments, parsed config and run directory (runs/study-<tokens>/...)."""
    if init == "init-scratch":
        init = scratch_start(seed)[0]
    args = [*target_args(out, mode, init, [*mode["study"]["target"], f"--max_tokens={tokens}", *extra]),
            f"--seed={seed}"]
    run = dict(regime=regime, label=label, seed=seed, init=init, script=script, extra=extra, args=args,
               cfg=trainer.parse_config(args, SCRIPT_DEFAULTS[script]),
               dir=os.path.join(out, "runs", f"study-{tokens}", folder or regime, f"seed{seed}"))
    if os.path.isfile(os.path.join(run["dir"], "summary.json")):  # a finished run is kept: if it is this one
        saved, wanted = read_json(os.path.join(run["dir"], "config.json")), dataclasses.asdict(run["cfg"])
        changed = [k for k in wanted if k not in ("out_dir", "override", "init_from") and saved.get(k) != wanted[k]]
        if changed:
            raise UserError(f"{run['dir']} holds a run of other settings ({changed[0]}={saved.get(changed[0])!r}, "
                            f"the study's {wanted[changed[0]]!r}): delete it to train it again")
    return run


def study_plan(out, mode, regimes, seeds, tokens):
    """The study's runs {(regime, seed): run} but the best regime's repeats (from_*: once it is known), checked
    before anything trains: every phase a regime names must get a step of the budget."""
    plan = {}
    for regime, label, init, script, extra in STUDY_REGIMES:
        if regime in regimes and script:
            for seed in seeds:
                plan[regime, seed] = check_phases(study_run(out, mode, tokens, seed, regime, label, init, script,
                                                            extra), tokens)
    return plan


def check_phases(run, tokens):
    cfg = run["cfg"]
    wanted = [name for name, on in (("embedding", cfg.embedding_tuning_frac > 0),
                                    ("full", cfg.embedding_tuning_frac < 1)) if on]
    try:
        steps = {p.name: p.steps for p in trainer.plan_phases(cfg, train_blocks=0)}  # max_tokens: no data needed
    except UserError:
        steps = {}
    if sorted(steps) != sorted(wanted):  # a phase without a step is left out of the plan
        got = " and ".join(f"{steps.get(name, 0)} {name}-phase step(s)" for name in wanted)
        raise UserError(f"--tokens={tokens}: too small for {run['regime']} ({run['label']}): {got} (a full step "
                        f"is {cfg.batch_size * cfg.block_size} tokens); every phase needs a step")
    return run


def study_result(out, run, block):
    """What the report needs of a finished run: its validation curve against tokens and against training seconds,
    its summary, wall time, and eval.py's perplexities on the held-out novels."""
    summary = read_json(os.path.join(run["dir"], "summary.json"))
    key = "final-" + os.path.relpath(run["dir"], os.path.join(out, "runs")).replace(os.sep, "-")
    held = word_ppl(out, os.path.join(run["dir"], "hf"), os.path.join(out, "heldout-deu"), key, block)
    wall = wall_time(run["dir"])
    return dict(run, curve=read_curve(run["dir"]), summary=summary, peak_rss=summary["peak_rss_mb"],
                final_ppl=math.inf if summary["final_val_full_loss"] is None else
                math.exp(summary["final_val_full_loss"]),
                word_ppl=held["word_perplexity"], bits_per_byte=held["bits_per_byte"], wall=wall["seconds"],
                jobs=wall["jobs"])


def add_reach(results):
    """Per run, the tokens and training seconds to reach the final validation perplexity (periodic evaluation) of
    regular pre-training and of from-scratch at the same seed (the same order of training blocks)."""
    for r in results.values():
        for yardstick in YARDSTICKS:
            target = results[yardstick, r["seed"]]["curve"][-1][1]
            r[f"reach_{yardstick}"] = tokens_to_reach([(t, p) for t, p, _ in r["curve"]], target)
            r[f"reach_{yardstick}_s"] = tokens_to_reach([(s, p) for _, p, s in r["curve"]], target)


def by_regime(results):
    """{regime: [its runs, by seed]} in the order of STUDY_REGIMES."""
    out = {}
    for (regime, _), r in sorted(results.items(), key=lambda kv: ([s[0] for s in STUDY_REGIMES].index(kv[0][0]),
                                                                    kv[0][1])):
        out.setdefault(regime, []).append(r)
    return out


def reach_rank(runs, key="reach_baseline"):
    """The best regime's rule: fewest seeds that never reach regular pre-training's final validation perplexity,
    then fewest tokens to it (mean over the seeds that do), then the lowest final validation perplexity."""
    reached = [r[key] for r in runs if r[key] is not None]
    return (len(runs) - len(reached), statistics.fmean(reached) if reached else math.inf,
            statistics.fmean(r["final_ppl"] for r in runs))


def best_regime(results):
    """The best regime from the CLP start (reach_rank); the study repeats it from CLP+ and from FVT."""
    regimes = by_regime(results)
    return min((name for name in regimes if regimes[name][0]["init"] == "init-clp-guarded"),
               key=lambda name: reach_rank(regimes[name]))


def spread(values):
    """(mean, sample standard deviation, min, max) over seeds."""
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, min(values),
            max(values))


def beyond_spread(a, b):
    """The study's rule: two regimes differ beyond their seeds' spread when their means differ by more than twice
    the pooled standard deviation, sqrt((sd_a^2 + sd_b^2) / 2)."""
    (mean_a, sd_a, *_), (mean_b, sd_b, *_) = spread(a), spread(b)
    return abs(mean_a - mean_b) > 2 * math.sqrt((sd_a ** 2 + sd_b ** 2) / 2)


def show(values, digits=1, unit=""):
    """mean ± sd (min–max); values never reached (None) are counted apart."""
    missing = sum(v is None for v in values)
    values = [v for v in values if v is not None]
    text = "" if not values else ("{0:,.{d}f}{u} ± {1:,.{d}f} ({2:,.{d}f}–{3:,.{d}f})" if len(values) > 1 else
                                  "{0:,.{d}f}{u}").format(*spread(values), d=digits, u=unit)
    return (f"not reached at {missing} of {missing + len(values)} seeds" + (f"; {text}" if text else "")
            if missing else text)


def phase_peak_mb(summary, phase):
    """A phase's peak memory: train.py's per-phase record (CUDA: allocated memory), else the process's peak RSS
    when the run is that phase alone; None when neither says."""
    stats = summary["phases"].get(phase)
    if stats is None:
        return None
    return stats.get("peak_mem_mb", stats.get("peak_rss_mb", summary["peak_rss_mb"] if len(summary["phases"]) == 1
                                              else None))


def study_report(out, mode_name, results, best, tokens, seeds, suffix):
    regimes = by_regime(results)
    base = regimes["baseline"]
    cfg = base[0]["cfg"]

    def values(name, key):  # a regime's values of one key, by seed
        return [r[key] for r in regimes[name]]

    def reach(name, yardstick="baseline"):  # % of the budget to the yardstick's final perplexity, by seed
        return [None if r[f"reach_{yardstick}"] is None else 100 * r[f"reach_{yardstick}"] / tokens
                for r in regimes[name]]

    def label(name):
        return regimes[name][0]["label"]

    def sorted_by_rule(names):
        return sorted(names, key=lambda name: reach_rank(regimes[name]))

    def lower_beyond(name, key, against="baseline"):  # reached at every seed and lower beyond the spread
        a, b = values(name, key), values(against, key)
        return None not in a + b and statistics.fmean(a) < statistics.fmean(b) and beyond_spread(a, b)

    def compare(names, key, against="baseline", words=("lower", "higher")):
        """The regimes of `names` below / above `against` in `key` (mean over seeds), beyond and within the spread."""
        groups = {}
        for name in names:
            a, b = values(name, key), values(against, key)
            if None in a or None in b:
                groups.setdefault("not reached at every seed", []).append(name)
                continue
            side = words[statistics.fmean(a) >= statistics.fmean(b)]
            groups.setdefault(f"{side} {'beyond' if beyond_spread(a, b) else 'within'} the spread", []).append(name)
        return "; ".join(f"{group}: {', '.join(f'“{label(n)}”' for n in members)}"  # labels may hold commas
                         for group, members in groups.items())

    # 1. the embedding phase (the transformer frozen) from the CLP start: tokens, time and memory
    et = sorted_by_rule(name for name, runs in regimes.items() if runs[0]["cfg"].embedding_tuning_frac > 0
                        and runs[0]["cfg"].freeze_transformer and runs[0]["init"] == "init-clp-guarded")
    faster = [n for n in et if lower_beyond(n, "reach_baseline")]
    # tokens/s of the two phases of one run, at the same batch size
    speed = [(phases["embedding"]["tokens_per_s"], phases["full"]["tokens_per_s"]) for n in et for r in regimes[n]
             for phases in [r["summary"]["phases"]] if set(phases) == {"embedding", "full"}
             and r["cfg"].embedding_batch_size in (0, r["cfg"].batch_size)
             and None not in (phases["embedding"]["tokens_per_s"], phases["full"]["tokens_per_s"])]
    lines = [f"# The study at toy scale: every regime at {len(seeds)} seeds ({mode_name})", ""]
    q1 = ("Yes, at this scale" if faster else "Not beyond the seeds' spread") + ": " if et else (
        "not asked: no regime with an embedding phase ran (--regimes). ")
    if et:
        lead = et[0]
        q1 += (f"{label(lead)} reaches regular pre-training's final validation perplexity with the fewest tokens of "
               f"the regimes with an embedding phase, {show(reach(lead), 0, '%')} of the budget; against regular "
               f"pre-training, {compare(et, 'reach_baseline', words=FEWER)}. ")
        q1 += (f"In training time: {show(values(lead, 'reach_baseline_s'), 1, ' s')} against regular pre-training's "
               f"{show(values('baseline', 'reach_baseline_s'), 1, ' s')}. ")
    if speed:
        q1 += (f"An embedding-phase step (the transformer frozen) runs at "
               f"{show([e for e, _ in speed], 0, ' tokens/s')} against {show([f for _, f in speed], 0, ' tokens/s')} "
               f"for a full-model step of the same runs ({statistics.fmean(e / f for e, f in speed):.2f}x). ")
    if "frozen" in regimes:
        frozen = regimes["frozen"][0]["summary"]
        q1 += (f"Memory: the optimizer state of the embedding phase (the transformer frozen throughout) is "
               f"{frozen['rank0_optimizer_state_bytes'] / 2**20:,.1f} MB against "
               f"{base[0]['summary']['rank0_optimizer_state_bytes'] / 2**20:,.1f} MB for the full model; the "
               f"process's peak RSS {show(values('frozen', 'peak_rss'), 0, ' MB')} against "
               f"{show(values('baseline', 'peak_rss'), 0, ' MB')} (at this size mostly the Python and torch "
               "runtime's).")
    finals = values("baseline", "final_ppl")
    others = [n for n in regimes if n not in YARDSTICKS]
    better = [n for n in others if lower_beyond(n, "final_ppl")]
    q2 = (("Yes" if better else "Not beyond the seeds' spread") + f": regular pre-training ends at "
          f"{show(finals)} (whole validation set); {compare(others, 'final_ppl')}.")
    ranked = sorted_by_rule(n for n in regimes if n not in ("scratch",))
    lead, runner = ranked[0], ranked[1] if len(ranked) > 1 else None
    fewest = (f"Fewest tokens to regular pre-training's final validation perplexity: {label(lead)}, "
              f"{show(reach(lead), 0, '%')} of the budget")
    if runner and None not in reach(lead) + reach(runner):
        fewest += (f"; next {label(runner)}, {show(reach(runner), 0, '%')}: the lead "
                   f"{'exceeds' if beyond_spread(reach(lead), reach(runner)) else 'is within'} the seeds' spread")
    lines += ["## The study's two questions at this scale", "",
              f"1. **Does the embedding phase make perplexity fall faster, with less time and memory?** {q1}",
              f"2. **Does the model end with a better validation perplexity than regular pre-training?** {q2}", "",
              fewest + ".", "",
              f"Every run trains on {tokens:,} German tokens ({cfg.batch_size} x {cfg.block_size} tokens a step; "
              f"evaluated every {cfg.eval_interval} steps on the first {cfg.eval_iters * cfg.batch_size} validation "
              f"blocks) from the same English source body, German helper and tokenizer, at seeds "
              f"{', '.join(map(str, seeds))}. The seed changes the order of the training blocks and, from scratch, "
              "the random initialisation; the CLP, CLP+ and FVT initialisations have no random rows (their "
              "clp_report.json: random_init false), and the source and helper are trained once and shared: their "
              "variance is not included. Tokens to reach a perplexity: the validation curve (linear between "
              "evaluations) against the final point of regular pre-training's (or from-scratch's) curve at the same "
              "seed. Figures are mean ± sample sd (min–max) over the seeds; two regimes differ *beyond the seeds' "
              "spread* when their means differ by more than twice the pooled sd, sqrt((sd1² + sd2²) / 2). The best "
              "regime, repeated from CLP+ and from FVT: the fewest seeds that do not reach regular pre-training's "
              "final perplexity, then the fewest tokens to it (mean), then the lowest final perplexity: "
              f"{label(best)}.", "",
              "| regime | tokens to reach regular pre-training's final val ppl | tokens to reach from-scratch's | "
              "final val ppl (whole validation set) | word ppl (held-out novels) | bits/byte |",
              "|---|---|---|---|---|---|"]
    for name in regimes:
        lines.append(f"| {label(name)} | {show(reach(name), 0, '%')} | "
                     f"{show(reach(name, 'scratch'), 0, '%')} | "
                     f"{show(values(name, 'final_ppl'))} | {show(values(name, 'word_ppl'), 0)} | "
                     f"{show(values(name, 'bits_per_byte'), 3)} |")
    lines += ["", "Against regular pre-training, beyond or within the seeds' spread:",
              f"- tokens to its final validation perplexity: {compare(others, 'reach_baseline', words=FEWER)};",
              f"- final validation perplexity: {compare(others, 'final_ppl')};",
              f"- word perplexity on the held-out novels: {compare(others, 'word_ppl')}."]
    for name in regimes:
        if name.startswith("from_"):
            lines.append(f"- {label(name)} against the same regime from CLP (tokens to regular pre-training's final "
                         f"val ppl): {compare([name], 'reach_baseline', against=best, words=FEWER)}.")
    lines += ["", "## Time and memory per phase", "",
              "Per phase, mean over the seeds: optimizer steps, training seconds and tokens/s (train.py's "
              "summary.json; tokens/s leaves out the phase's first step); the training time to reach regular "
              "pre-training's final perplexity; the run's wall time (start to export, evaluations included); the "
              "optimizer state at the end (measured: a run's last phase); peak memory of each phase where it is "
              "measured (CUDA: allocated memory; a CPU run: the process's peak RSS, known per phase only for a run "
              "of one phase).",
              "", "| regime | embedding phase: steps, seconds, tokens/s | full phase: steps, seconds, tokens/s | "
              "training time to reach regular's final | wall time | optimizer state at the end | peak memory: "
              "embedding phase, full phase |", "|---|---|---|---|---|---|---|"]
    for name, runs in regimes.items():
        cells = []
        for phase in ("embedding", "full"):
            stats = [r["summary"]["phases"].get(phase) for r in runs]
            cells.append("—" if None in stats else
                         f"{statistics.fmean(s['steps'] for s in stats):,.0f}, "
                         f"{statistics.fmean(s['seconds'] for s in stats):,.1f} s, "
                         + (f"{statistics.fmean(s['tokens_per_s'] for s in stats):,.0f}"
                            if None not in [s["tokens_per_s"] for s in stats] else "—"))
        peaks = [[phase_peak_mb(r["summary"], phase) for r in runs] for phase in ("embedding", "full")]
        lines.append(f"| {label(name)} | {cells[0]} | {cells[1]} | {show(values(name, 'reach_baseline_s'), 1, ' s')} "
                     f"| {show(values(name, 'wall'), 0, ' s')} | "
                     f"{runs[0]['summary']['rank0_optimizer_state_bytes'] / 2**20:,.1f} MB | "
                     + ", ".join("—" if None in p else show(p, 0, " MB") for p in peaks) + " |")
    lines += ["", "## Each seed", "",
              "| regime | seed | tokens to regular's final | to from-scratch's | final val ppl | word ppl | bits/byte "
              "| embedding phase: s, tokens/s | full phase: s, tokens/s | wall time | peak RSS |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in regimes.items():
        for r in runs:
            phases = [r["summary"]["phases"].get(phase) for phase in ("embedding", "full")]
            lines.append(
                f"| {r['label']} | {r['seed']} | {reached(r['reach_baseline'], tokens)} | "
                f"{reached(r['reach_scratch'], tokens)} | {r['final_ppl']:,.1f} | {r['word_ppl']:,.0f} | "
                f"{r['bits_per_byte']:.3f} | "
                + " | ".join("—" if p is None else f"{p['seconds']:.1f} s, " + (
                    "—" if p["tokens_per_s"] is None else f"{p['tokens_per_s']:,.0f}") for p in phases)
                + f" | {r['wall']:.0f} s | {r['peak_rss']:,.0f} MB |")
    wall = sum(r["wall"] for r in results.values())
    lines += ["", f"{stages_line(out, 'init-clp-guarded')} The study's {len(results)} runs: {wall / 60:,.1f} "
                  f"minutes of wall time together (training, evaluation and export; eval.py on the held-out novels "
                  f"and this report not counted). Machine: {machine_line(max(r['jobs'] for r in results.values()))}."]
    write_text(os.path.join(out, f"report{suffix}.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out, {label(name): [[(t, p) for t, p, _ in r["curve"]] for r in runs] for name, runs in regimes.items()},
         f"ppl_curves{suffix}.png", f"The study: every regime, {len(seeds)} seeds (band: min–max)", zoom=True)


def reached(n, tokens):
    return "not reached" if n is None else f"{n:,.0f} ({n / tokens:.0%})"


def study(out, mode, mode_name, plan, regimes, seeds, tokens, jobs):
    """Train the plan's runs, then the best CLP regime again from CLP+ and from FVT, then the report."""
    for seed in seeds:
        if seed != DEMO_SEED:  # the demo's is made with the other stages
            scratch_init(out, f"{out}/source/hf", f"{out}/helper/hf", *scratch_start(seed))
    block = next(iter(plan.values()))["cfg"].block_size

    def run_all(runs):
        train([(os.path.dirname(run["dir"]), os.path.basename(run["dir"]), run["script"], run["args"],
                f"{run['regime']} seed {run['seed']}") for run in runs.values()], jobs)
        return {key: study_result(out, run, block) for key, run in runs.items()}

    results = run_all(plan)
    add_reach(results)
    best = best_regime(results)
    _, best_label, _, script, extra = next(r for r in STUDY_REGIMES if r[0] == best)
    repeats = {}
    for regime, init_label, init, from_best, _ in STUDY_REGIMES:
        if from_best is None and regime in regimes:
            for seed in seeds:
                repeats[regime, seed] = study_run(out, mode, tokens, seed, regime, f"{best_label}, from {init_label}",
                                                  init, script, extra, folder=f"{regime}-{best}")
    results.update(run_all(repeats))
    add_reach(results)
    print("== the study's report")
    study_report(out, mode_name, results, best, tokens, seeds, mode["suffix"])


# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, default="default")
    p.add_argument("--arch", choices=ARCHS, default="gpt_neox", help="the models' family (llama: Llama-shaped "
                   "source, helper and targets)")
    p.add_argument("--out", help="output directory (default out/demo; out/demo-quick for the quick modes; "
                   "-llama after either for --arch llama)")
    p.add_argument("--eltec_dir", default=os.environ.get("ELTEC_DIR"),
                   help="a local copy of the ELTeC files (eng/ and deu/ folders; default $ELTEC_DIR); else download "
                        "them (the quick modes: read the slices vendored in tests/data/eltec)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at once, sharing the cores (default 1: "
                   "each run's time and memory its own, as the reports compare them)")
    p.add_argument("--seeds", type=int, default=3, help="study modes: seeds per regime, the demo's (42) first")
    p.add_argument("--regimes", help="study modes: a comma-separated subset of " + ", ".join(
        r[0] for r in STUDY_REGIMES) + f" (default all; {' and '.join(YARDSTICKS)} always run)")
    p.add_argument("--tokens", type=int, help="study modes: German tokens per run (default: " + ", ".join(
        f"{name} {m['study']['tokens']:,}" for name, m in MODES.items() if "study" in m) + ")")
    args = p.parse_args(argv)
    mode = dict(MODES[args.mode], **({} if args.arch == "gpt_neox" else {"arch": args.arch}))  # stages of another
    # arch are not this one's (claim_out); GPT-NeoX's sizes are those of the directories made before --arch existed
    out = (mode.get("out") or ("out/demo" if args.mode == "default" else f"out/demo-{args.mode}"))
    out = os.path.abspath(args.out or out + ("" if args.arch == "gpt_neox" else f"-{args.arch}"))
    variants = mode.get("variants", VARIANTS)
    if args.jobs < 1:
        raise UserError(f"--jobs={args.jobs}: expected a number of training runs at once, 1 or more")
    if "study" in mode:  # the plan is checked before anything runs
        regimes, seeds, tokens = study_options(args, mode)
        plan = study_plan(out, mode, regimes, seeds, tokens)
        variants = [v for v in variants if v[0] in regimes]
    elif (args.seeds, args.regimes, args.tokens) != (3, None, None):
        raise UserError(f"--seeds, --regimes and --tokens are options of --mode study and study-quick, not of "
                        f"--mode {args.mode}")
    os.makedirs(out, exist_ok=True)
    claim_out(out, args.mode, mode)
    t0 = time.time()

    sources = mode_novels(args.mode, args.eltec_dir)
    prepare_data(out, mode, sources)
    train([(out, name, "train.py", [config_path(name), f"--data_dir={out}/data-{lang}", *mode[name],
                                    *arch_args(args.arch, name, mode)], None)
           for name, lang in (("source", "eng"), ("helper", "deu"))], args.jobs)

    for init, (description, options) in INITS.items():
        if init == "init-extend":
            options = dict(options, extend=mode.get("extend"))
        if any(v[2] == init for v in variants) and not stage(
                description, os.path.isfile(os.path.join(out, init, "config.json"))):
            clp.apply_clp(f"{out}/source/hf", f"{out}/helper/hf", f"{out}/{init}", override=True, **options)
    scratch_init(out, f"{out}/source/hf", f"{out}/helper/hf")
    if "extend" in mode:
        prepare_extended_data(out, mode, sources)

    if "study" in mode:
        study(out, mode, args.mode, plan, regimes, seeds, tokens, args.jobs)
    else:
        train([(os.path.join(out, "runs"), name, script, target_args(out, mode, init, extra), None)
               for name, _, init, script, extra in variants], args.jobs)
        print("== evaluation and report")
        if "extend" in mode:
            extend_report(out, args.mode, variants, mode.get("suffix", ""))
        else:
            report(out, args.mode, variants, mode.get("suffix", ""), args.arch)
    print(f"report: {os.path.join(out, 'report' + mode.get('suffix', '') + '.md')} ({time.time() - t0:.0f} s)")


def study_options(args, mode):
    """--regimes, --seeds and --tokens of a study mode, checked: (regimes, seeds, tokens)."""
    names = [r[0] for r in STUDY_REGIMES]
    chosen = names if args.regimes is None else [r.strip() for r in args.regimes.split(",") if r.strip()]
    unknown = [r for r in chosen if r not in names]
    if unknown:
        raise UserError(f"--regimes: unknown regime {unknown[0]!r} (expected some of {', '.join(names)})")
    if args.seeds < 2:
        raise UserError(f"--seeds={args.seeds}: the spread over seeds needs at least 2 (the study: 3 or more)")
    if args.tokens is not None and args.tokens <= 0:
        raise UserError(f"--tokens={args.tokens}: expected a positive number of German tokens per run")
    regimes = [n for n in names if n in chosen or n in YARDSTICKS]
    return regimes, [DEMO_SEED + k for k in range(args.seeds)], args.tokens or mode["study"]["tokens"]


if __name__ == "__main__":
    run_cli(main)
