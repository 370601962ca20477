"""The benchmark's reference implementations must compute what they stand for, or its ratios mean nothing."""

import json

import numpy as np
import pytest
import torch

import bench
from clp import Match, clp_embeddings
from model import GPTNeoX, GPTNeoXConfig


def test_original_loop_computes_what_clp_py_computes():
    g = torch.Generator().manual_seed(0)
    helper = torch.randn(300, 16, generator=g) + 2.0 * torch.randn(16, generator=g)  # anisotropic, sums > 0
    source = torch.randn(280, 24, generator=g)
    perm = torch.randperm(300, generator=g)
    shared_helper, missing = perm[:120], perm[120:]
    shared_src = torch.randperm(280, generator=g)[:120]
    loop = bench.original_loop(source, helper, shared_src, shared_helper, missing)
    ours, fallback = clp_embeddings(source, helper, Match(shared_src, shared_helper, missing, rows=300))
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


def test_fvt_part_times_the_real_tokenizers_split(tmp_path):
    """The FVT figure is GPT-2's new tokens against the real Pythia tokenizer (the vendored ones), both steps timed."""
    r = bench.bench_fvt(str(tmp_path))
    assert r["new_tokens"] == 13_319 and r["mean_pieces"] == pytest.approx(2.087, abs=1e-3)
    assert r["seconds"] == pytest.approx(r["tokenize_seconds"] + r["products_seconds"]) and r["products_seconds"] > 0


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


def test_gpu_figures_on_a_card_without_a_known_peak(tmp_path):
    """A GPU missing from train.PEAK_FLOPS: its steps carry no MFU, so the GPU part reports tokens/s, MFU null and
    the reason, and the table prints that (no StatisticsError)."""
    steps = [{"step": i, "dt_s": 0.1, "tokens_per_s": 1000.0} for i in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    figures = bench.gpu_figures(tmp_path / "metrics.jsonl", 1000.0, "NVIDIA Future GPU", 8)
    assert figures["mfu"] is None and "NVIDIA Future GPU" in figures["mfu_skipped"]
    assert "1,000 tok/s on NVIDIA Future GPU" in bench.table({"machine": bench.machine(), "gpu": {"pythia-160m": figures}})
    with_peak = [dict(s, mfu=0.4 + 0.01 * s["step"]) for s in steps]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in with_peak))
    assert bench.gpu_figures(tmp_path / "metrics.jsonl", 1000.0, "NVIDIA H100", 8)["mfu"] == pytest.approx(0.48)


def test_memory_model_counts_what_train_py_keeps():
    """The what-fits model: 16 bytes of fp32 state per parameter under DDP, a 1/N share under FSDP, activation
    checkpointing keeping a fraction of the activations, and the Pythia sizes' parameter counts."""
    m = bench.memory_model(dict(n_layer=2, n_head=2, n_embd=64, vocab_size=512), block_size=64)
    assert m["n_params"] == sum(p.numel() for p in GPTNeoX(GPTNeoXConfig(vocab_size=512, n_layer=2, n_head=2, n_embd=64,
                                                                 intermediate_size=256)).parameters())
    ddp, fsdp = (bench.bytes_per_gpu(m, p, 8, False, 0) for p in ("ddp", "fsdp"))
    assert ddp == 18 * m["n_params"]  # and autocast's bf16 copies of the weights
    assert fsdp == 2 * m["n_params"] + m["largest_group"] * 8 + m["block_params"] * 2
    assert 0 < m["checkpointed_activation_bytes_per_token"] < m["activation_bytes_per_token"]
    loss_chunk = m["loss_chunk_tokens"] * m["loss_bytes_per_token"]  # the logits of one chunk of positions at most
    assert bench.bytes_per_gpu(m, "ddp", 8, True, 100) - ddp == 100 * (m["checkpointed_activation_bytes_per_token"]
                                                                       + m["loss_bytes_per_token"])
    assert bench.bytes_per_gpu(m, "ddp", 8, True, 10**5) - ddp == 10**5 * m["checkpointed_activation_bytes_per_token"] \
        + loss_chunk


def test_memory_model_knows_the_llama_family():
    """The memory model builds any family: a tied GQA Llama counts its one embedding matrix once (and as the largest
    FSDP group with the head), its key/value heads keep a quarter of the query heads' activations; the real shapes
    of FITS_MODELS have their published parameter counts."""
    from model import Llama, LlamaConfig

    shape = dict(model_type="llama", n_layer=2, n_head=4, n_kv_head=1, n_embd=64, intermediate_size=160,
                 vocab_size=1024, tie_word_embeddings=True)
    m = bench.memory_model(shape, block_size=64)
    model = Llama(LlamaConfig(**shape))
    assert m["n_params"] == sum(p.numel() for p in model.parameters()) == 2 * (64 * 64 * 2 + 2 * 64 * 16 + 3 * 64
                                                                                * 160 + 2 * 64) + 64 + 1024 * 64
    assert m["largest_group"] == 1024 * 64
    mha = bench.memory_model(dict(shape, n_kv_head=4), block_size=64)
    assert 0 < m["activation_bytes_per_token"] < mha["activation_bytes_per_token"]
    published = {"Qwen2.5-0.5B": 494_032_768, "Qwen2.5-1.5B": 1_543_714_304, "Qwen2.5-7B": 7_615_616_512,
                 "Llama-3.2-1B": 1_235_814_400, "Llama-3.2-3B": 3_212_749_824, "Llama-3.1-8B": 8_030_261_248}
    for name, n in published.items():
        with torch.device("meta"):
            assert sum(p.numel() for p in Llama(LlamaConfig(**bench.FITS_MODELS[name])).parameters()) == n, name
