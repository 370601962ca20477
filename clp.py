"""
CLP-Transfer (Ostendorff & Rehm 2023): a German vocabulary for an English GPT-NeoX (Pythia) without training.

The target keeps the source model's body and takes the small helper model's tokenizer. Its embedding rows:
- tokens both tokenizers have (exact string match) copy the source row;
- every other helper token t is a weighted average of those shared tokens' source rows, weighted by t's cosine
  similarity to them in the *helper's* embedding space (H), normalised by the sum:

      E[t] = sum_j cos(H[t], H[j]) * E_src[j] / sum_j cos(H[t], H[j])        j over the shared tokens

The original code loops in Python over the vocabulary (1h14 for BLOOM). The dense sum needs no similarity matrix at
all: with unit rows h, sum_j (h_t . h_j) E_j = h_t @ (sum_j h_j^T E_j) and sum_j (h_t . h_j) = h_t . sum_j h_j, so
the whole method is two small matrix products, seconds at Pythia scale. The `topk` and `sparsemax` (CLP+) variants do
form the similarities, one chunk of tokens at a time.

The formula is applied as published, negative similarities included. A row whose similarity sum is not positive (a
helper vector pointing away from the shared tokens, or a zero vector) would divide by zero or flip sign: it averages
the shared source rows over its positive similarities only, or takes their plain mean when it has none. A sum just
above zero makes the weights extrapolate far beyond the source rows (seen with weakly trained, nearly isotropic
helpers: rows hundreds of times longer than any source row); the report counts such rows (`extrapolated_rows`: longer
than the longest shared source row, which no average can be), and `--extrapolation_fallback` gives them the
fallback too.

Pythia does not tie its output head to the input matrix; by default the head gets the same weights applied to the
source's output rows (`--output_embeddings clp`); `source_by_id` keeps the study's head (source row i for token i).
A helper special token (bos, eos, pad, unk) whose string the source lacks takes the source row of the source's
special token with the same role, if it has one. The target has the helper tokenizer's rows rounded up to a multiple
of 128; rows no token produces (padding) hold the mean of the shared source rows: an average token, never an outlier.

`apply_clp` reads each input once (a ModelInput), matches the vocabularies (a Match), initialises each matrix with
its initialiser, reports and writes. An initialiser is one function, (matrices, match, source tokenizer, target
tokenizer, helper rows, options) -> (rows, report entries); `--method` picks one from METHODS (a new method is an
entry there and its function), the random baseline and the study's head are initialisers too.

python clp.py apply_clp --source_model_name_or_path EleutherAI/pythia-410m \\
    --helper_model_name_or_path malteos/gpt2-wechsel-german-ds-meg --target_model_path out/pythia-410m-clp-german
"""

import argparse
import functools
import math
import os
import time
from dataclasses import MISSING, dataclass, field, fields
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (UserError, atomic_dir, check_device, load_tokenizer, read_json, read_special_tokens,
                    resolve_model_dir, round_up, run_cli, save_tokenizer, sha256_file, tokenizer_sha256, write_json)
from model import CausalLM, read_weights, weight_files

WEIGHTINGS = ("dense", "topk", "sparsemax")
OUTPUT_EMBEDDINGS = ("clp", "source_by_id", "random")
RANDOM_INIT_METHODS = ("small_init", "normal", "xavier")
RANDOM_INIT_ROWS = ("all", "missing")

# -----------------------------------------------------------------------------
# the method on raw tensors


@dataclass
class Match:
    """Which source row each target row starts from: target id shared_target[j] copies source row shared_source[j]
    (a token both vocabularies have), special_target[j] copies special_source[j] (a special token matched by role);
    the `new` target ids get rows the method computes; `rows` is the target matrices' height (the target's ids,
    padded). special_tokens: role -> how it was matched, for the report."""
    shared_source: torch.Tensor
    shared_target: torch.Tensor
    new: torch.Tensor
    rows: int
    special_source: torch.Tensor = ()
    special_target: torch.Tensor = ()
    special_tokens: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("shared_source", "shared_target", "new", "special_source", "special_target"):
            setattr(self, name, torch.as_tensor(getattr(self, name), dtype=torch.long).reshape(-1))
        if len(self.shared_source) != len(self.shared_target):
            raise ValueError(f"{len(self.shared_source)} shared source ids but {len(self.shared_target)} shared "
                             "target ids")

    @property
    def copy_source(self):
        return torch.cat([self.shared_source, self.special_source])

    @property
    def copy_target(self):
        return torch.cat([self.shared_target, self.special_target])


def copied_rows(E, match, shared=None):
    """A (match.rows, d) matrix in E's dtype: the shared and special tokens' source rows copied bit for bit, every
    other row the mean of the shared source rows (what rows no token has keep; a method overwrites its new rows).
    shared: E[match.shared_source] when the caller has it (in any float dtype at least E's, on any device)."""
    shared = E[match.shared_source] if shared is None else shared
    out = shared.float().mean(0).to("cpu", E.dtype).expand(match.rows, -1).clone()
    out[match.shared_target] = shared.to("cpu", E.dtype)
    out[match.special_target] = E[match.special_source]
    return out


