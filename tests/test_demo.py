"""make demo DEMO=quick, end to end on the real ELTeC novels (the slices vendored in tests/data/eltec, as on a fresh
clone): data, source and helper, CLP, six German variants, evaluation, report and plot; a rerun finds every stage
cached; DEMO=init-quick adds the other initialisations, DEMO=study-quick every regime of the study at three seeds."""

import json
import math
import os
import re

import pytest
from conftest import ELTEC, ROOT, run_py

import demo
import train
from common import UserError


def test_quick_demo_end_to_end(tmp_path):
    offline = {"ELTEC_DIR": "", "DATA_URL_CACHE": str(tmp_path / "no-downloads")}  # the vendored slices
    r = run_py(["demo.py", "--mode", "quick", "--out", str(tmp_path)], env=offline, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    meta = json.loads((tmp_path / "data-deu" / "meta.json").read_text())
    assert [os.path.relpath(s["source"], ELTEC) for s in meta["sources"]["train"]] == [
        os.path.join("deu", f"DEU00{i}.xml.gz") for i in (2, 3, 7)]
    assert not (tmp_path / "no-downloads").exists()
    report = (tmp_path / "report.md").read_text()
    for _, label, *_ in demo.VARIANTS:
        assert f"| {label} |" in report
    assert (tmp_path / "ppl_curves.png").stat().st_size > 10_000
    finals = {}
    for name, *_ in demo.VARIANTS:
        summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
        curve = [json.loads(line)["val_ppl"] for line in open(tmp_path / "runs" / name / "metrics.jsonl")
                 if "val_ppl" in line]
        curve = [math.inf if p is None else p for p in curve]  # a diverged start is written as null
        assert abs(summary["tokens"] - 60_000) <= 8 * 64 and curve[-1] < curve[0] / 2, (name, curve)  # one step
        finals[name] = curve[-1]
    # the method works even at this scale: CLP (with the extrapolation fallback the tiny helper needs) ends well
    # below training from scratch on the same tokens
    assert finals["clp_guarded"] < 0.9 * finals["scratch"], finals
    clp_report = json.loads((tmp_path / "init-clp" / "clp_report.json").read_text())
    assert 0 < clp_report["shared_tokens"] < 1024

    again = run_py(["demo.py", "--mode", "quick", "--out", str(tmp_path)], env=offline)
    assert again.returncode == 0 and ": running" not in again.stdout, again.stdout
    assert again.stdout.count(": cached") == 16

    # DEMO=init at the quick size, in the same directory: the runs it shares with the demo are not trained again;
    # mean, FVT and CLP+ are
    init = run_py(["demo.py", "--mode", "init-quick", "--out", str(tmp_path), "--jobs", "2"], env=offline,
                  timeout=900)
    assert init.returncode == 0, init.stdout[-3000:] + init.stderr[-3000:]
    assert sorted(line for line in init.stdout.splitlines() if ": running" in line) == sorted(
        ["== FVT initialisation (--method fvt): running", "== CLP+ initialisation (--weighting sparsemax): running",
         "== mean initialisation (--method mean): running", "== train mean: running", "== train fvt: running",
         "== train clp_plus: running"])
    table = (tmp_path / "report-init.md").read_text()
    for _, label, *_ in demo.INIT_VARIANTS:
        assert f"| {label} |" in table
    assert "FVT: the source tokenizer splits" in table and (tmp_path / "ppl_curves-init.png").stat().st_size > 10_000
    assert (tmp_path / "report.md").read_text() == report  # the demo's own report stays
    fvt = json.loads((tmp_path / "init-fvt" / "clp_report.json").read_text())
    assert fvt["method"] == "fvt" and sum(fvt["fvt"]["pieces_histogram"].values()) == fvt["new_tokens"]

    # DEMO=extend at the quick size, in the same directory: the extended init, its German token files and two runs
    # are new; the replacement run is the demo's
    ext = run_py(["demo.py", "--mode", "extend-quick", "--out", str(tmp_path), "--jobs", "2"], env=offline,
                 timeout=900)
    assert ext.returncode == 0, ext.stdout[-3000:] + ext.stderr[-3000:]
    assert len([line for line in ext.stdout.splitlines() if ": running" in line]) == 4, ext.stdout
    init_report = json.loads((tmp_path / "init-extend" / "clp_report.json").read_text())["extend"]
    assert init_report["appended_tokens"] == demo.MODES["extend-quick"]["extend"]
    assert init_report["first_appended_id"] == 1024
    table = (tmp_path / "report-extend.md").read_text()
    fertility = {m[1]: float(m[2]) for m in re.finditer(r"\| ([^|]+) \| [\d,]+ \| ([\d.]+) \|", table)}
    assert fertility["extended (source + German)"] < 0.9 * fertility["English source"], table
    bpb = {m[1]: m.groups()[1:] for m in re.finditer(
        r"\| ([^|]+) \| (?:([\d.]+) → )?([\d.]+) \| [^|]+ \| (?:([\d.]+) → )?([\d.]+) \|", table)}
    # German improves in every run; English is kept far better by extension than by replacement
    for label in ("CLP (fallback) + embedding phase (10%)", "extension + embedding phase on the new rows only"):
        assert float(bpb[label][1]) < float(bpb[label][0]), table
    assert float(bpb["extension + embedding phase on the new rows only"][3]) < float(
        bpb["CLP (fallback) + embedding phase (10%)"][3]) - 0.5, table

    # DEMO=study at the quick size, in the same directory: every regime at three seeds from the demo's stages (none
    # made again), the best CLP regime repeated from CLP+ and from FVT
    study = run_py(["demo.py", "--mode", "study-quick", "--out", str(tmp_path), "--jobs", "2"], env=offline,
                   timeout=1800)
    assert study.returncode == 0, study.stdout[-3000:] + study.stderr[-3000:]
    seeds = (42, 43, 44)
    regimes = [name for name, *_ in demo.STUDY_REGIMES]
    assert sorted(line for line in study.stdout.splitlines() if ": running" in line) == sorted(
        [f"== train {name} seed {seed}: running" for name in regimes for seed in seeds]
        + [f"== from-scratch initialisation (init-scratch-seed{seed}): running" for seed in (43, 44)])
    runs = tmp_path / "runs" / f"study-{demo.MODES['study-quick']['study']['tokens']}"

    def curve(run_dir):
        return [(m["tokens"], m["val_ppl"]) for m in map(json.loads, open(run_dir / "metrics.jsonl")) if "val_ppl" in m]

    def summary(run_dir):
        return json.loads((run_dir / "summary.json").read_text())

    # the rule, from the runs' own files: of the CLP regimes, the one whose seeds all reach regular pre-training's
    # final validation perplexity (at the same seed) with the fewest tokens on average
    reach = {}
    for name, _, init, *_ in demo.STUDY_REGIMES:
        if init == "init-clp-guarded":
            per_seed = [demo.tokens_to_reach(curve(runs / name / f"seed{s}"),
                                             curve(runs / "baseline" / f"seed{s}")[-1][1]) for s in seeds]
            reached = [t for t in per_seed if t is not None]
            reach[name] = (3 - len(reached), sum(reached) / max(1, len(reached)))
    best = min(reach, key=reach.get)
    best_label = next(label for name, label, *_ in demo.STUDY_REGIMES if name == best)
    for repeat in ("from_clp_plus", "from_fvt"):
        assert all((runs / f"{repeat}-{best}" / f"seed{s}" / "summary.json").is_file() for s in seeds)
    report = (tmp_path / "report-study.md").read_text()
    assert report.startswith("# The study at toy scale: every regime at 3 seeds (study-quick)")
    for question in ("1. **Does the embedding phase make perplexity fall faster, with less time and memory?**",
                     "2. **Does the model end with a better validation perplexity than regular pre-training?**"):
        assert question in report
    assert f"then the lowest final perplexity: {best_label}." in report
    labels = [label for name, label, _, script, _ in demo.STUDY_REGIMES if script] + [
        f"{best_label}, from CLP+", f"{best_label}, from FVT"]
    for label in labels:
        assert f"| {label} |" in report and all(f"| {label} | {s} |" in report for s in seeds)
    finals = [math.exp(summary(runs / "baseline" / f"seed{s}")["final_val_full_loss"]) for s in seeds]
    assert f"| {sum(finals) / 3:,.1f} ± " in report.split("| regular pre-training (one phase) |")[1].split("\n")[0]
    assert (tmp_path / "ppl_curves-study.png").stat().st_size > 10_000
    assert "; up to 2 training runs at once (--jobs): their times include sharing the cores." in report
    assert (runs / "et10" / "seed43.log").read_text().rstrip().endswith(f"exported {runs}/et10/seed43/hf")

    # the seed orders the training blocks (and draws from-scratch's start); the CLP start has no random rows; the
    # study's from-scratch at the demo's seed starts where the demo's did
    first_loss = [json.loads(open(runs / "et10" / f"seed{s}" / "metrics.jsonl").readlines()[1])["loss"] for s in seeds]
    assert len(set(first_loss)) == 3
    assert len({curve(runs / "et10" / f"seed{s}")[0] for s in seeds}) == 1
    assert len({curve(runs / "scratch" / f"seed{s}")[0] for s in seeds}) == 3
    assert curve(runs / "scratch" / "seed42")[0] == curve(tmp_path / "runs" / "scratch")[0]
    # the embedding phase's memory, measured: only the (untied) input and output embeddings hold Adam's two moments
    config = json.loads((runs / "frozen" / "seed42" / "hf" / "config.json").read_text())
    embeddings = 2 * config["vocab_size"] * config["hidden_size"]
    frozen, regular = summary(runs / "frozen" / "seed42"), summary(runs / "baseline" / "seed42")
    assert list(frozen["phases"]) == ["embedding"] and not config["tie_word_embeddings"]
    assert 8 * embeddings <= frozen["rank0_optimizer_state_bytes"] < 8 * embeddings + 1024
    assert regular["rank0_optimizer_state_bytes"] > 1.5 * frozen["rank0_optimizer_state_bytes"]

    again = run_py(["demo.py", "--mode", "study-quick", "--out", str(tmp_path)], env=offline)
    assert again.returncode == 0 and ": running" not in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
    assert (tmp_path / "report-study.md").read_text() == report


def test_runs_at_once_stop_starting_at_a_failure(tmp_path, capsys):
    """demo.py --jobs 2: two runs start together, each writing its log; when one fails, the one going finishes, no
    other starts, and the error names the failed run's log (whose end is printed)."""
    runs = [(str(tmp_path), name, "train.py", [f"--no_such_key_{name}=1"], None) for name in ("a", "b", "c")]
    with pytest.raises(UserError) as failed:
        demo.train(runs, jobs=2)
    first = str(failed.value).split()[1]  # a and b both fail; the first to end is named
    assert first in ("a", "b") and str(failed.value) == (f"training {first} failed (its log: {tmp_path}/{first}.log); "
                                                         "rerun `make demo` to resume it")
    assert sorted(os.listdir(tmp_path)) == ["a.log", "b.log"]
    assert all(f"no_such_key_{name}" in (tmp_path / f"{name}.log").read_text() for name in ("a", "b"))
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if line.startswith("==")] == ["== train a: running",
                                                                           "== train b: running"]
    assert f"no_such_key_{first}" in err


