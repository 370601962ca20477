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
