"""clp.py: the formula by hand and against a reference from its definition, tiny HF-format models built with
transformers (the independent reference for loading the target), the real Pythia and GPT-2 tokenizers' overlap,
options and errors."""

import json
import math
import os

import pytest
import torch
from conftest import gpt2_helper, hf_neox, make_hub_cache, run_py, safetensors_state, tiny_source_and_helper

from clp import (Match, TransferOptions, apply_clp, clp_embeddings, match_vocabularies, random_embeddings, sparsemax,
                 token_bytes)
from common import UserError, load_tokenizer, save_tokenizer, sha256_file
from model import GPTNeoX

# -----------------------------------------------------------------------------
# the formula on raw tensors

# helper space (2-d): ids 0-2 are the shared tokens a, b, c; 3-5 have a positive similarity sum, 6-8 do not
H = torch.tensor([[1., 0], [0, 1], [-1, 0], [1, 1], [3, 4], [-3, 1], [-1, -1], [0, 0], [0, -1]])
# source (3-d): a, b, c are source ids 2, 4, 0 with one-hot rows, so a computed row reads as its weights (w_a, w_b, w_c)
SRC = torch.tensor([[0., 0, 1], [9, 9, 9], [1, 0, 0], [7, 7, 7], [0, 1, 0]])
SHARED_SRC, SHARED_HELPER, MISSING = [2, 4, 0], [0, 1, 2], [3, 4, 5, 6, 7, 8]
r10, third = 1 / math.sqrt(10), 1 / 3
BY_HAND = torch.tensor([
    [1, 0, 0], [0, 1, 0], [0, 0, 1],  # copied
    [1, 1, -1],  # cos (.71, .71, -.71), sum .71: the paper's weights (1, 1, -1), negative cosines included
    [.75, 1, -.75],  # cos (.6, .8, -.6), sum .8
    [-3, 1, 3],  # cos (-3, 1, 3)/sqrt(10), sum 1/sqrt(10)
    [0, 0, 1],  # cos (-.71, -.71, .71), sum < 0: fallback to the positive similarities (only c)
    [third, third, third],  # zero vector, all cos 0: fallback to the plain mean
    [third, third, third],  # cos (0, -1, 0): no positive similarity, plain mean
    [third, third, third],  # row 9: no token (padding), the mean of the shared source rows
])


def test_formula_copy_rule_and_fallback_by_hand():
    out, fallback = clp_embeddings(SRC, H, Match(SHARED_SRC, SHARED_HELPER, MISSING, rows=10), chunk_size=4)
    torch.testing.assert_close(out, BY_HAND, rtol=0, atol=1e-6)
    assert fallback.tolist() == [6, 7, 8]
    # several source matrices (input and output embeddings) get the same weights; the dtype is the source's, and
    # copied rows are bit-identical
    src16 = (SRC * 3 + torch.randn(5, 3, generator=torch.Generator().manual_seed(0))).half()
    (a, b), _ = clp_embeddings([SRC, src16], H, Match(SHARED_SRC, SHARED_HELPER, MISSING, rows=10))
    assert a.dtype == torch.float32 and b.dtype == torch.float16
    assert torch.equal(b[[0, 1, 2]], src16[SHARED_SRC])
    torch.testing.assert_close(b[3:].float(), (BY_HAND[3:] @ src16[SHARED_SRC].float()).half().float())


def test_extrapolation_fallback_by_hand():
    """Opt-in: a row longer than the longest shared source row is no average (its weights extrapolate). With
    one-hot source rows every negative weight does that, so rows 3-5 average their positive similarities:
    (.71, .71) -> (.5, .5, 0); (.6, .8) -> (3/7, 4/7, 0); (1, 3)/sqrt(10) -> (0, .25, .75). The paper's a + b - c
    for source rows a = (1, 0), b = (0, 1), c = (1, 1) is (0, 0), within reach of an average: kept. t = (1, .05) has
    cosines (.9988, .0499, -.9988), weights (20, 1, -20), the sum (0, -19): replaced by (.9524, .0476, 0)."""
    out, fallback = clp_embeddings(SRC, H, Match(SHARED_SRC, SHARED_HELPER, MISSING, rows=10),
                                   extrapolation_fallback=True)
    torch.testing.assert_close(out[3:6], torch.tensor([[.5, .5, 0], [3 / 7, 4 / 7, 0], [0, .25, .75]]))
    torch.testing.assert_close(out[6:], BY_HAND[6:])
    assert fallback.tolist() == [3, 4, 5, 6, 7, 8]
    helper = torch.tensor([[1., 0], [0, 1], [-1, 0], [1, 1], [1, .05]])
    src = torch.tensor([[1., 0], [0, 1], [1, 1]])
    paper, fallback = clp_embeddings(src, helper, Match([0, 1, 2], [0, 1, 2], [3, 4], rows=5))
    torch.testing.assert_close(paper[3:], torch.tensor([[0., 0], [0, -19]]), rtol=0, atol=1e-4)
    assert fallback.numel() == 0
    guarded, fallback = clp_embeddings(src, helper, Match([0, 1, 2], [0, 1, 2], [3, 4], rows=5),
                                        extrapolation_fallback=True)
    torch.testing.assert_close(guarded[3:], torch.tensor([[0., 0], [1 / 1.05, .05 / 1.05]]), rtol=0, atol=1e-5)
    assert fallback.tolist() == [4]


