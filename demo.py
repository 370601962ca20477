"""
The whole study at toy scale, on a CPU: `make demo` (about 34 minutes on 2 CPU cores; it downloads the novels once)
or `make demo DEMO=quick` (about 80 seconds, offline: the test suite's end-to-end run). `make demo DEMO=init`
(DEMO=init-quick: its small size) compares the initialisations instead: random, mean, FVT, CLP, CLP with the fallback
and CLP+ (sparsemax), same budget; the runs it shares with `make demo` are trained once (same out directory), and it
writes report-init.md and ppl_curves-init.png.

1. data: English and German ELTeC novels (config/demo_eltec.tsv: files, sha256, public URLs at pinned commits; with
   ELTEC_DIR set, a local copy is read instead; --mode quick without it reads the slices of some of them vendored in
   tests/data/eltec, so it runs offline), a byte-level BPE per language, token files. Validation: the first
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
"""

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import torch

import clp
import data
import eval as evaluation
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
}
# DEMO=init and init-quick: the sizes of default and quick, the other variants, their own report
MODES["init"] = dict(MODES["default"], variants=INIT_VARIANTS, out="out/demo", suffix="-init")
MODES["init-quick"] = dict(MODES["quick"], variants=INIT_VARIANTS, out="out/demo-quick", suffix="-init")


def claim_out(out, mode_name, mode):
    """The stages kept in `out` are those of one size of the demo (demo_mode.json: its sizes and budgets): stages of
    other sizes are not done stages of this one, so a demo of other sizes into it is refused. DEMO=init shares the
    stages of the demo of its size (quick and init-quick, default and init), so it only trains what is new."""
    path = os.path.join(out, "demo_mode.json")
    sizes = json.loads(json.dumps({k: v for k, v in mode.items() if k not in ("variants", "out", "suffix")}))
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


# -----------------------------------------------------------------------------
# 2-4. models


def train(out, name, script, args):
    """One train.py run in its own process (so its peak memory is its own); resumes an interrupted one."""
    run_dir = os.path.join(out, name)
    if stage(f"train {name}", os.path.isfile(os.path.join(run_dir, "summary.json"))):
        return
    # a run killed before its first checkpoint left only metrics: it starts again
    resume = ["--init_from=resume" if os.path.isfile(os.path.join(run_dir, "ckpt.pt")) else "--override=True"]
    cmd = [sys.executable, os.path.join(HERE, script), *args, f"--out_dir={run_dir}", *resume]
    print("   " + " ".join(os.path.relpath(c) if c.endswith(".py") else c for c in cmd[1:]), flush=True)
    t0 = time.time()
    if subprocess.run(cmd, cwd=HERE).returncode:
        raise UserError(f"training {name} failed (its output is above); rerun `make demo` to resume it")
    write_json(os.path.join(run_dir, "demo_wall_time.json"), {"seconds": time.time() - t0})


def scratch_init(out, like, tokenizer_dir, seed=1337):
    """A randomly initialised model with the source's architecture and the German tokenizer: the from-scratch
    variant's start, saved so that it is evaluated like the other starting points."""
    path = os.path.join(out, "init-scratch")
    if stage("from-scratch initialisation", os.path.isfile(os.path.join(path, "config.json"))):
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


def word_ppl(out, model_dir, heldout, key):
    """eval.py's perplexities of a model on the held-out slices, cached in out/evals/<key>.json."""
    path = os.path.join(out, "evals", f"{key}.json")
    if os.path.isfile(path):
        return read_json(path)
    model, tok, prefix = evaluation.load_model(model_dir)
    block = read_json(os.path.join(out, "runs", "clp", "config.json"))["block_size"]
    docs = list(data.iter_documents(heldout))
    result = evaluation.perplexity(model, tok, docs, max_length=block, prefix_token_id=prefix, progress=False)
    write_json(path, result)
    return result


def tokens_to_reach(curve, target):
    """Tokens at which a validation curve [(tokens, ppl), ...] first reaches `target` (linear between evals)."""
    if curve and curve[0][1] <= target:
        return curve[0][0]
    for (t0, p0), (t1, p1) in zip(curve, curve[1:]):
        if p1 <= target:  # p0 > target >= p1
            return t0 + (t1 - t0) * (p0 - target) / (p0 - p1)
    return None