def positive_or_uniform(sims):
    """The fallback weights: a row's positive similarities renormalised; uniform weights when none is positive."""
    pos = sims.clamp_min(0)
    total = pos.sum(1, keepdim=True)
    return torch.where(total > 0, pos / total.clamp_min(1e-30), 1.0 / sims.shape[1])


def sparsemax(z, candidates=256):
    """Each row projected onto the probability simplex (Martins & Astudillo 2016): weights that sum to 1, most 0."""
    return (z - sparsemax_threshold(z, candidates)).clamp_min(0)


def sparsemax_threshold(z, candidates):
    """Each row's threshold, found among its top `candidates` values; rows whose support may reach past them are
    sorted in full (the support is a prefix of the sorted row, so the shortcut is exact)."""
    top = z.topk(candidates, dim=1).values if candidates < z.shape[1] else z.sort(dim=1, descending=True).values
    cs = top.cumsum(1)
    k = torch.arange(1, top.shape[1] + 1, device=z.device, dtype=z.dtype)
    support = (1 + k * top > cs).sum(1, keepdim=True)
    tau = (cs.gather(1, support - 1) - 1) / support
    if top.shape[1] < z.shape[1] and (longer := support.squeeze(1) == top.shape[1]).any():
        tau[longer] = sparsemax_threshold(z[longer], z.shape[1])
    return tau


def clp_weights(sims, weighting="dense", top_k=10):
    """Similarities (rows: new tokens, columns: shared tokens) -> weights (same shape) and the mask of rows that took
    the fallback. dense: sims / row sum; topk: the same over each row's top_k similarities; sparsemax: CLP+."""
    if weighting == "sparsemax":
        return sparsemax(sims), torch.zeros(sims.shape[0], dtype=torch.bool, device=sims.device)
    if weighting == "topk" and top_k < sims.shape[1]:
        vals, idx = sims.topk(top_k, dim=1)
        sims = torch.zeros_like(sims).scatter_(1, idx, vals)
    total = sims.sum(1, keepdim=True)
    bad = total.squeeze(1) <= 0
    w = sims / torch.where(total > 0, total, 1.0)
    if bad.any():
        w[bad] = positive_or_uniform(sims[bad])
    return w, bad


def clp_embeddings(source_emb, helper_emb, match, weighting="dense", top_k=10, chunk_size=1024, device="cpu",
                   extrapolation_fallback=False):
    """CLP on raw matrices. source_emb (V_src, d), or a list of such matrices sharing a vocabulary (input and output
    embeddings: the weights are computed once, applied to each); helper_emb (V_helper, d_helper), in the target's
    ids. The shared tokens (match.shared_source / shared_target) are the weights' anchors; match.new get the weighted
    average. Returns (matrices, fallback_ids): each matrix (match.rows, d) in its source's dtype as copied_rows
    starts it (shared and special rows copied bit for bit), the new rows computed in fp32 on `device`. fallback_ids:
    the new ids whose similarity sum was not positive (with extrapolation_fallback, also those whose weighted sum
    came out longer than every shared source row)."""
    single = torch.is_tensor(source_emb)
    sources = [source_emb] if single else list(source_emb)
    if weighting not in WEIGHTINGS:
        raise UserError(f"weighting={weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
    if len(match.shared_source) == 0:
        raise UserError("no shared tokens: CLP averages the source rows of the tokens both vocabularies have")
    dev = torch.device(device)

    hs = F.normalize(helper_emb[match.shared_target].to(dev, torch.float32), dim=1)  # unit rows, (n_shared, d_helper)
    es = [E[match.shared_source].to(dev, torch.float32) for E in sources]  # (n_shared, d) each
    radius = [longest_row(e) for e in es]
    outs = [copied_rows(E, match, e) for E, e in zip(sources, es)]
    if weighting == "dense":
        # the factorised sum, no (new x shared) matrix: sum_j cos(h, h_j) e_j / sum_j cos(h, h_j)
        # = (h @ sum_j unit(h_j) e_j^T) / (h @ sum_j unit(h_j)); |h| cancels, so new rows need no normalising
        hsum = hs.sum(0)
        ms = [hs.T @ e for e in es]  # (d_helper, d) each
    fallback = []
    for ids in tqdm(match.new.split(chunk_size), desc=f"clp {weighting}", unit="chunk", disable=None):
        h = helper_emb[ids].to(dev, torch.float32)
        if weighting == "dense":
            total = h @ hsum  # the similarity sum times |h|: same sign
            bad = total <= 0
            h_over_total = h / torch.where(bad, 1.0, total)[:, None]  # the division, on the narrower side
            rows = [h_over_total @ m for m in ms]
        else:
            w, bad = clp_weights(F.normalize(h, dim=1) @ hs.T, weighting, top_k)
            if w.count_nonzero() < w.numel() / 4:  # topk, and sparsemax mostly: a sparse product is far cheaper
                w = w.to_sparse()
            rows = [w @ e for e in es]
        if extrapolation_fallback:  # an average lies within the longest shared row's length: a row beyond it
            bad = bad | torch.stack([r.norm(dim=1) > limit for r, limit in zip(rows, radius)]).any(0)
        if bad.any():
            w = positive_or_uniform(F.normalize(h[bad], dim=1) @ hs.T)
            for r, e in zip(rows, es):
                r[bad] = w @ e
        for out, r in zip(outs, rows):
            out[ids] = r.to("cpu", out.dtype)
        fallback.append(ids[bad.cpu()])
    return (outs[0] if single else outs), torch.cat(fallback) if fallback else match.new[:0]


def longest_row(rows):
    """The length no average of these rows can exceed (with a margin for rounding)."""
    return rows.float().norm(dim=1).max() * (1 + 1e-3)


def random_embeddings(num_rows, like, method="small_init", seed=42):
    """A random (num_rows, d) matrix in like's dtype, seeded. small_init: N(0, sqrt(2/(5d))) (Nguyen & Salazar, the
    study's choice); normal: per dimension N(mean, std) of `like` (the matrix the original clp.py starts from);
    xavier: Glorot normal, N(0, sqrt(2/(num_rows + d)))."""
    d = like.shape[1]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_rows, d, generator=g)
    if method == "small_init":
        out = noise * math.sqrt(2 / (5 * d))
    elif method == "xavier":
        out = noise * math.sqrt(2 / (num_rows + d))
    elif method == "normal":
        out = like.float().mean(0) + noise * like.float().std(0)
    else:
        raise UserError(f"random_init_method={method!r}: expected one of {', '.join(RANDOM_INIT_METHODS)}")
    return out.to(like.dtype)