def test_topk_and_sparsemax_by_hand():
    topk, fb = clp_embeddings(SRC, H, Match(SHARED_SRC, SHARED_HELPER, MISSING, rows=9), weighting="topk", top_k=2)
    torch.testing.assert_close(topk[3:6], torch.tensor([[.5, .5, 0], [3 / 7, 4 / 7, 0], [0, .25, .75]]))
    assert fb.tolist() == [6, 7, 8]
    sp, fb = clp_embeddings(SRC, H, Match(SHARED_SRC, SHARED_HELPER, MISSING, rows=9), weighting="sparsemax")
    torch.testing.assert_close(sp[3:9], torch.tensor([[.5, .5, 0], [.4, .6, 0], [0, .5 - r10, .5 + r10], [0, 0, 1],
                                                      [third, third, third], [.5, 0, .5]]))
    assert fb.numel() == 0


def test_sparsemax_candidate_shortcut_is_exact():
    z = torch.randn(40, 500, generator=torch.Generator().manual_seed(0))
    for scale in (0.01, 1.0, 10.0):  # wide supports (past the candidates) and narrow ones
        exact = sparsemax(z * scale, candidates=500)
        torch.testing.assert_close(sparsemax(z * scale, candidates=8), exact, rtol=0, atol=1e-6)
        torch.testing.assert_close(exact.sum(1), torch.ones(40))
    assert (sparsemax(z * 0.01, candidates=8) > 0).sum(1).min() > 8


def reference_clp(src, helper, shared_src, shared_helper, missing, weighting="dense", top_k=10):
    """The new rows straight from the definition, in float64: the full similarity matrix (the original's "batch sim"),
    weights per row, weighted sums."""
    norm = torch.nn.functional.normalize
    sims = norm(helper[missing].double(), dim=1) @ norm(helper[shared_helper].double(), dim=1).T
    if weighting == "topk":
        keep = sims.topk(top_k, dim=1).indices
        sims = torch.zeros_like(sims).scatter(1, keep, sims.gather(1, keep))
    if weighting == "sparsemax":  # the simplex projection, its threshold found by bisection
        lo, hi = sims.min(1, keepdim=True).values - 1, sims.max(1, keepdim=True).values
        for _ in range(100):
            tau = (lo + hi) / 2
            above = (sims - tau).clamp_min(0).sum(1, keepdim=True) > 1
            lo, hi = torch.where(above, tau, lo), torch.where(above, hi, tau)
        w = (sims - tau).clamp_min(0)
    else:
        w = sims / sims.sum(1, keepdim=True)
    return w @ src[shared_src].double()


