"""gpu_check.py (make gpu-check) in its CPU dry run: every part at toy sizes, so the script the GPU machine runs is
tested here; and its time budget, which skips what cannot fit."""

import json

import pytest

import gpu_check
from conftest import run_py


def test_dry_run_passes_every_part_and_writes_the_results(tmp_path):
    r = run_py(["gpu_check.py", "--out", str(tmp_path), "--dry-run"], env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = results["parts"]
    assert list(parts) == [name for name, _, _ in gpu_check.PARTS]
    assert {name: p["status"] for name, p in parts.items()} == {name: "PASS" for name in parts}, parts
    for name in parts:
        assert f"PASS {name} (" in r.stdout
    assert results["dry_run"] and results["device"] == "cpu" and results["torch"]
    for family in ("gpt_neox", "llama"):
        assert parts["bf16_parity"]["figures"][family]["decided_agreement"] == 1.0
    for name in ("train_160m", "train_410m"):
        f = parts[name]["figures"]
        assert f["embedding"]["steps"] == f["full"]["steps"] == 3 and f["batch1_step_s"] > 0
    fsdp = parts["fsdp_resume"]["figures"]
    assert fsdp["resumed_from_step"] == 4 and fsdp["steps"] == 16
    assert parts["float16"]["figures"]["scale"] == 32768.0
    assert parts["eval_clp"]["figures"]["clp_max_diff"] == 0.0
    assert "train.py" in (tmp_path / "gpu_check.log").read_text()


def test_a_part_the_time_left_cannot_cover_is_skipped_saying_so(tmp_path):
    r = run_py(["gpu_check.py", "--out", str(tmp_path), "--dry-run", "--budget=0"])
    assert r.returncode == 0, r.stderr[-3000:]
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert {p["status"] for p in parts.values()} == {"SKIP"}
    assert "the part takes about 30 s on one H200" in parts["bf16_parity"]["reason"]
    assert "SKIP float16" in r.stdout


def test_bf16_agreement_counts_only_positions_rounding_cannot_flip():
    """Two positions: one decided (margin 1.0 > 2 x the reference's error 0.1), one a near tie (margin 0.05); ours
    flips the tie (allowed) but keeps the decided one."""
    import torch

    exact = torch.tensor([[[3.0, 2.0, 0.0], [1.0, 0.95, 0.0]]])
    reference = exact + torch.tensor([[[0.1, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    ours = torch.tensor([[[2.9, 2.05, 0.0], [0.95, 1.0, 0.0]]])
    f = gpu_check.bf16_agreement(exact, ours, reference)
    assert (f["decided_positions"], f["positions"], f["decided_agreement"]) == (1, 2, 1.0)
    assert f["reference_max_err"] == pytest.approx(0.1)
    ours[0, 0] = torch.tensor([1.9, 2.0, 0.0])  # the decided position flipped: a real error
    assert gpu_check.bf16_agreement(exact, ours, reference)["decided_agreement"] == 0.0