# -----------------------------------------------------------------------------
# FVT and mean: initialisations that need no helper model, only the target tokenizer


def byte_level_alphabet():
    """{character: byte} of GPT-2's byte-level BPE, which writes each byte as one printable character (the
    printable Latin-1 bytes as themselves, the others as chr(256 + n) in byte order)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {chr(c): b for c, b in zip(printable + [256 + n for n in range(len(others))], printable + others)}


def fvt_pieces(target_tokens, source_tok, byte_level=True, added=()):
    """Fast Vocabulary Transfer's split (Gee et al. 2022): each target token's text as the source tokenizer encodes
    it. A byte-level token is decoded to its bytes first (an added token, and any token of a tokenizer that is not
    byte-level, is its string as it is: a SentencePiece '▁' stays); bytes that are no valid UTF-8 on their own (a
    piece of a character) map byte by byte to the source's byte tokens; a byte no UTF-8 text has (0xC0, 0xC1,
    0xF5-0xFF) may have none, and is left out. Returns (a list of source-id lists, empty for a
    token none of whose bytes the source has; the number of tokens split byte by byte)."""
    alphabet, added = byte_level_alphabet(), set(added)
    raw = [t.encode() if t in added or not byte_level or not set(t) <= alphabet.keys()
           else bytes(alphabet[c] for c in t) for t in target_tokens]
    texts = {}
    for i, b in enumerate(raw):
        try:
            texts[i] = b.decode("utf-8")
        except UnicodeDecodeError:
            pass
    encoded = source_tok.encode_batch(list(texts.values()), add_special_tokens=False)
    pieces = dict(zip(texts, (e.ids for e in encoded)))
    by_bytes = [i for i in range(len(raw)) if not pieces.get(i)]  # not UTF-8, or encoded to nothing
    if by_bytes:
        source_vocab = source_tok.get_vocab(with_added_tokens=True)
        to_char = {b: c for c, b in alphabet.items()}
        byte_ids = [source_vocab.get(to_char[b], source_vocab.get(f"<0x{b:02X}>")) for b in range(256)]
        for i in by_bytes:
            pieces[i] = [byte_ids[b] for b in raw[i] if byte_ids[b] is not None]
    return [pieces[i] for i in range(len(raw))], len(by_bytes)


def fvt_embeddings(source_emb, pieces, device="cpu"):
    """FVT on raw matrices: new row i is the mean of the source rows pieces[i] (source ids, a repeated piece counted
    each time; no pieces: a zero row). source_emb: one (V_src, d) matrix or a list of them. One sparse
    (new x V_src) averaging matrix, one product per matrix, in fp32 on `device`; returns (n_new, d) rows in each
    source's dtype."""
    single = torch.is_tensor(source_emb)
    sources = [source_emb] if single else list(source_emb)
    lengths = torch.tensor([len(p) for p in pieces], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(pieces)), lengths)
    cols = torch.tensor([i for p in pieces for i in p], dtype=torch.long)
    dev = torch.device(device)
    average = torch.sparse_coo_tensor(torch.stack([rows, cols]), 1.0 / lengths[rows].float(),
                                      (len(pieces), sources[0].shape[0]), check_invariants=True).coalesce().to(dev)
    outs = [(average @ E.to(dev, torch.float32)).to("cpu", E.dtype) for E in sources]
    return outs[0] if single else outs