def test_quick_llama_demo_end_to_end(tmp_path):
    """make demo DEMO=quick ARCH=llama: the same pipeline with a Llama-shaped source and helper (GQA, SwiGLU, tied),
    so every German start is one (CLP keeps the tied matrix tied), each trains and evaluates, and CLP with the
    fallback ends below training from scratch."""
    offline = {"ELTEC_DIR": "", "DATA_URL_CACHE": str(tmp_path / "no-downloads")}
    r = run_py(["demo.py", "--mode", "quick", "--arch", "llama", "--out", str(tmp_path), "--jobs", "2"], env=offline,
               timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# CLP-Transfer at toy scale (quick demo, Llama-shaped models)")
    for model, heads in (("source/hf", (2, 1)), ("helper/hf", (1, 1)), ("init-clp", (2, 1)),
                         ("runs/clp_et/hf", (2, 1))):
        c = json.loads((tmp_path / model / "config.json").read_text())
        assert (c["architectures"], c["tie_word_embeddings"], c["num_attention_heads"], c["num_key_value_heads"]) \
            == (["LlamaForCausalLM"], True, *heads), model
    finals = {}
    for name, label, *_ in demo.VARIANTS:
        assert f"| {label} |" in report
        curve = [json.loads(line)["val_ppl"] for line in open(tmp_path / "runs" / name / "metrics.jsonl")
                 if "val_ppl" in line]
        curve = [math.inf if p is None else p for p in curve]
        assert curve[-1] < curve[0] / 2, (name, curve)
        finals[name] = curve[-1]
    assert finals["clp_guarded"] < 0.9 * finals["scratch"], finals
    frozen = json.loads((tmp_path / "runs" / "clp_et" / "summary.json").read_text())["phases"]
    assert list(frozen) == ["embedding", "full"]


def test_the_quick_modes_read_only_the_vendored_slices_and_the_docstring_times_are_the_readmes():
    """DEMO=quick, init-quick and study-quick on a fresh clone, ELTEC_DIR unset: every novel they read is a vendored
    slice (no URL: nothing to download); the default size reads the pinned URLs. demo.py's docstring and the
    Makefile give the README's times."""
    for mode in [m for m in demo.MODES if m.endswith("quick")]:
        sources = [s for split in demo.mode_novels(mode, None).values() for s in split]
        assert sources and all(os.path.isfile(s) and os.path.commonpath([s, ELTEC]) == ELTEC for s in sources), mode
    assert all("://" in s for split in demo.mode_novels("init", None).values() for s in split)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    quick = re.search(r"make demo DEMO=quick +# about (\d+ \w+), offline", readme).group(1)
    default = re.search(r"make demo +# about (\d+ \w+ on 2 CPU cores)", readme).group(1)
    assert f"`make demo` (about {default}" in demo.__doc__ and f"`make demo DEMO=quick` (about {quick}" in demo.__doc__
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        assert f"DEMO=quick: about {quick}, offline" in f.read()


def test_tokens_to_reach():
    curve = [(0, 1000.0), (100, 500.0), (200, 300.0), (300, 250.0)]
    assert demo.tokens_to_reach(curve, 400.0) == 150.0
    assert demo.tokens_to_reach(curve, 300.0) == 200.0
    assert demo.tokens_to_reach(curve, 2000.0) == 0
    assert demo.tokens_to_reach(curve, 100.0) is None
    assert demo.tokens_to_reach([(0, math.inf), (100, 600.0), (200, 300.0)], 700.0) == 100  # a diverged start


def test_a_demo_of_another_mode_does_not_reuse_the_stages(tmp_path, monkeypatch):
    """A --mode default demo into a --mode quick demo's folder would count every stage as done and report the quick
    run's numbers as the default demo's: refused before any stage runs (the same mode goes on)."""
    monkeypatch.setattr(demo, "prepare_data", lambda *a: pytest.fail("no stage may run"))
    sizes = {k: v for k, v in demo.MODES["quick"].items() if k not in ("variants", "out", "suffix")}
    (tmp_path / "demo_mode.json").write_text(json.dumps({"mode": "quick", "sizes": sizes}))
    for other in ("default", "init"):
        with pytest.raises(UserError, match=f"{tmp_path} holds the stages of a --mode quick demo"):
            demo.main(["--mode", other, "--out", str(tmp_path)])
    monkeypatch.setattr(demo, "prepare_data", lambda *a: (_ for _ in ()).throw(RuntimeError("went on")))
    for same_size in ("quick", "init-quick"):  # DEMO=init-quick reuses the quick demo's stages
        with pytest.raises(RuntimeError, match="went on"):
            demo.main(["--mode", same_size, "--out", str(tmp_path)])


def test_study_regimes_are_the_settings_their_labels_name():
    """DEMO=study's regimes, parsed as train.py parses them: each the study's setting, on one budget, at the seeds
    (the demo's first, whose from-scratch start is the demo's); the phases each gets at the default size."""
    regimes = [r[0] for r in demo.STUDY_REGIMES]
    plan = demo.study_plan("/no/such/out", demo.MODES["study"], regimes, [42, 43, 44], 250_000)
    assert sorted({r for r, _ in plan}) == sorted(r for r in regimes if not r.startswith("from_"))  # later: the best
    cfg = {key: run["cfg"] for key, run in plan.items()}
    assert {(c.seed, c.max_tokens, c.eval_interval) for (_, seed), c in cfg.items()} == {
        (s, 250_000, 10) for s in (42, 43, 44)}
    assert demo.DEMO_SEED == train.parse_config([demo.config_path("target")]).seed == 42
    assert [cfg[f"et{p}", 43].embedding_tuning_frac for p in (5, 10, 25, 50)] == [0.05, 0.1, 0.25, 0.5]
    assert cfg["et10", 43].freeze_transformer and not cfg["accelerated", 43].freeze_transformer
    assert cfg["unified", 43].lr_schedule == "unified" and cfg["et10", 43].lr_schedule == "cosine"
    warm = cfg["warmup10", 43]
    assert (warm.warmup_relative_to, warm.embedding_warmup_frac, warm.warmup_frac) == ("phase", 0.1, 0.1)
    vbs = cfg["vbs", 43]
    assert (vbs.phase_unit, vbs.embedding_batch_size, vbs.embedding_gradient_accumulation_steps) == ("tokens", 2, 1)
    assert cfg["scratch", 42].init_from == "/no/such/out/init-scratch"  # the demo's from-scratch start
    assert cfg["scratch", 43].init_from == "/no/such/out/init-scratch-seed43"
    assert demo.scratch_start(42) == ("init-scratch", demo.SCRATCH_SEED) != demo.scratch_start(43)
    phases = {r: [(p.name, p.steps) for p in train.plan_phases(c, train_blocks=0)] for (r, s), c in cfg.items()
              if s == 42}
    assert phases["baseline"] == phases["scratch"] == [("full", 122)]  # 122 steps of 16 x 128 tokens
    assert phases["et5"] == [("embedding", 7), ("full", 115)] and phases["et50"] == [("embedding", 61), ("full", 61)]
    assert phases["frozen"] == [("embedding", 122)]
    assert phases["vbs"] == [("embedding", 98), ("full", 109)]  # 10% of the tokens at 2 x 128 a step


def test_study_bad_input_is_one_line_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "prepare_data", lambda *a: pytest.fail("no stage may run"))
    for argv, message in [(["--regimes", "et10,et7"], "--regimes: unknown regime 'et7' (expected some of baseline"),
                          (["--tokens", "1000"], "--tokens=1000: too small for et5 (embedding phase 5%): 1 "
                                                 "embedding-phase step(s) and 0 full-phase step(s)"),
                          (["--seeds", "1"], "--seeds=1: the spread over seeds needs at least 2")]:
        with pytest.raises(UserError, match=re.escape(message)):
            demo.main(["--mode", "study-quick", "--out", str(tmp_path), *argv])
    with pytest.raises(UserError, match="--seeds, --regimes and --tokens are options of --mode study"):
        demo.main(["--mode", "quick", "--out", str(tmp_path), "--seeds", "5"])
    assert not any(tmp_path.iterdir())  # nothing written, not even demo_mode.json
    r = run_py(["demo.py", "--mode", "study", "--out", str(tmp_path), "--regimes", "warmup1"])
    assert r.returncode == 1 and r.stderr.startswith("error: --regimes: unknown regime 'warmup1'"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_study_rule_and_its_spread():
    assert demo.spread([1.0, 2.0, 3.0]) == (2.0, 1.0, 1.0, 3.0)
    assert demo.beyond_spread([10.0, 11.0, 12.0], [14.0, 15.0, 16.0])  # 4 > 2 x pooled sd 1
    assert not demo.beyond_spread([10.0, 11.0, 12.0], [11.0, 12.0, 13.0])
    assert demo.beyond_spread([10.0, 10.0], [10.5, 10.5]) and not demo.beyond_spread([3.0, 3.0], [3.0, 3.0])
    assert demo.show([1.0, 2.0, 3.0]) == "2.0 ± 1.0 (1.0–3.0)"
    assert demo.show([None, 50.0, 70.0], 0, "%") == "not reached at 1 of 3 seeds; 60% ± 14 (50–70)"
    # the best regime: all seeds reach regular pre-training's final perplexity, then the fewest tokens (mean), from
    # the CLP start only
    reach = {"baseline": [100, 100], "et10": [60, 70], "et25": [40, None], "et50": [62, 66], "scratch": [1, 1]}
    results = {(name, seed): dict(init="init-scratch" if name == "scratch" else "init-clp-guarded",
                                  reach_baseline=r, final_ppl=10.0, seed=seed)
               for name, per_seed in reach.items() for seed, r in zip((42, 43), per_seed)}
    assert demo.best_regime(results) == "et50"
    results["et10", 43]["reach_baseline"] = 56
    assert demo.best_regime(results) == "et10"  # 58 < 64
    assert [name for name in demo.by_regime(results)] == ["baseline", "et10", "et25", "et50", "scratch"]