@pytest.mark.parametrize("weighting", ["dense", "topk", "sparsemax"])
def test_matches_reference(weighting):
    g = torch.Generator().manual_seed(0)
    helper = torch.randn(300, 16, generator=g) + 1  # anisotropic, as trained embeddings are
    src = torch.randn(250, 24, generator=g)
    perm = torch.randperm(250, generator=g)
    shared_helper, missing = torch.arange(0, 300, 2), torch.arange(1, 300, 2)
    shared_src = perm[:150]
    out, fb = clp_embeddings(src, helper, Match(shared_src, shared_helper, missing, rows=300), weighting=weighting,
                             top_k=7, chunk_size=13)
    ref = reference_clp(src, helper, shared_src, shared_helper, missing, weighting, top_k=7)
    assert fb.numel() == 0
    torch.testing.assert_close(out[missing].double(), ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(out[shared_helper], src[shared_src])


# -----------------------------------------------------------------------------
# tiny HF-format models: GPT-NeoX source (English BPE), GPT-2 helper (German BPE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, eltec_tokenizers):
    """source: GPT-NeoX with the English BPE (6 spare rows, as Pythia has); helper: GPT-2 with the German BPE shipped
    as vocab.json + merges.txt, as GPT-2 repos do."""
    root = tmp_path_factory.mktemp("clp")
    source, helper, _ = tiny_source_and_helper(root, eltec_tokenizers, helper_vocab_and_merges=True)
    return source, helper, root


def test_tiny_models_end_to_end(tiny):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, helper, root = tiny
    target = root / "target"
    embed_in, embed_out, report = apply_clp(str(source), str(helper), str(target))
    assert sorted(os.listdir(target)) == ["clp_report.json", "config.json", "model.safetensors",
                                          "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert not [f for f in os.listdir(root) if f.startswith(".")]

    # the shared tokens are the set intersection of the two vocabularies, their rows the source rows (by string)
    src_vocab = load_tokenizer(str(source)).get_vocab(with_added_tokens=True)
    helper_tok = load_tokenizer(str(helper))
    helper_vocab = helper_tok.get_vocab(with_added_tokens=True)
    common = set(src_vocab) & set(helper_vocab)
    assert report["shared_tokens"] == len(common) and 0 < len(common) < len(helper_vocab)
    assert report["shared_fraction"] == pytest.approx(len(common) / len(helper_vocab), abs=1e-6)
    print(f"tiny ELTeC BPEs: {len(common)} of {len(helper_vocab)} German tokens shared")
    src_state = safetensors_state(source)
    h_ids = [helper_vocab[t] for t in common]
    s_ids = [src_vocab[t] for t in common]
    assert torch.equal(embed_in[h_ids], src_state["gpt_neox.embed_in.weight"][s_ids])
    assert torch.equal(embed_out[h_ids], src_state["embed_out.weight"][s_ids])

    # the new rows: the paper's formula with the helper's embeddings as transformers saved them
    wte = load_file(helper / "model.safetensors")["transformer.wte.weight"]
    missing = sorted(set(helper_vocab.values()) - set(h_ids))
    for name, key in ((embed_in, "gpt_neox.embed_in.weight"), (embed_out, "embed_out.weight")):
        ref = reference_clp(src_state[key], wte, s_ids, h_ids, missing)
        torch.testing.assert_close(name[missing].double(), ref, rtol=1e-4, atol=1e-6)
    assert report["fallback_rows"] == 0
    # the report counts the new rows no average could be: longer than every shared row of their matrix
    beyond = sum((m[missing].norm(dim=1) > src_state[k][s_ids].norm(dim=1).max() * 1.001).int()
                 for m, k in ((embed_in, "gpt_neox.embed_in.weight"), (embed_out, "embed_out.weight")))
    assert report["extrapolated_rows"] == int((beyond > 0).sum()) and not report["extrapolation_fallback"]

    # the target: helper's vocabulary padded to a multiple of 128, the source's body bit for bit
    n = len(helper_vocab)
    assert embed_in.shape[0] == embed_out.shape[0] == math.ceil(n / 128) * 128 == report["target_vocab_size"]
    pad_mean = src_state["gpt_neox.embed_in.weight"][s_ids].mean(0)
    torch.testing.assert_close(embed_in[n:], pad_mean.expand(embed_in.shape[0] - n, -1))
    tgt_state = safetensors_state(target)
    assert set(tgt_state) == set(src_state)
    for k, v in src_state.items():
        if "embed" not in k:
            assert torch.equal(tgt_state[k], v), k
    assert torch.equal(tgt_state["gpt_neox.embed_in.weight"], embed_in)

    # loads with model.GPTNeoX and with transformers, same logits; AutoTokenizer is the helper's tokenizer
    ours = GPTNeoX.from_pretrained(str(target)).eval()
    ref = AutoModelForCausalLM.from_pretrained(target, attn_implementation="eager").eval()
    idx = torch.randint(0, n, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], ref(input_ids=idx).logits, rtol=1e-4, atol=1e-4)
    text = "Es war einmal ein König, der hatte drei Töchter."
    tok = AutoTokenizer.from_pretrained(target)
    assert tok(text)["input_ids"] == helper_tok.encode(text).ids
    assert tok.eos_token == "<|endoftext|>" and ref.config.eos_token_id == helper_vocab["<|endoftext|>"]

    # the report names the inputs by hash
    saved = json.loads((target / "clp_report.json").read_text())
    assert saved["source"]["files"] == {"model.safetensors": sha256_file(source / "model.safetensors")}
    assert saved["helper"]["embedding"] == "transformer.wte.weight"
    assert saved["weighting"] == "dense" and saved["seed"] == 42 and saved["seconds"] >= 0
    assert saved["special_tokens"]["eos_token"]["init"].startswith("shared")


def test_output_embedding_modes_and_tied_source(tiny, eltec_tokenizers):
    from transformers import AutoModelForCausalLM

    source, helper, root = tiny
    src_state = safetensors_state(source)
    clp_in, clp_out, _ = apply_clp(str(source), str(helper))
    by_id_in, by_id, _ = apply_clp(str(source), str(helper), output_embeddings="source_by_id")
    assert torch.equal(by_id_in, clp_in)
    head = src_state["embed_out.weight"]  # the study's head: row i stays row i; rows beyond the source's: their mean
    assert torch.equal(by_id[:len(head)], head)
    torch.testing.assert_close(by_id[len(head):], head.mean(0).expand(len(by_id) - len(head), -1))
    _, rand, report = apply_clp(str(source), str(helper), output_embeddings="random", seed=3)
    d = rand.shape[1]
    assert abs(rand.std().item() / math.sqrt(2 / (5 * d)) - 1) < 0.03 and report["random_init_method"] == "small_init"
    assert torch.equal(rand, apply_clp(str(source), str(helper), output_embeddings="random", seed=3)[1])
    assert not torch.equal(clp_out, by_id) and not torch.equal(clp_out, rand)

    tied = root / "tied"
    hf_neox(vocab_size=1040, tie_word_embeddings=True).save_pretrained(tied)
    save_tokenizer(str(eltec_tokenizers["eng"]), str(tied))
    embed_in, embed_out, report = apply_clp(str(tied), str(helper), str(root / "tied-target"))
    assert embed_out is None and report["output_embeddings"] == "tied"
    model = AutoModelForCausalLM.from_pretrained(root / "tied-target")
    assert model.config.tie_word_embeddings
    assert torch.equal(model.get_output_embeddings().weight, embed_in)


def test_special_tokens_by_role(tmp_path, eltec_tokenizers):
    """Helper specials: unk <|endoftext|> (shared), eos </s> and pad <pad> (not in the source: the source's eos and
    pad rows), bos <s> (the source has no bos: CLP)."""
    from transformers import AutoTokenizer

    eng = load_tokenizer(str(eltec_tokenizers["eng"]))
    eng.add_special_tokens(["<|padding|>"])
    eng.save(str(tmp_path / "eng.json"))
    source = tmp_path / "source"
    hf_neox(vocab_size=eng.get_vocab_size()).save_pretrained(source)
    save_tokenizer(str(tmp_path / "eng.json"), str(source), {"eos_token": "<|endoftext|>", "pad_token": "<|padding|>"})
    deu = load_tokenizer(str(eltec_tokenizers["deu"]))
    deu.add_special_tokens(["<s>", "</s>", "<pad>"])
    helper = tmp_path / "helper"
    gpt2_helper(helper, deu.get_vocab_size())
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<|endoftext|>"}
    deu.save(str(tmp_path / "deu.json"))
    save_tokenizer(str(tmp_path / "deu.json"), str(helper), specials)

    embed_in, embed_out, report = apply_clp(str(source), str(helper), str(tmp_path / "target"))
    sv, hv = eng.get_vocab(with_added_tokens=True), deu.get_vocab(with_added_tokens=True)
    src_state = safetensors_state(source)
    for helper_token, source_token in (("</s>", "<|endoftext|>"), ("<pad>", "<|padding|>"),
                                       ("<|endoftext|>", "<|endoftext|>")):
        assert torch.equal(embed_in[hv[helper_token]], src_state["gpt_neox.embed_in.weight"][sv[source_token]])
        assert torch.equal(embed_out[hv[helper_token]], src_state["embed_out.weight"][sv[source_token]])
    roles = {role: v["init"] for role, v in report["special_tokens"].items()}
    assert roles["eos_token"].startswith("source eos_token '<|endoftext|>'")
    assert roles["pad_token"].startswith("source pad_token '<|padding|>'")
    assert roles["unk_token"].startswith("shared") and roles["bos_token"].startswith("clp")
    assert report["new_tokens"] == len(hv) - report["shared_tokens"] - 2
    config = json.loads((tmp_path / "target" / "config.json").read_text())
    ids = (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"])
    assert ids == (hv["<s>"], hv["</s>"], hv["<pad>"])
    # the helper's tokenizer.json named as a file keeps its special tokens: read from the files beside it
    _, _, report = apply_clp(str(source), method="fvt", target_tokenizer=str(helper / "tokenizer.json"),
                             target_model_path=str(tmp_path / "from-file"))
    config = json.loads((tmp_path / "from-file" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == ids
    assert report["special_tokens"]["bos_token"]["init"] == "fvt (the source has no token for this role)"
    tok = AutoTokenizer.from_pretrained(tmp_path / "target")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    # a declared special token the helper's tokenizer lacks: reported, and kept out of the target's tokenizer files
    # (transformers would otherwise add it as a new id past the embedding rows' real tokens)
    save_tokenizer(str(tmp_path / "deu.json"), str(helper), dict(specials, pad_token="<nopad>"))
    _, _, report = apply_clp(str(source), str(helper), str(tmp_path / "target2"))
    assert report["special_tokens"]["pad_token"]["id"] is None
    tok = AutoTokenizer.from_pretrained(tmp_path / "target2")
    assert tok.pad_token is None and len(tok) == len(hv) and "<nopad>" not in tok.get_vocab()


def test_random_init_statistics_and_seeding(tiny):
    source, helper, _ = tiny
    src_emb = safetensors_state(source)["gpt_neox.embed_in.weight"]
    a, out_a, report = apply_clp(str(source), str(helper), random_init=True, seed=7)
    b, out_b, _ = apply_clp(str(source), str(helper), random_init=True, seed=7)
    c, _, _ = apply_clp(str(source), str(helper), random_init=True, seed=8)
    assert torch.equal(a, b) and torch.equal(out_a, out_b) and not torch.equal(a, c) and not torch.equal(a, out_a)
    assert report["output_embeddings"] == "random" and report["random_init_rows"] == "all"
    d = a.shape[1]
    assert abs(a.mean().item()) < 1e-3 and abs(a.std().item() / math.sqrt(2 / (5 * d)) - 1) < 0.03
    x, _, _ = apply_clp(str(source), str(helper), random_init=True, random_init_method="xavier")
    assert abs(x.std().item() / math.sqrt(2 / (x.shape[0] + d)) - 1) < 0.03
    n, _, _ = apply_clp(str(source), str(helper), random_init=True, random_init_method="normal")
    torch.testing.assert_close(n.mean(0), src_emb.mean(0), atol=0.03, rtol=0)
    torch.testing.assert_close(n.std(0), src_emb.std(0), atol=0.0, rtol=0.15)

    # the study randomises all rows; --random_init_rows missing keeps the shared tokens' source rows
    src_vocab = load_tokenizer(str(source)).get_vocab(with_added_tokens=True)
    helper_vocab = load_tokenizer(str(helper)).get_vocab(with_added_tokens=True)
    common = sorted(set(src_vocab) & set(helper_vocab))
    h_ids, s_ids = [helper_vocab[t] for t in common], [src_vocab[t] for t in common]
    assert not torch.equal(a[h_ids], src_emb[s_ids])
    m, _, _ = apply_clp(str(source), str(helper), random_init=True, random_init_rows="missing", seed=7)
    assert torch.equal(m[h_ids], src_emb[s_ids])
    missing = sorted(set(range(len(helper_vocab))) - set(h_ids))
    assert torch.equal(m[missing], a[missing])
    assert torch.equal(random_embeddings(10, src_emb, seed=1), random_embeddings(10, src_emb, seed=1))


# -----------------------------------------------------------------------------
# realistic overlap: the real Pythia (GPT-NeoX-20B) and GPT-2 tokenizers


def test_realistic_overlap_pythia_gpt2(real_tokenizers):
    from tokenizers import Tokenizer, models

    pythia_file, gpt2_dir = real_tokenizers["pythia"], real_tokenizers["gpt2"]
    pythia = load_tokenizer(pythia_file)
    # the GPT-2 pair as vocab.json + merges.txt, read directly with the tokenizers library (the reference)
    gpt2 = Tokenizer(models.BPE.from_file(os.path.join(gpt2_dir, "vocab.json"), os.path.join(gpt2_dir, "merges.txt")))
    sv, hv = pythia.get_vocab(with_added_tokens=True), gpt2.get_vocab(with_added_tokens=True)
    with open(os.path.join(gpt2_dir, "vocab.json"), encoding="utf-8") as f:
        gpt2_strings = set(json.load(f))
    with open(pythia_file, encoding="utf-8") as f:
        raw = json.load(f)
    pythia_strings = set(raw["model"]["vocab"]) | {t["content"] for t in raw["added_tokens"]}
    expected = gpt2_strings & pythia_strings

    shared_src, shared_helper, missing = match_vocabularies(sv, hv)
    print(f"Pythia vs GPT-2: {len(shared_src)} of {len(hv)} GPT-2 tokens shared ({len(shared_src) / len(hv):.1%})")
    assert len(shared_src) == len(expected) > 30_000
    assert len(shared_helper) + len(missing) == len(hv) == 50257
    pairs = dict(zip(shared_helper.tolist(), shared_src.tolist()))
    assert pairs[hv["<|endoftext|>"]] == sv["<|endoftext|>"] == 0
    assert pairs[hv["Ġthe"]] == sv["Ġthe"]
    # matched by the bytes tokens stand for (the default), the same pairs: one family (the GPT-2 files read as
    # clp.py reads them, <|endoftext|> a special token as in GPT-2's tokenizer.json; Pythia's added runs of spaces
    # yield to its Ġ runs)
    gpt2_tok = load_tokenizer(gpt2_dir)
    by_bytes = match_vocabularies(sv, gpt2_tok.get_vocab(with_added_tokens=True), token_bytes(pythia),
                                  token_bytes(gpt2_tok))
    assert all(torch.equal(a, b) for a, b in zip(by_bytes, (shared_src, shared_helper, missing)))
    # the fast path at this overlap (narrow random matrices): every GPT-2 id gets a row
    g = torch.Generator().manual_seed(0)
    out, fb = clp_embeddings(torch.randn(50304, 8, generator=g), torch.randn(50257, 8, generator=g) + 3,
                             Match(shared_src, shared_helper, missing, rows=50304))
    assert out.shape == (50304, 8) and torch.isfinite(out).all() and fb.numel() == 0


# -----------------------------------------------------------------------------
# bad input: a clear error, nothing left behind


def assert_error(match, *args, **kw):
    with pytest.raises(UserError, match=match):
        apply_clp(*args, **kw)


def test_bad_inputs(tiny, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models

    source, helper, _ = tiny
    target = tmp_path / "target"
    # no shared tokens: a word-level vocabulary that the English BPE does not have
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    Tokenizer(models.WordLevel({"Xq§1": 0, "Xq§2": 1}, unk_token="Xq§1")).save(str(nothing / "tokenizer.json"))
    for matching, how in (("bytes", "even matched by the bytes"), ("exact", "by exact string")):
        assert_error(rf"no shared tokens between the source tokenizer \({source}, byte_level\) and the helper "
                     rf"tokenizer \({nothing}, plain\) {how}.*--method fvt.*or a helper", str(source), str(helper),
                     str(target), helper_tokenizer_name_or_path=str(nothing), token_matching=matching)
    # fvt and mean need no shared token: fvt splits each token ('Xq§1': X, q, §, 1), mean averages the source's
    # token rows; rows no token has: the mean of all source rows
    E, src_tok = safetensors_state(source)["gpt_neox.embed_in.weight"], load_tokenizer(str(source))
    rows = {m: apply_clp(str(source), method=m, target_tokenizer=str(nothing)) for m in ("fvt", "mean")}
    for embed_in, _, report in rows.values():
        assert report["shared_tokens"] == 0 and embed_in.shape[0] == 128
        torch.testing.assert_close(embed_in[2:], E.mean(0).expand(126, -1))
    torch.testing.assert_close(rows["fvt"][0][0], E[src_tok.encode("Xq§1").ids].mean(0))
    token_ids = sorted(src_tok.get_vocab(with_added_tokens=True).values())
    torch.testing.assert_close(rows["mean"][0][0], E[token_ids].mean(0))
    # random init of every row needs no shared token
    embed_in, _, report = apply_clp(str(source), str(helper), random_init=True,
                                    helper_tokenizer_name_or_path=str(nothing))
    assert report["shared_tokens"] == 0 and embed_in.shape[0] == 128 and torch.isfinite(embed_in).all()
    # no embedding tensor under a known name
    odd = tmp_path / "odd"
    odd.mkdir()
    save_file({"encoder.foo.weight": torch.zeros(1200, 8)}, odd / "model.safetensors")
    assert_error("no input-embedding tensor found.*encoder.foo.weight", str(source), str(odd), str(target),
                 helper_tokenizer_name_or_path=str(helper))
    # fewer embedding rows than the tokenizer's ids
    small = tmp_path / "small"
    gpt2_helper(small, 1000)
    assert_error(r"has 1000 rows, but the helper tokenizer .* ids up to 1199", str(source), str(small), str(target),
                 helper_tokenizer_name_or_path=str(helper))
    # no tokenizer files
    assert_error("no tokenizer found", str(source), str(small), str(target))
    assert_error("no such directory", str(tmp_path / "nope"), str(helper), str(target))
    assert not target.exists()

    # an existing non-empty target: refused, untouched; with override replaced
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert_error("not empty.*--override", str(source), str(helper), str(target))
    assert (target / "keep.txt").read_text() == "mine"
    # the working directory (or a directory above it) is never replaced, even with override
    monkeypatch.chdir(target)
    assert_error("the current directory or contains it", str(source), str(helper), ".", override=True)
    assert_error("the current directory or contains it", str(source), str(helper), str(tmp_path), override=True)
    monkeypatch.chdir(tmp_path.parent)
    # a failure while writing leaves neither a temporary directory nor a changed target
    import clp

    def fail(*a, **k):
        raise UserError("disk full")

    monkeypatch.setattr(clp, "save_tokenizer", fail)
    assert_error("disk full", str(source), str(helper), str(target), override=True)
    assert os.listdir(target) == ["keep.txt"]
    monkeypatch.undo()
    apply_clp(str(source), str(helper), str(target), override=True)
    assert "keep.txt" not in os.listdir(target) and (target / "clp_report.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["nothing", "odd", "small", "target"]


def test_cli_study_command_with_hub_ids_offline(tiny, tmp_path):
    """The study's command unchanged, on hub ids resolved from a hub-layout cache; then a one-line error."""
    source, helper, _ = tiny
    cache = tmp_path / "hub"
    make_hub_cache(cache, "EleutherAI/pythia-tiny", source, commit="a" * 40)
    make_hub_cache(cache, "malteos/gpt2-tiny-german", helper, commit="b" * 40)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    args = ["clp.py", "apply_clp", "--source_model_name_or_path", "EleutherAI/pythia-tiny",
            "--helper_model_name_or_path", "malteos/gpt2-tiny-german", "--target_model_path", str(tmp_path / "out")]
    r = run_py(args, env=env)
    assert r.returncode == 0, r.stderr
    assert "shared tokens" in r.stdout
    report = json.loads((tmp_path / "out" / "clp_report.json").read_text())
    assert report["source"]["commit"] == "a" * 40 and report["helper"]["commit"] == "b" * 40
    assert GPTNeoX.from_pretrained(str(tmp_path / "out")).config.vocab_size == report["target_vocab_size"]
    r = run_py(args, env=env)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: ") and "--override" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# -----------------------------------------------------------------------------
# fvt and mean: no helper model, only the target tokenizer


def byte_level_bpe(vocab, merges, path):
    """A byte-level BPE tokenizer.json: the 256 byte characters (ids 0-255), then `vocab`, with `merges`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({**{c: i for i, c in enumerate(alphabet)},
                                **{t: 256 + i for i, t in enumerate(vocab)}}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return tok


def test_fvt_by_hand(tmp_path):
    """Source: bytes + 'er', 'Ġd', 'Ġder'. Target: bytes + 'Ġder' (shared: copied), 'Ġdie' (the source splits
    ' die' into Ġd, i, e), 'ere' (er, e), 'Ã¤' ('ä': two byte pieces), 'ĠÃ' (bytes 20 C3, no UTF-8 on its own:
    split byte by byte). Input and output embeddings alike."""
    from clp import byte_level_alphabet

    src_tok = byte_level_bpe(["er", "Ġd", "Ġder"], [("e", "r"), ("Ġ", "d"), ("Ġd", "er")], tmp_path / "src.json")
    tgt_tok = byte_level_bpe(["Ġder", "Ġdie", "ere", "Ã¤", "ĠÃ"], [], tmp_path / "tgt.json")
    sv, tv = src_tok.get_vocab(with_added_tokens=True), tgt_tok.get_vocab(with_added_tokens=True)
    source = tmp_path / "source"
    hf_neox(vocab_size=len(sv) + 3).save_pretrained(source)
    save_tokenizer(str(tmp_path / "src.json"), str(source))
    state = safetensors_state(source)

    embed_in, embed_out, report = apply_clp(str(source), method="fvt", target_tokenizer=str(tmp_path / "tgt.json"),
                                            target_model_path=str(tmp_path / "target"))
    assert report["method"] == "fvt" and report["helper"] is None and report["shared_tokens"] == 258  # bytes, Ġder, eot
    assert report["fvt"]["pieces_histogram"] == {"2": 3, "3": 1} and report["fvt"]["split_byte_by_byte"] == 1
    byte = {b: sv[c] for c, b in byte_level_alphabet().items()}
    expected_pieces = {"Ġder": [sv["Ġder"]], "Ġdie": [sv["Ġd"], byte[ord("i")], byte[ord("e")]],
                       "ere": [sv["er"], byte[ord("e")]], "Ã¤": [byte[0xC3], byte[0xA4]],
                       "ĠÃ": [byte[0x20], byte[0xC3]]}
    for matrix, key in ((embed_in, "gpt_neox.embed_in.weight"), (embed_out, "embed_out.weight")):
        src = state[key]
        assert torch.equal(matrix[tv["Ġder"]], src[sv["Ġder"]]) and torch.equal(matrix[tv["e"]], src[sv["e"]])
        for token, ids in expected_pieces.items():
            torch.testing.assert_close(matrix[tv[token]], src[ids].mean(0), rtol=0, atol=1e-6)
    saved = json.loads((tmp_path / "target" / "clp_report.json").read_text())
    assert saved["fvt"]["mean_pieces"] == 2.25 and saved["method"] == "fvt"
    assert GPTNeoX.from_pretrained(str(tmp_path / "target")).config.vocab_size == 384


def test_byte_level_alphabet_is_gpt2s():
    from tokenizers import pre_tokenizers

    from clp import byte_level_alphabet

    alphabet = byte_level_alphabet()
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet()) and sorted(alphabet.values()) == list(range(256))
    text = " Grüße\n\t\x00€"
    chars = "".join(s for s, _ in pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
                    .pre_tokenize_str(text))
    assert bytes(alphabet[c] for c in chars) == text.encode()


def test_fvt_and_mean_on_real_pythia_and_gpt2_tokenizers(real_tokenizers):
    """Pythia's tokenizer as source (a random 50304 x 16 matrix), GPT-2's as target."""
    from clp import init_fvt, init_mean

    src_tok, tgt_tok = load_tokenizer(real_tokenizers["pythia"]), load_tokenizer(real_tokenizers["gpt2"])
    sv, tv = src_tok.get_vocab(with_added_tokens=True), tgt_tok.get_vocab(with_added_tokens=True)
    shared_src, shared_tgt, new = match_vocabularies(sv, tv)
    g = torch.Generator().manual_seed(0)
    E = torch.randn(50304, 16, generator=g) * torch.rand(50304, 1, generator=g) + 0.3
    token_ids = sorted(sv.values())
    match = Match(shared_src, shared_tgt, new, rows=50304)
    options = dict(source_model_name_or_path="pythia", target_tokenizer="gpt2")
    fvt_options, sample_options = (TransferOptions(**options, method="fvt"),
                                   TransferOptions(**options, method="mean", mean_sample=True, seed=5))
    rows, report = init_fvt({"input": E}, match, src_tok, tgt_tok, None, fvt_options)
    fvt = rows["input"]
    print(f"fvt, Pythia -> GPT-2: {report['fvt']}")
    rows, _ = init_mean({"input": E, "output": E}, match, src_tok, tgt_tok, None, sample_options)
    mean, sampled = rows["input"], rows["output"]
    plain = init_mean({"input": E}, match, src_tok, tgt_tok, None, TransferOptions(**options, method="mean"))[0]
    plain = plain["input"]
    for out in (fvt, mean, sampled, plain):
        assert out.shape == (50304, 16) and torch.isfinite(out).all()
        assert torch.equal(out[shared_tgt], E[shared_src])
    # fvt rows are averages of source rows: none longer than the longest
    assert fvt[new].norm(dim=1).max() <= E.norm(dim=1).max()
    hist = report["fvt"]["pieces_histogram"]
    assert sum(hist.values()) == len(new) and "1" not in hist and hist["2"] > len(new) / 2
    # the bytes no UTF-8 text has (0xC0, 0xC1, 0xF5-0xFF) are no Pythia tokens: those rows keep the padding mean
    assert sorted(report["fvt"]["no_source_piece"]) == sorted(chr(c) for c in [0xC0, 0xC1, *range(0xF5, 0x100)])
    torch.testing.assert_close(fvt[tv["À"]], E[shared_src].mean(0))
    # the pieces, from an independent path: GPT-2's decoder, then the Pythia tokenizer (tokens that decode cleanly)
    id_to_token = {i: t for t, i in tv.items()}
    checked = 0
    for i in new[::97].tolist():
        text = tgt_tok.decode([i])
        if "\ufffd" not in text:
            ids = src_tok.encode(text, add_special_tokens=False).ids
            torch.testing.assert_close(fvt[i], E[ids].mean(0), msg=id_to_token[i])
            checked += 1
    assert checked > 100
    # mean: the mean of the source tokens' rows; sampled: the rows' mean and covariance, seeded
    torch.testing.assert_close(plain[new], E[token_ids].mean(0).expand(len(new), -1))
    torch.testing.assert_close(sampled[new].mean(0), E[token_ids].mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(sampled[new].T), torch.cov(E[token_ids].T), atol=0.02, rtol=0.05)
    assert not torch.equal(mean[new], sampled[new])  # input and output matrices: different draws
    again, _ = init_mean({"input": E, "output": E}, match, src_tok, tgt_tok, None, sample_options)
    assert torch.equal(again["input"], mean) and torch.equal(again["output"], sampled)


def test_mean_method_and_method_errors(tiny, tmp_path):
    source, helper, _ = tiny
    src_state = safetensors_state(source)
    src_vocab = load_tokenizer(str(source)).get_vocab(with_added_tokens=True)
    helper_vocab = load_tokenizer(str(helper)).get_vocab(with_added_tokens=True)
    _, shared, missing = match_vocabularies(src_vocab, helper_vocab)
    # the helper directory's tokenizer is enough (its weights are not read)
    embed_in, embed_out, report = apply_clp(str(source), str(helper), method="mean")
    for matrix, key in ((embed_in, "gpt_neox.embed_in.weight"), (embed_out, "embed_out.weight")):
        rows = src_state[key][sorted(src_vocab.values())]
        torch.testing.assert_close(matrix[missing], rows.mean(0).expand(len(missing), -1))
    assert report["method"] == "mean" and report["helper"] is None and report["weighting"] is None
    assert report["mean_sample"] is False and report["fallback_rows"] == 0

    assert_error("method='wechsel': expected one of clp, fvt, mean", str(source), str(helper), method="wechsel")
    assert_error("--method fvt needs the target tokenizer", str(source), method="fvt")
    assert_error("--method clp needs --helper_model_name_or_path", str(source), target_tokenizer=str(helper))
    assert_error("--weighting does not apply to --method fvt", str(source), str(helper), method="fvt",
                 weighting="sparsemax")
    assert_error("--extrapolation_fallback does not apply to --method mean", str(source), str(helper),
                 method="mean", extrapolation_fallback=True)
    assert_error("--mean_sample does not apply to --method clp", str(source), str(helper), mean_sample=True)
    assert_error("--random_init does not apply to --method fvt", str(source), str(helper), method="fvt",
                 random_init=True)
    assert_error("give one", str(source), method="fvt", target_tokenizer=str(helper),
                 helper_tokenizer_name_or_path=str(helper))
    assert_error("no such directory", str(source), method="fvt", target_tokenizer=str(tmp_path / "nope"))
    assert not os.listdir(tmp_path)


def test_cli_fvt_without_helper_model(tiny, tmp_path):
    source, helper, _ = tiny
    args = ["clp.py", "apply_clp", "--source_model_name_or_path", str(source), "--method", "fvt",
            "--target_tokenizer", str(helper),
            "--target_model_path", str(tmp_path / "out")]
    r = run_py(args + ["--token_matching", "exact"])
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "clp_report.json").read_text())
    assert report["method"] == "fvt" and sum(report["fvt"]["pieces_histogram"].values()) == report["new_tokens"]
    assert report["token_matching"] == "exact" and report["shared_tokens"] == report["shared_tokens_exact"]
    assert report["tokenizer_conventions"] == {"source": "byte_level", "target": "byte_level"}
    for bad, message in ((["--method", "focus"], "method='focus': expected one of clp, fvt, mean"),
                         (["--method", "fvt"], "needs the target tokenizer")):
        r = run_py(args[:4] + bad + ["--target_model_path", str(tmp_path / "x")])
        assert r.returncode == 1 and r.stderr.startswith("error: ") and message in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