def mean_embeddings(source_emb, n_new, sample=False, seed=42):
    """n_new rows: the mean of the source rows (transformers' default when a vocabulary grows), or with `sample`
    drawn from the normal with their mean and covariance (Hewitt 2021), seeded. Returns (n_new, d), source dtype."""
    rows = source_emb.double()
    mean = rows.mean(0)
    if not sample:
        return mean.expand(n_new, -1).to(source_emb.dtype)
    centred = rows - mean
    eigvals, eigvecs = torch.linalg.eigh(centred.T @ centred / len(rows))  # covariance = V diag(l) V^T, PSD
    root = eigvecs * eigvals.clamp_min(0).sqrt()  # root @ root.T = covariance, also when it is singular
    z = torch.randn(n_new, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (mean + z @ root.T).to(source_emb.dtype)


# -----------------------------------------------------------------------------
# the initialisers: (matrices, match, source tokenizer, target tokenizer, helper rows, options) -> (rows, report
# entries). `matrices` is {"input": E} and/or {"output": E}, the source's; rows the same keys, match.rows each.


def init_clp(matrices, match, source_tok, target_tok, helper_rows, opts):
    """CLP (CLP+ with --weighting sparsemax): the weights from the helper's similarities, computed once for all
    matrices."""
    rows, fallback = clp_embeddings(list(matrices.values()), helper_rows, match, opts.weighting, opts.top_k,
                                    opts.chunk_size, opts.device, opts.extrapolation_fallback)
    rows = dict(zip(matrices, rows))
    return rows, {"fallback_rows": len(fallback),
                  "fallback_tokens": [target_tok.id_to_token(int(i)) for i in fallback[:20]],
                  "extrapolated_rows": extrapolated_rows(rows, matrices, match)}


def init_fvt(matrices, match, source_tok, target_tok, helper_rows, opts):
    """FVT: each new token the mean of the source rows of the pieces the source tokenizer splits its text into; a
    token with no source piece keeps the shared rows' mean."""
    from tokenizers import decoders

    tokens = [target_tok.id_to_token(int(i)) for i in match.new]
    added = [t.content for t in target_tok.get_added_tokens_decoder().values()]
    pieces, by_bytes = fvt_pieces(tokens, source_tok, isinstance(target_tok.decoder, decoders.ByteLevel), added)
    counts = torch.tensor([len(p) for p in pieces], dtype=torch.long)
    new_rows = fvt_embeddings(list(matrices.values()), [p for p in pieces if p], opts.device)
    rows = {}
    for (role, E), new in zip(matrices.items(), new_rows):
        rows[role] = copied_rows(E, match)
        rows[role][match.new[counts > 0]] = new
    return rows, {"fvt": {"pieces_histogram": {str(k): int(n) for k, n in enumerate(counts.bincount()) if n},
                          "mean_pieces": round(counts.float().mean().item(), 4) if len(counts) else None,
                          "split_byte_by_byte": by_bytes,
                          "no_source_piece": [t for t, n in zip(tokens, counts.tolist()) if n == 0]},
                  "extrapolated_rows": extrapolated_rows(rows, matrices, match)}


def init_mean(matrices, match, source_tok, target_tok, helper_rows, opts):
    """mean: every new row the mean of the source tokens' rows (not its padding rows), or with --mean_sample a draw
    from their normal; each matrix its own draw."""
    token_ids = sorted(source_tok.get_vocab(with_added_tokens=True).values())
    rows = {}
    for role, E in matrices.items():
        rows[role] = copied_rows(E, match)
        rows[role][match.new] = mean_embeddings(E[token_ids], len(match.new), opts.mean_sample, opts.seed_for(role))
    return rows, {"mean_sample": opts.mean_sample, "extrapolated_rows": extrapolated_rows(rows, matrices, match)}


def init_random(matrices, match, source_tok, target_tok, helper_rows, opts):
    """The random-init baseline: every row random (--random_init_method), or with --random_init_rows missing all
    but the copied ones."""
    rows = {}
    for role, E in matrices.items():
        rows[role] = random_embeddings(match.rows, E, opts.random_init_method, opts.seed_for(role))
        if opts.random_init_rows == "missing":
            rows[role][match.copy_target] = E[match.copy_source]
    return rows, {"random_init_method": opts.random_init_method, "random_init_rows": opts.random_init_rows}


def init_source_by_id(matrices, match, source_tok, target_tok, helper_rows, opts):
    """The study's head: source row i for target token i, whatever token i was; rows past the source's: their
    mean."""
    rows = {}
    for role, E in matrices.items():
        k = min(match.rows, E.shape[0])
        rows[role] = torch.cat([E[:k], E.float().mean(0).to(E.dtype).expand(match.rows - k, -1)])
    return rows, {}


def extrapolated_rows(rows, matrices, match):
    """How many new tokens have a row (in any matrix) longer than every shared source row: no average can be."""
    beyond = torch.zeros(len(match.new), dtype=torch.bool)
    for role, E in matrices.items():
        beyond |= rows[role][match.new].float().norm(dim=1) > longest_row(E[match.shared_source])
    return int(beyond.sum())


class Method(NamedTuple):
    """A --method: its initialiser, and whether it needs the helper model."""
    init: Callable
    needs_helper: bool  # reads the helper model's embeddings (else only the target tokenizer)


METHODS = {"clp": Method(init_clp, True), "fvt": Method(init_fvt, False), "mean": Method(init_mean, False)}


def matrix_initialisers(opts, tied):
    """Each matrix's initialiser: the input matrix gets --method's, or the random baseline (--random_init); an
    untied head what --output_embeddings says: clp the same method as the input, random the random baseline,
    source_by_id the study's head."""
    method = METHODS[opts.method].init
    plan = {"input": init_random if opts.random_init else method}
    if not tied:
        plan["output"] = {"clp": method, "random": init_random, "source_by_id": init_source_by_id}[
            opts.output_embeddings]
    return plan


# -----------------------------------------------------------------------------
# the options: one field per command-line flag, checked once, before any model loads


def flag(default, help=None, **cli):
    """A TransferOptions field: its default and its flag's help (plus argparse's choices or required; method: the
    one --method the option belongs to)."""
    return field(default=default, metadata=dict(help=help, **cli))


@dataclass
class TransferOptions:
    """What apply_clp does: one field per `clp.py apply_clp` flag (the flag's help in the field's metadata), checked
    when built."""
    source_model_name_or_path: str = flag(MISSING, "HF-format GPT-NeoX (directory or hub id)", required=True)
    helper_model_name_or_path: str = flag(None, "any HF causal LM in the target language (needed by clp; fvt and "
                                                "mean read only its tokenizer)")
    target_model_path: str = flag(None, "output directory", required=True)
    helper_tokenizer_name_or_path: str = flag(None, "default: the helper model's tokenizer")
    method: str = flag("clp", "clp (default): the paper's similarity-weighted average of the shared tokens' rows; "
                              "fvt: each new token the mean of the source rows of the pieces the source tokenizer "
                              "splits it into (Fast Vocabulary Transfer); mean: every new row the mean of the source "
                              "rows. fvt and mean need no helper model, only the target tokenizer")
    target_tokenizer: str = flag(None, "fvt and mean: the target tokenizer (tokenizer.json, a directory or a hub "
                                       "id) when there is no helper model")
    mean_sample: bool = flag(False, "mean: draw each new row from the normal with the source rows' mean and "
                                    "covariance (Hewitt 2021; seeded by --seed) instead of the plain mean",
                             method="mean")
    source_revision: str = flag(None, "hub revision of the source, e.g. step143000")
    helper_revision: str = flag(None, "hub revision of the helper")
    seed: int = flag(42, "seeds the random init (output head: seed + 1)")
    override: bool = flag(False, "replace a non-empty target directory")
    random_init: bool = flag(False, "the random-init baseline instead of CLP; like the study, randomises ALL input "
                                    "rows unless --random_init_rows missing (then shared tokens keep their source "
                                    "rows)", method="clp")
    random_init_method: str = flag("small_init", "small_init: N(0, sqrt(2/(5d))) (the study's); normal: "
                                                 "per-dimension N(mean, std) of the source matrix (the original "
                                                 "clp.py's start); xavier: Glorot normal",
                                   choices=RANDOM_INIT_METHODS)
    random_init_rows: str = flag("all", "all (the study's) or only the rows that CLP would compute",
                                 choices=RANDOM_INIT_ROWS)
    output_embeddings: str = flag(None, "untied sources: clp (default) applies the same method (clp weights, fvt "
                                        "pieces, mean) to the source's output rows; source_by_id keeps source row i "
                                        "for token i (the study); random (default with --random_init) uses the "
                                        "random init. Tied sources need nothing.", choices=OUTPUT_EMBEDDINGS)
    weighting: str = flag("dense", "dense: the paper's cos/sum over all shared tokens; topk: the same over the "
                                   "top_k most similar; sparsemax: CLP+", choices=WEIGHTINGS, method="clp")
    top_k: int = flag(10)
    pad_to_multiple_of: int = flag(128, "target rows: the helper tokenizer's size rounded up to this (1: no "
                                        "padding)")
    extrapolation_fallback: bool = flag(False, "rows longer than the longest shared source row (a similarity sum "
                                               "just above zero makes the weights extrapolate; the report counts "
                                               "them as extrapolated_rows) average over the positive similarities "
                                               "instead; off by default: the paper's formula as published",
                                        method="clp")
    chunk_size: int = flag(1024, "new tokens per step (bounds memory)")
    device: str = flag("cpu", "cpu or cuda")

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"method={self.method!r}: expected one of {', '.join(METHODS)}")
        if self.helper_tokenizer_name_or_path and self.target_tokenizer:
            raise UserError("--target_tokenizer and --helper_tokenizer_name_or_path name the same tokenizer: give one")
        if METHODS[self.method].needs_helper and not self.helper_model_name_or_path:
            others = " or ".join(name for name, m in METHODS.items() if not m.needs_helper)
            raise UserError(f"--method {self.method} needs --helper_model_name_or_path (its embeddings weigh the "
                            f"shared tokens); --method {others} need only --target_tokenizer")
        if not (self.helper_model_name_or_path or self.tokenizer_name_or_path):
            raise UserError(f"--method {self.method} needs the target tokenizer: --target_tokenizer (a "
                            "tokenizer.json or a directory) or --helper_model_name_or_path")
        for f in fields(self):
            only = f.metadata.get("method")
            if only and getattr(self, f.name) != f.default and self.method != only:
                raise UserError(f"--{f.name} does not apply to --method {self.method} (only to --method {only})")
        if self.output_embeddings is None:
            self.output_embeddings = "random" if self.random_init else "clp"
        for f in fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise UserError(f"{f.name}={getattr(self, f.name)!r}: expected one of {', '.join(allowed)}")
        for name in ("top_k", "pad_to_multiple_of", "chunk_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{name}={getattr(self, name)}: expected a positive integer")
        check_device(str(self.device), "device")

    @property
    def tokenizer_name_or_path(self):
        """The target tokenizer when it is not the helper directory's."""
        return self.helper_tokenizer_name_or_path or self.target_tokenizer

    def seed_for(self, role):
        """The input matrix draws with --seed, the output matrix with --seed + 1: never the same rows."""
        return self.seed + (role == "output")


