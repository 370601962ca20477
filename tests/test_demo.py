"""make demo DEMO=quick, end to end on the real ELTeC novels (the slices vendored in tests/data/eltec, as on a fresh
clone): data, source and helper, CLP, six German variants, evaluation, report and plot; a rerun finds every stage
cached; DEMO=init-quick adds the other initialisations."""

import json
import math
import os

import pytest
from conftest import ELTEC, run_py

import demo
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
    init = run_py(["demo.py", "--mode", "init-quick", "--out", str(tmp_path)], env=offline, timeout=900)
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


def test_tokens_to_reach():
    curve = [(0, 1000.0), (100, 500.0), (200, 300.0), (300, 250.0)]
    assert demo.tokens_to_reach(curve, 400.0) == 150.0
    assert demo.tokens_to_reach(curve, 300.0) == 200.0
    assert demo.tokens_to_reach(curve, 2000.0) == 0
    assert demo.tokens_to_reach(curve, 100.0) is None


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
