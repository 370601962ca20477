"""The benchmark's reference implementations must compute what they stand for, or its ratios mean nothing."""

import numpy as np
import torch

import bench
from clp import clp_embeddings


def test_original_loop_computes_what_clp_py_computes():
    g = torch.Generator().manual_seed(0)
    helper = torch.randn(300, 16, generator=g) + 2.0 * torch.randn(16, generator=g)  # anisotropic, sums > 0
    source = torch.randn(280, 24, generator=g)
    perm = torch.randperm(300, generator=g)
    shared_helper, missing = perm[:120], perm[120:]
    shared_src = torch.randperm(280, generator=g)[:120]
    loop = bench.original_loop(source, helper, shared_src, shared_helper, missing)
    ours, fallback = clp_embeddings(source, helper, shared_src, shared_helper, missing)
    assert fallback.numel() == 0
    for t, row in loop.items():
        np.testing.assert_allclose(ours[t].numpy(), row, rtol=1e-4, atol=1e-5)


def test_synthetic_data_is_what_train_py_reads(tmp_path):
    import data

    bench.synthetic_data(tmp_path, vocab=1000, n_tokens=5000)
    meta = data.load_meta(tmp_path)
    blocks = data.Blocks(str(tmp_path / "train.bin"), meta["dtype"], 32, shuffle_seed=0)
    x, y = blocks.batch(0, 4)
    assert x.shape == (4, 32) and int(x.max()) < 1000 and torch.equal(x[:, 1:], y[:, :-1])


def test_data_part_runs_from_the_repository_and_says_why_when_it_cannot(tmp_path, monkeypatch):
    """A fresh clone measures data.py against bare `tokenizers` from the vendored ELTeC slices and Pythia tokenizer;
    what it cannot measure is null with the reason in bench.json (no CUDA here: the GPU figures; a wrong ELTEC_DIR:
    the data figure), and the table says so."""
    import json

    import bench

    monkeypatch.delenv("ELTEC_DIR", raising=False)
    monkeypatch.setattr(bench, "DATA_MIB", {True: 1, False: 1})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = bench.main(["--quick", "--only", "data,gpu", "--out", str(tmp_path / "a")])
    assert json.loads((tmp_path / "a" / "bench.json").read_text()) == json.loads(json.dumps(r))
    assert r["data"]["text"] == "tests/data/eltec/deu" and 0.9 < r["data"]["mib"] < 1.5
    assert 0 < r["data_vs_tokenizers_ceiling"] == r["data"]["ratio"] and r["data"]["tokens"] > 100_000
    assert r["mfu"] is None and r["tokens_per_s"] is None and r["gpu"] == {"skipped": "no CUDA device"}

    monkeypatch.setenv("ELTEC_DIR", str(tmp_path / "empty"))
    r = bench.main(["--quick", "--only", "data", "--out", str(tmp_path / "b")])
    assert r["data_vs_tokenizers_ceiling"] is None and "no German ELTeC novels" in r["data"]["skipped"]
    assert "data_vs_tokenizers_ceiling" in bench.table(r) and "null" in bench.table(r)