# -----------------------------------------------------------------------------
# reading the inputs, each once


@dataclass
class ModelInput:
    """One input model as the steps use it: its directory, tokenizer (and the path it was read from), special
    tokens, tokenizer sha256, provenance for the report, and its weights: the source's model, the helper's input
    embeddings (when the method needs them)."""
    directory: str
    tokenizer: object
    tokenizer_path: str
    special_tokens: dict
    tokenizer_sha256: str
    description: dict = None
    model: CausalLM = None
    embedding: torch.Tensor = None

    @functools.cached_property
    def vocab(self):
        """token -> id, added tokens included."""
        return self.tokenizer.get_vocab(with_added_tokens=True)

    @property
    def num_ids(self):
        """The id range (ids may have gaps: it can exceed the vocabulary's size)."""
        return max(self.vocab.values()) + 1


def read_input(directory, tokenizer_path, **weights):
    """A ModelInput: its tokenizer read once, its special tokens and sha256 from it."""
    tok = load_tokenizer(tokenizer_path)
    return ModelInput(directory, tok, tokenizer_path, read_special_tokens(tokenizer_path, tok),
                      tokenizer_sha256(tokenizer_path, tok), **weights)


def read_source(opts):
    """The source model: resolved (a hub id downloaded), loaded in its dtype, with its tokenizer."""
    directory = resolve_model_dir(opts.source_model_name_or_path, opts.source_revision)
    model = CausalLM.from_pretrained(directory, dtype="auto")
    source = read_input(directory, directory, model=model, description=describe_input(
        opts.source_model_name_or_path, opts.source_revision, directory, weight_files(directory)))
    rows = model.input_embeddings().weight.shape[0]
    if source.num_ids > rows:
        raise UserError(f"{directory}: the embedding has {rows} rows, but the source tokenizer has ids up to "
                        f"{source.num_ids - 1}")
    return source