def report(out, mode_name, variants=VARIANTS, suffix=""):
    rows, curves = [], {}
    for name, label, init, _, _ in variants:
        run_dir = os.path.join(out, "runs", name)
        metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        curves[label] = [(m["tokens"], math.inf if m["val_ppl"] is None else m["val_ppl"]) for m in metrics
                         if "val_ppl" in m]
        summary = read_json(os.path.join(run_dir, "summary.json"))
        start = word_ppl(out, os.path.join(out, init), os.path.join(out, "heldout-deu"), init)
        end = word_ppl(out, os.path.join(run_dir, "hf"), os.path.join(out, "heldout-deu"), f"final-{name}")
        rows.append(dict(name=name, label=label, start=start, end=end, curve=curves[label],
                         seconds=read_json(os.path.join(run_dir, "demo_wall_time.json"))["seconds"],
                         train_seconds=sum(p["seconds"] for p in summary["phases"].values()),
                         peak_mb=summary["peak_rss_mb"], tokens=summary["tokens"]))
    scratch_final = rows[0]["curve"][-1][1]
    lines = [f"# CLP-Transfer at toy scale ({mode_name} demo)", "",
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
    source = read_json(os.path.join(out, "source", "summary.json"))
    helper = read_json(os.path.join(out, "helper", "summary.json"))
    clp_report = read_json(os.path.join(out, "init-clp", "clp_report.json"))
    lines += ["", f"English source: {source['tokens']:,} tokens, final validation loss "
                  f"{source['final_val_full_loss']:.3f}; German helper: {helper['tokens']:,} tokens, "
                  f"{helper['final_val_full_loss']:.3f}. CLP: {clp_report_summary(clp_report)}."]
    if any(v[2] == "init-fvt" for v in variants):
        lines.append(f"FVT: {fvt_report_summary(read_json(os.path.join(out, 'init-fvt', 'clp_report.json')))}.")
    lines.append(f"Machine: {machine_line()}.")
    write_text(os.path.join(out, f"report{suffix}.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out, curves, f"ppl_curves{suffix}.png")


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


def machine_line():
    m = machine()
    return f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}"


def write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def plot(out, curves, name="ppl_curves.png"):
    path = os.path.join(out, name)
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipped the plot (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # the y axis stops at twice the highest start below 1e6: a diverged start (1e189) would flatten every curve
    top = 2 * max((p for curve in curves.values() for _, p in curve if p < 1e6), default=1e6)
    for label, curve in curves.items():
        if curve and curve[0][1] > top:
            label += f" (starts at {big(curve[0][1])})"
        ax.plot([t / 1e3 for t, _ in curve], [p for _, p in curve], label=label, linestyle="--" if
                label == "from scratch" else "-")
    ax.set_yscale("log")
    ax.set_ylim(0.8 * min(p for curve in curves.values() for _, p in curve), top)
    ax.set_xlabel("German training tokens (thousands)")
    ax.set_ylabel("validation perplexity (token)")
    ax.set_title("CLP-Transfer at toy scale: German targets from an English source")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, default="default")
    p.add_argument("--out", help="output directory (default out/demo; out/demo-quick for --mode quick and init-quick)")
    p.add_argument("--eltec_dir", default=os.environ.get("ELTEC_DIR"),
                   help="a local copy of the ELTeC files (eng/ and deu/ folders; default $ELTEC_DIR); else download "
                        "them (--mode quick: read the slices vendored in tests/data/eltec)")
    args = p.parse_args(argv)
    mode = MODES[args.mode]
    out = os.path.abspath(args.out or mode.get("out") or ("out/demo" if args.mode == "default" else
                                                          f"out/demo-{args.mode}"))
    variants = mode.get("variants", VARIANTS)
    os.makedirs(out, exist_ok=True)
    claim_out(out, args.mode, mode)
    t0 = time.time()

    offline = args.mode == "quick" and not args.eltec_dir
    prepare_data(out, mode, novels(SLICES, os.path.join(SLICES, "MANIFEST.tsv")) if offline else novels(args.eltec_dir))
    config = lambda name: os.path.join(HERE, "config", f"demo_{name}.py")  # noqa: E731
    for name, lang in (("source", "eng"), ("helper", "deu")):
        train(out, name, "train.py", [config(name), f"--data_dir={out}/data-{lang}", *mode[name]])

    for init, (description, options) in INITS.items():
        if any(v[2] == init for v in variants) and not stage(
                description, os.path.isfile(os.path.join(out, init, "config.json"))):
            clp.apply_clp(f"{out}/source/hf", f"{out}/helper/hf", f"{out}/{init}", override=True, **options)
    scratch_init(out, f"{out}/source/hf", f"{out}/helper/hf")

    for name, _, init, script, extra in variants:
        train(os.path.join(out, "runs"), name, script, [config("target"), f"--data_dir={out}/data-deu",
                                                         f"--init_from={out}/{init}", *mode["target"], *extra])
    print("== evaluation and report")
    report(out, args.mode, variants, mode.get("suffix", ""))
    print(f"report: {os.path.join(out, 'report' + mode.get('suffix', '') + '.md')} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    run_cli(main)