def read_helper(opts):
    """The helper: the target tokenizer (--target_tokenizer, --helper_tokenizer_name_or_path or the helper
    directory's) and, when the method needs them, the helper model's input embeddings."""
    needs_weights = METHODS[opts.method].needs_helper
    directory = None
    if needs_weights or not opts.tokenizer_name_or_path:
        directory = resolve_model_dir(opts.helper_model_name_or_path, opts.helper_revision, weights=needs_weights)
    tokenizer_path = opts.tokenizer_name_or_path or directory
    if not os.path.isfile(tokenizer_path):  # a tokenizer.json file is used as it is
        tokenizer_path = resolve_model_dir(tokenizer_path, weights=False)
    if not needs_weights:
        return read_input(directory, tokenizer_path)
    embedding, key, file = load_input_embeddings(directory)
    helper = read_input(directory, tokenizer_path, embedding=embedding, description={
        **describe_input(opts.helper_model_name_or_path, opts.helper_revision, directory, [file]),
        "embedding": key, "embedding_shape": list(embedding.shape)})
    if helper.num_ids > embedding.shape[0]:
        raise UserError(f"{file}: {key} has {embedding.shape[0]} rows, but the helper tokenizer ({tokenizer_path}) "
                        f"has ids up to {helper.num_ids - 1}; tokenizer and model do not belong together")
    return helper


EMBEDDING_KEYS = ("transformer.wte.weight", "wte.weight", "gpt_neox.embed_in.weight", "model.embed_tokens.weight",
                  "embed_tokens.weight", "transformer.word_embeddings.weight", "word_embeddings.weight")


def load_input_embeddings(path):
    """The input-embedding matrix of any HF causal LM directory, found by its well-known name (GPT-2, GPT-NeoX,
    Llama-style, BLOOM) and read alone from safetensors (lazily), else from pytorch_model*.bin.
    Returns (tensor, key, file)."""
    seen = []
    for file in weight_files(path):
        found, names = read_weights(file, EMBEDDING_KEYS)
        for key in EMBEDDING_KEYS:
            if key in found:
                return found[key], key, file
        seen += names
    raise UserError(f"{path}: no input-embedding tensor found (looked for {', '.join(EMBEDDING_KEYS)}; the weights "
                    f"hold {', '.join(seen[:6])}{' ...' if len(seen) > 6 else ''})")


def describe_input(name_or_path, revision, path, files):
    """Provenance for the report: what the user named, the hub commit it resolved to, and sha256 of the files read."""
    parent, commit = os.path.split(os.path.normpath(path))
    return {"name_or_path": name_or_path, "revision": revision,
            "commit": commit if os.path.basename(parent) == "snapshots" else None,
            "files": {os.path.basename(f): sha256_file(f) for f in files}}


# -----------------------------------------------------------------------------
# matching the vocabularies


def match_vocabularies(source_vocab, helper_vocab):
    """Exact string match of two vocabularies (token -> id, added tokens included), as the original does.
    Returns (shared_src_ids, shared_helper_ids, missing_helper_ids), ordered by helper id."""
    shared = sorted((h, source_vocab[t]) for t, h in helper_vocab.items() if t in source_vocab)
    shared_ids = {h for h, _ in shared}
    missing = sorted({h for h in helper_vocab.values() if h not in shared_ids})
    return (torch.tensor([s for _, s in shared], dtype=torch.long),
            torch.tensor([h for h, _ in shared], dtype=torch.long), torch.tensor(missing, dtype=torch.long))


def special_token_rows(helper_special, helper_vocab, source_special, source_vocab):
    """What each helper special token gets: its own source row when the source has the string (shared), else the
    source row of the special token with the same role (eos, bos, pad, unk) when there is one, else CLP like any
    other token. Returns ({helper id: source id} to copy, {role: description} for the report)."""
    copies, report = {}, {}
    for role, token in sorted(helper_special.items()):
        hid = helper_vocab.get(token)
        if hid is None:
            report[role] = {"token": token, "id": None,
                            "init": "not in the helper vocabulary: left out of the target's tokenizer files"}
        elif token in source_vocab:
            report[role] = {"token": token, "id": hid, "init": f"shared (source id {source_vocab[token]})"}
        elif source_special.get(role) in source_vocab:
            src = source_special[role]
            copies[hid] = source_vocab[src]
            report[role] = {"token": token, "id": hid, "init": f"source {role} {src!r} (id {source_vocab[src]})"}
        else:
            report[role] = {"token": token, "id": hid, "init": "clp (the source has no token for this role)"}
    return copies, report


def match_tokens(source, helper, opts):
    """The Match of the helper's (the target's) vocabulary against the source's: exact string matches, then the
    special tokens by role; every other id is new."""
    shared_source, shared_target, missing = match_vocabularies(source.vocab, helper.vocab)
    initialisers = matrix_initialisers(opts, source.model.tied).values()
    if len(shared_source) == 0 and any(init not in (init_random, init_source_by_id) for init in initialisers):
        raise UserError(f"no shared tokens between the source tokenizer ({source.directory}) and the helper "
                        f"tokenizer ({helper.tokenizer_path}): CLP needs tokens whose strings both vocabularies have")
    copies, special_tokens = special_token_rows(helper.special_tokens, helper.vocab, source.special_tokens,
                                                source.vocab)
    special_target = torch.tensor(list(copies), dtype=torch.long)
    return Match(shared_source, shared_target, missing[~torch.isin(missing, special_target)],
                 round_up(helper.num_ids, opts.pad_to_multiple_of), list(copies.values()), special_target,
                 special_tokens)


# -----------------------------------------------------------------------------
# the whole transfer: source + helper -> target directory


def check_target(path, override):
    """Refuse a non-empty target without override (before any work), and a file in its place."""
    if os.path.isfile(path):
        raise UserError(f"{path}: the target exists and is a file")
    here, target = os.path.realpath(os.getcwd()), os.path.realpath(path)
    if os.path.commonpath([here, target]) == target:
        raise UserError(f"{path}: the target is the current directory or contains it; name a directory of its own")
    if os.path.isdir(path) and os.listdir(path) and not override:
        raise UserError(f"{path}: the target directory is not empty (pass --override to replace it)")


def initialise(source, helper, match, opts):
    """Each matrix of the target by its initialiser, the matrices sharing one in one call (CLP's weights computed
    once). Returns ({"input": rows, "output": rows (untied only)}, the initialisers' report entries)."""
    model = source.model
    matrices = {"input": model.input_embeddings().weight.detach()}
    if not model.tied:
        matrices["output"] = model.output_embeddings().weight.detach()
    groups = {}
    for role, init in matrix_initialisers(opts, model.tied).items():
        groups.setdefault(init, {})[role] = matrices[role]
    rows, entries = {}, {}
    for init, group in groups.items():
        new_rows, new_entries = init(group, match, source.tokenizer, helper.tokenizer, helper.embedding, opts)
        rows.update(new_rows)
        entries.update(new_entries)
    return {role: rows[role] for role in matrices}, entries


# report entries an initialiser gives (the value when none does); its other entries follow "method"
ENTRY_DEFAULTS = {"fallback_rows": 0, "fallback_tokens": [], "extrapolated_rows": 0, "random_init_method": None,
                  "random_init_rows": None}


def build_report(opts, source, helper, match, entries):
    """clp_report.json: what was asked, what was read (names, commits, sha256), the match and what each step did."""
    embedding, tied = source.model.input_embeddings().weight, source.model.tied
    entry = {**ENTRY_DEFAULTS, **entries}
    clp = opts.method == "clp"
    return {
        "method": "random_init" if opts.random_init else opts.method,
        **{key: value for key, value in entries.items() if key not in ENTRY_DEFAULTS},  # the method's own
        "source": source.description, "source_tokenizer_sha256": source.tokenizer_sha256,
        "helper": helper.description,
        "helper_tokenizer": {"name_or_path": opts.tokenizer_name_or_path or opts.helper_model_name_or_path,
                             "sha256": helper.tokenizer_sha256},
        "source_vocab_size": len(source.vocab), "source_embedding_rows": embedding.shape[0],
        "helper_vocab_size": len(helper.vocab), "target_vocab_size": match.rows,
        "padding_rows": match.rows - helper.num_ids, "unused_ids": helper.num_ids - len(helper.vocab),
        "shared_tokens": len(match.shared_source),
        "shared_fraction": round(len(match.shared_source) / len(helper.vocab), 6),
        "new_tokens": len(match.new), "special_tokens": match.special_tokens,
        "weighting": opts.weighting if clp else None, "top_k": opts.top_k if clp and opts.weighting == "topk" else None,
        "fallback_rows": entry["fallback_rows"], "fallback_tokens": entry["fallback_tokens"],
        "extrapolated_rows": entry["extrapolated_rows"], "extrapolation_fallback": opts.extrapolation_fallback,
        "output_embeddings": "tied" if tied else opts.output_embeddings,
        "random_init": opts.random_init, "random_init_method": entry["random_init_method"],
        "random_init_rows": entry["random_init_rows"],
        "seed": opts.seed, "dtype": str(embedding.dtype).removeprefix("torch."), "device": str(opts.device),
    }


def write_target(path, source, helper, rows, report, started):
    """The target directory: the source's body with the new rows, the helper's tokenizer, clp_report.json. Built
    under a temporary name beside `path` and renamed at the end: never half-written. The report's seconds (from
    `started`, a time.time()) include the writing."""
    ids = {role: helper.vocab.get(helper.special_tokens.get(role)) for role in ("bos_token", "eos_token", "pad_token")}
    model = source.model.with_embeddings(rows["input"], rows.get("output"), bos_token_id=ids["bos_token"],
                                         eos_token_id=ids["eos_token"])
    # a declared special token the tokenizer lacks stays out: transformers would add it as an id past the rows
    special = {role: token for role, token in helper.special_tokens.items() if token in helper.vocab}
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        if ids["pad_token"] is not None:
            config = read_json(os.path.join(tmp, "config.json"))
            write_json(os.path.join(tmp, "config.json"), dict(config, pad_token_id=ids["pad_token"]))
        save_tokenizer(helper.tokenizer_path, tmp, special_tokens=special, tokenizer=helper.tokenizer)
        report["seconds"] = round(time.time() - started, 2)
        write_json(os.path.join(tmp, "clp_report.json"), report)


def apply_clp(source_model_name_or_path, helper_model_name_or_path=None, target_model_path=None, **options):
    """CLP-Transfer (or FVT, mean, the random baseline) from a HF-format source and a helper: read -> match ->
    initialise -> report -> write. options: TransferOptions' fields (the command-line flags). Returns (embed_in,
    embed_out, report); embed_out is None when the source ties its head to the input matrix. With
    target_model_path, also writes the target: an HF-format directory with the helper's tokenizer and
    clp_report.json."""
    started = time.time()
    opts = TransferOptions(source_model_name_or_path, helper_model_name_or_path, target_model_path, **options)
    if opts.target_model_path:
        check_target(opts.target_model_path, opts.override)
    source, helper = read_source(opts), read_helper(opts)
    match = match_tokens(source, helper, opts)
    rows, entries = initialise(source, helper, match, opts)
    report = build_report(opts, source, helper, match, entries)
    report["seconds"] = round(time.time() - started, 2)
    if opts.target_model_path:
        write_target(opts.target_model_path, source, helper, rows, report, started)
    return rows["input"], rows.get("output"), report


# -----------------------------------------------------------------------------
# command line: the study's command, unchanged


def main(argv=None):
    parser = argparse.ArgumentParser(description="CLP-Transfer: a source model's body with a helper model's "
                                     "tokenizer, its embeddings initialised from the source's.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("apply_clp", help="build the target model directory")
    for f in fields(TransferOptions):
        cli = {k: v for k, v in f.metadata.items() if k != "method"}
        if isinstance(f.default, bool):
            cli["action"] = "store_true"
        elif f.default is not MISSING:
            cli.update(default=f.default, type=type(f.default) if isinstance(f.default, int) else None)
        p.add_argument(f"--{f.name}", **cli)
    args = vars(parser.parse_args(argv))
    args.pop("command")
    _, _, report = apply_clp(**args)
    print(f"{args['target_model_path']}: {report['target_vocab_size']} rows, {report['shared_tokens']} shared tokens "
          f"({100 * report['shared_fraction']:.1f}% of the helper vocabulary), {report['fallback_rows']} fallback "
          f"rows, {report['seconds']:.1f} s")


if __name__ == "__main__":
    run_cli(main)
