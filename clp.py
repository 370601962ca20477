"""
CLP-Transfer (Ostendorff & Rehm 2023): a German vocabulary for an English model (Pythia, Llama, Mistral, Qwen) without
training.

The target keeps the source model's body and takes the small helper model's tokenizer. Its embedding rows:
- tokens both tokenizers have copy the source row: tokens that stand for the same bytes (a byte-level `ĠHaus` and a
  SentencePiece `▁Haus` are both " Haus"; `--token_matching exact`: the same string, as the original code);
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
A helper special token (bos, eos, pad, unk) the source lacks takes the source row of the source's special token with the
same role, if it has one. The target has the helper tokenizer's rows rounded up to a multiple
of 128; rows no token produces (padding) hold the mean of the shared source rows: an average token, never an outlier.

With `--extend N` the target keeps the source's tokenizer instead (every token at its id) and appends the helper
tokenizer's N most useful tokens it lacks (extend_tokenizer); only their rows are initialised, by the same methods,
and every source row is copied bit for bit (train.py's train_new_rows_only then trains those rows alone first).

`apply_clp` reads each input once (a ModelInput), matches the vocabularies (a Match), initialises each matrix with
its initialiser, reports and writes. An initialiser is one function, (matrices, match, source tokenizer, target
tokenizer, helper rows, options) -> (rows, report entries); `--method` picks one from METHODS (a new method is an
entry there and its function), the random baseline and the study's head are initialisers too.

python clp.py apply_clp --source_model_name_or_path EleutherAI/pythia-410m \\
    --helper_model_name_or_path malteos/gpt2-wechsel-german-ds-meg --target_model_path out/pythia-410m-clp-german
"""

import argparse
import functools
import json
import math
import os
import re
import time
from dataclasses import MISSING, dataclass, field, fields
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (UserError, atomic_dir, check_device, in_context, load_tokenizer, read_json,
                    read_special_tokens, resolve_model_dir, round_up, run_cli, save_tokenizer, sha256_file,
                    tokenizer_sha256, write_errors, write_json)
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
    padded). special_tokens: role -> how it was matched; overlap: how the tokens were matched and the counts of
    both ways; both for the report."""
    shared_source: torch.Tensor
    shared_target: torch.Tensor
    new: torch.Tensor
    rows: int
    special_source: torch.Tensor = ()
    special_target: torch.Tensor = ()
    special_tokens: dict = field(default_factory=dict)
    overlap: dict = field(default_factory=dict)

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
    other row the mean of the anchor rows (what rows no token has keep; a method overwrites its new rows).
    shared: E[match.shared_source] when the caller has it (in any float dtype at least E's, on any device)."""
    shared = E[match.shared_source] if shared is None else shared
    out = anchor_rows(E, match, shared).float().mean(0).to("cpu", E.dtype).expand(match.rows, -1).clone()
    out[match.shared_target] = shared.to("cpu", E.dtype)
    out[match.special_target] = E[match.special_source]
    return out


def anchor_rows(E, match, shared=None):
    """The source rows that stand for "a token": the shared tokens' (every row of E when no token is shared: fvt and
    mean need none)."""
    if len(match.shared_source) == 0:
        return E
    return E[match.shared_source] if shared is None else shared


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
# what a token stands for: its bytes, the one view that token matching and FVT share

TOKEN_MATCHINGS = ("bytes", "exact")
BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet():
    """{character: byte} of GPT-2's byte-level BPE, which writes each byte as one printable character (the
    printable Latin-1 bytes as themselves, the others as chr(256 + n) in byte order)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {chr(c): b for c, b in zip(printable + [256 + n for n in range(len(others))], printable + others)}


# str.translate table: a byte-level character -> the Latin-1 character of its byte; a character below 256 that is no
# byte-level character -> one Latin-1 cannot encode, so a string that is not byte-level fails to encode as a whole
BYTE_LEVEL_TO_LATIN1 = {**{c: "\uffff" for c in range(256)},
                        **{ord(c): chr(b) for c, b in byte_level_alphabet().items()}}


class Convention(NamedTuple):
    """How a tokenizer writes text in its vocabulary, read from its decoder, pre-tokenizer and normaliser:
    byte_level (GPT-2's table, one character per byte: GPT-2, Pythia, Llama-3, Qwen), sentencepiece (`marker`, ▁,
    for a space or word start: Llama 2, Mistral, TinyLlama) or plain (the text itself); with byte_fallback a
    token <0xNN> stands for that byte."""
    kind: str = "byte_level"
    marker: str = None
    byte_fallback: bool = False

    def to_bytes(self, tokens, added=frozenset()):
        """What each token (a vocabulary string) stands for, as bytes: an added token its content as UTF-8, a
        byte-fallback token its byte, a byte-level token its characters mapped back to bytes, a sentencepiece
        token its text with the marker as a space, any other token its UTF-8."""
        out = []
        for token in tokens:
            if token in added:
                out.append(token.encode())
            elif self.byte_fallback and (byte := BYTE_FALLBACK_TOKEN.fullmatch(token)):
                out.append(bytes([int(byte[1], 16)]))
            elif self.kind == "byte_level":
                try:
                    out.append(token.translate(BYTE_LEVEL_TO_LATIN1).encode("latin-1"))
                except UnicodeEncodeError:  # a character outside the table: the token is its own text
                    out.append(token.encode())
            elif self.kind == "sentencepiece":
                out.append(token.replace(self.marker, " ").encode())
            else:
                out.append(token.encode())
        return out


def component_parts(component):
    """The JSON of a tokenizer component (decoder, pre-tokenizer, normaliser) and of each part of a Sequence."""
    if component is None:
        return []
    parts, todo = [], [json.loads(component.__getstate__())]
    while todo:
        part = todo.pop()
        parts.append(part)
        todo += part.get("decoders", []) + part.get("pretokenizers", []) + part.get("normalizers", [])
    return parts


def token_convention(tok):
    """The Convention a tokenizer's vocabulary is written in, from what its decoder, pre-tokenizer and normaliser
    do (never from its name): a ByteLevel step anywhere (a Sequence included) -> byte_level; a Metaspace step, a
    decoder's Replace(marker -> space) or a normaliser's Replace(space -> marker) -> sentencepiece."""
    decoder, pre, normalizer = (component_parts(c) for c in (tok.decoder, tok.pre_tokenizer, tok.normalizer))
    byte_fallback = bool(getattr(tok.model, "byte_fallback", False)) or any(
        p["type"] == "ByteFallback" for p in decoder)
    if any(p["type"] == "ByteLevel" for p in decoder + pre + normalizer):
        return Convention("byte_level", None, byte_fallback)
    for p in decoder + pre + normalizer:
        if p["type"] == "Metaspace":
            return Convention("sentencepiece", p["replacement"], byte_fallback)
    for p in decoder:
        if p["type"] == "Replace" and p["content"] == " " and p["pattern"].get("String", " ").strip():
            return Convention("sentencepiece", p["pattern"]["String"], byte_fallback)
    for p in normalizer:
        if p["type"] == "Replace" and p["pattern"].get("String") == " " and p["content"].strip():
            return Convention("sentencepiece", p["content"], byte_fallback)
    return Convention("plain", None, byte_fallback)


@dataclass
class TokenBytes:
    """What each id of a tokenizer's vocabulary stands for, built once per vocabulary entry: its key (special,
    bytes). A special added token (a control token: <s>, <|endoftext|>) is matched by its content and only with
    special tokens; every other token by its bytes. `secondary`: ids that yield to another token standing for the
    same bytes (byte-fallback and added tokens; the rule for several ids with one key is in `index`)."""
    convention: Convention
    keys: dict  # id -> (special, bytes)
    secondary: frozenset

    @functools.cached_property
    def index(self):
        """key -> the id that stands for it: of several ids with one key (a SentencePiece 'A' and its byte-fallback
        twin <0x41>, Pythia's 'ĠĠ' and its added '  '), a vocabulary token before a byte-fallback or added one,
        then the lowest id."""
        index = {}
        for i in sorted(self.keys.keys() - self.secondary) + sorted(self.secondary):
            index.setdefault(self.keys[i], i)
        return index


def token_bytes(tok, vocab=None):
    """The TokenBytes of a `tokenizers.Tokenizer`'s vocabulary (added tokens included; `vocab`: its get_vocab when
    the caller holds it)."""
    convention = token_convention(tok)
    vocab = tok.get_vocab(with_added_tokens=True) if vocab is None else vocab
    added = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
    special = [added.get(t, False) for t in vocab]
    keys = dict(zip(vocab.values(), zip(special, convention.to_bytes(vocab, added))))
    secondary = frozenset(vocab[t] for t in added if t in vocab) | frozenset(
        i for t, i in vocab.items() if convention.byte_fallback and BYTE_FALLBACK_TOKEN.fullmatch(t))
    return TokenBytes(convention, keys, secondary)


# -----------------------------------------------------------------------------
# FVT and mean: initialisations that need no helper model, only the target tokenizer


def fvt_pieces(target_tokens, source_tok, convention=Convention(), added=()):
    """Fast Vocabulary Transfer's split (Gee et al. 2022): each target token's text as the source tokenizer splits
    it inside a text (in_context: SentencePiece's word-start handling, byte fallback). target_tokens: strings of a
    vocabulary written in `convention` (default: byte-level), `added` those that are added tokens; each stands for
    its Convention.to_bytes. Bytes that are no valid UTF-8 on their own (a piece of a character) map byte by byte to
    the source's tokens for single bytes; a byte no UTF-8 text has (0xC0, 0xC1, 0xF5-0xFF) may have none, and is
    left out. Returns (a list of source-id lists, empty for a token none of whose bytes the source has; the number
    of tokens split byte by byte)."""
    raw = convention.to_bytes(target_tokens, frozenset(added))
    texts = {}
    for i, b in enumerate(raw):
        try:
            texts[i] = b.decode("utf-8")
        except UnicodeDecodeError:
            pass
    encoded = in_context(source_tok).encode_batch(list(texts.values()), add_special_tokens=False)
    pieces = dict(zip(texts, (e.ids for e in encoded)))
    by_bytes = [i for i in range(len(raw)) if not pieces.get(i)]  # not UTF-8, or encoded to nothing
    if by_bytes:
        index = token_bytes(source_tok).index
        byte_ids = [index.get((False, bytes([b]))) for b in range(256)]
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
    token with no source piece keeps the shared rows' mean (copied_rows)."""
    tokens = [target_tok.id_to_token(int(i)) for i in match.new]
    added = [t.content for t in target_tok.get_added_tokens_decoder().values()]
    pieces, by_bytes = fvt_pieces(tokens, source_tok, token_convention(target_tok), added)
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
    """How many new tokens have a row (in any matrix) longer than every shared source row (every source row when
    none is shared): no average can be."""
    beyond = torch.zeros(len(match.new), dtype=torch.bool)
    for role, E in matrices.items():
        beyond |= rows[role][match.new].float().norm(dim=1) > longest_row(anchor_rows(E, match))
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
    source_model_name_or_path: str = flag(MISSING, "HF-format causal LM (directory or hub id): GPT-NeoX or the "
                                                   "Llama family (llama, mistral, qwen2, qwen3)", required=True)
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
    token_matching: str = flag("bytes", "bytes (default): a source and a helper token are shared when they stand "
                                        "for the same bytes (a byte-level ĠHaus, a SentencePiece ▁Haus: ' Haus'; "
                                        "<0x0A>: a newline), control tokens by their content; exact: the same "
                                        "string, as the original code. Tokenizers of one family share the same "
                                        "tokens either way", choices=TOKEN_MATCHINGS)
    pad_to_multiple_of: int = flag(128, "target rows: the helper tokenizer's size rounded up to this (1: no "
                                        "padding)")
    extrapolation_fallback: bool = flag(False, "rows longer than the longest shared source row (a similarity sum "
                                               "just above zero makes the weights extrapolate; the report counts "
                                               "them as extrapolated_rows) average over the positive similarities "
                                               "instead; off by default: the paper's formula as published",
                                        method="clp")
    extend: int = flag(0, "keep the source's tokenizer (every token at its id) and append this many of the "
                          "target tokenizer's tokens it lacks, by the target's merge order; only the appended rows "
                          "are initialised by --method (byte-level BPE tokenizers: GPT-NeoX, Llama-3, Qwen)")
    fertility_text: str = flag(None, "--extend: a target-language text file; the report gives its tokens per word "
                                     "under the source and the extended tokenizer")
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
        if self.extend < 0:
            raise UserError(f"extend={self.extend}: expected the number of target tokens to append (0: replace the "
                            "vocabulary)")
        if self.extend and self.random_init:
            raise UserError("--random_init replaces every row; with --extend the source rows stay: use --method mean "
                            "or fvt for a baseline of the appended rows")
        if self.fertility_text and not self.extend:
            raise UserError("--fertility_text applies to --extend only")
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

    @functools.cached_property
    def token_bytes(self):
        """What each id stands for (TokenBytes)."""
        return token_bytes(self.tokenizer, self.vocab)

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


def match_vocabularies(source_vocab, helper_vocab, source_bytes=None, helper_bytes=None):
    """The shared tokens of two vocabularies (token -> id, added tokens included): by exact string, as the original
    does, or given both vocabularies' TokenBytes, by what the tokens stand for. There a helper token takes the
    source token with its string when that stands for the same bytes, else the one TokenBytes.index gives for its
    bytes (several helper tokens with one meaning, 'A' and <0x41>, share that source row). Returns (shared_src_ids,
    shared_helper_ids, missing_helper_ids), ordered by helper id."""
    if source_bytes is None:
        pairs = {h: source_vocab[t] for t, h in helper_vocab.items() if t in source_vocab}
    else:
        index, source_keys, helper_keys, pairs = source_bytes.index, source_bytes.keys, helper_bytes.keys, {}
        for token, h in helper_vocab.items():
            key, s = helper_keys[h], source_vocab.get(token)
            if s is None or source_keys[s] != key:
                s = index.get(key)
            if s is not None:
                pairs[h] = s
    shared = sorted(pairs.items())
    missing = sorted(set(helper_vocab.values()) - pairs.keys())
    return (torch.tensor([s for _, s in shared], dtype=torch.long),
            torch.tensor([h for h, _ in shared], dtype=torch.long), torch.tensor(missing, dtype=torch.long))


ROLE_ORDER = ("eos_token", "bos_token", "pad_token", "unk_token")  # a token with several roles takes the first's row


def special_token_rows(helper_special, helper_vocab, source_special, source_vocab, shared, method="clp"):
    """What each helper special token gets: its shared source row (`shared`: helper id -> source id), else the
    source row of the special token with the same role (eos, bos, pad, unk) when there is one, else what `method`
    gives any new token. A token with several roles (GPT-2's <|endoftext|>: bos, eos, unk) takes the row of its
    first role in ROLE_ORDER that the source has. Returns ({helper id: source id} to copy, {role: description}
    for the report)."""
    copies = {}  # helper id -> (source id, the role it was matched by)
    for role in sorted(helper_special, key=ROLE_ORDER.index):
        hid, src = helper_vocab.get(helper_special[role]), source_special.get(role)
        if hid is not None and hid not in shared and hid not in copies and src in source_vocab:
            copies[hid] = source_vocab[src], role
    report = {}
    for role, token in sorted(helper_special.items()):
        hid = helper_vocab.get(token)
        if hid is None:
            init = "not in the helper vocabulary: left out of the target's tokenizer files"
        elif hid in shared:
            init = f"shared (source id {shared[hid]})"
        elif hid in copies:
            sid, by = copies[hid]
            init = ("" if by == role else f"as {by}: ") + f"source {by} {source_special[by]!r} (id {sid})"
        else:
            init = f"{method} (the source has no token for this role)"
        report[role] = {"token": token, "id": hid, "init": init}
    return {hid: sid for hid, (sid, _) in copies.items()}, report


def match_tokens(source, helper, opts):
    """The Match of the helper's (the target's) vocabulary against the source's: shared tokens by
    --token_matching (both counts kept for the report), then the special tokens by role; every other id is new."""
    exact = match_vocabularies(source.vocab, helper.vocab)
    by_bytes = match_vocabularies(source.vocab, helper.vocab, source.token_bytes, helper.token_bytes)
    shared_source, shared_target, missing = by_bytes if opts.token_matching == "bytes" else exact
    initialisers = matrix_initialisers(opts, source.model.tied).values()
    if len(shared_source) == 0 and init_clp in initialisers:
        raise UserError(no_shared_tokens(source, helper, opts))
    copies, special_tokens = special_token_rows(helper.special_tokens, helper.vocab, source.special_tokens,
                                                source.vocab, dict(zip(shared_target.tolist(),
                                                                       shared_source.tolist())),
                                                "random_init" if opts.random_init else opts.method)
    special_target = torch.tensor(list(copies), dtype=torch.long)
    overlap = {"token_matching": opts.token_matching, "shared_tokens_exact": len(exact[0]),
               "shared_tokens_bytes": len(by_bytes[0]),
               "tokenizer_conventions": {"source": source.token_bytes.convention.kind,
                                         "target": helper.token_bytes.convention.kind}}
    return Match(shared_source, shared_target, missing[~torch.isin(missing, special_target)],
                 round_up(helper.num_ids, opts.pad_to_multiple_of), list(copies.values()), special_target,
                 special_tokens, overlap)


def no_shared_tokens(source, helper, opts):
    """The message for CLP without a shared token: both tokenizers and the ways out."""
    how = ("by exact string (--token_matching bytes matches what tokens stand for)" if opts.token_matching == "exact"
           else "even matched by the bytes tokens stand for")
    return (f"no shared tokens between the source tokenizer ({source.tokenizer_path}, "
            f"{source.token_bytes.convention.kind}) and the helper tokenizer ({helper.tokenizer_path}, "
            f"{helper.token_bytes.convention.kind}) {how}: CLP averages the source rows of shared tokens; use "
            "--method fvt (splits each new token with the source tokenizer) or a helper whose tokenizer shares "
            "tokens with the source's")


# -----------------------------------------------------------------------------
# extending the source's vocabulary instead of replacing it (--extend)


def bpe_spec(tok, name):
    """The JSON of a byte-level BPE tokenizer, with its merges as (left, right) pairs; a tokenizer of another kind
    (SentencePiece-style, WordPiece, Unigram) is refused in one line naming it."""
    spec = json.loads(tok.to_str())
    model, convention = spec["model"], token_convention(tok)
    if model["type"] != "BPE" or convention.kind != "byte_level":
        raise UserError(f"{name}: a {convention.kind} {model['type']} tokenizer; --extend merges byte-level BPE "
                        "vocabularies (GPT-2, GPT-NeoX/Pythia, Llama-3, Qwen): SentencePiece-style ones are not "
                        "supported")
    alphabet = set(byte_level_alphabet())
    added = {t["content"] for t in spec["added_tokens"]}
    foreign = next((t for t in model["vocab"] if t not in added and not set(t) <= alphabet), None)
    if foreign is not None:
        raise UserError(f"{name}: the token {foreign!r} is not written in the byte-level alphabet (GPT-2's byte "
                        "table); --extend needs both tokenizers to write bytes the same way")
    model["merges"] = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return spec


def extend_tokenizer(source_tok, target_tok, n_new, source_name="source tokenizer", target_name="target tokenizer"):
    """The source tokenizer with the target's n_new most useful tokens it lacks appended: every source token keeps
    its id (added and special tokens included), the new ones take the ids after the source's last, and the merges
    that make them follow the source's, so the source's merges keep their priority. "Most useful" is the target's
    own order: its merges by rank, a merge taken when both its parts are in the extended vocabulary already and the
    source's pre-tokenizer keeps its result whole (a token spanning two of the source's pre-tokens never forms).
    A target merge whose result the source has by other parts is kept too: it costs no id and lets a longer new
    token form. Returns (the extended `tokenizers.Tokenizer`, the appended tokens in id order, the first new id,
    the number of merges appended)."""
    from tokenizers import Tokenizer

    spec, target = bpe_spec(source_tok, source_name), bpe_spec(target_tok, target_name)
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    first_id = max([*vocab.values(), *(t["id"] for t in spec["added_tokens"])]) + 1
    known, merge_set, pre = set(vocab), set(merges), source_tok.pre_tokenizer
    target_added = {t["content"] for t in target["added_tokens"]}
    new, new_merges = [], []
    for left, right in tqdm(target["model"]["merges"], desc="target merges", unit="merge", disable=None):
        if len(new) == n_new:
            break
        token = left + right
        if left not in known or right not in known or (left, right) in merge_set or token in target_added:
            continue
        if token in known:
            new_merges.append((left, right))
            continue
        text = token.translate(BYTE_LEVEL_TO_LATIN1).encode("latin-1")
        try:
            whole = pre is None or len(pre.pre_tokenize_str(text.decode("utf-8"))) == 1
        except UnicodeDecodeError:  # part of a character: the pre-tokenizer cannot tell, the BPE may form it
            whole = True
        if whole:
            known.add(token)
            new.append(token)
            new_merges.append((left, right))
    if len(new) < n_new:
        raise UserError(f"--extend {n_new}: {target_name} has only {len(new)} tokens the source lacks "
                        "that its merges can form from the source's tokens; ask for at most that many")
    # an added token outside the model's vocabulary takes the id after it when loaded: pinned to its own id there
    vocab.update({t["content"]: t["id"] for t in spec["added_tokens"] if t["content"] not in vocab})
    vocab.update({token: first_id + i for i, token in enumerate(new)})
    merges += new_merges
    spec["model"]["merges"] = [list(m) for m in merges]
    return Tokenizer.from_str(json.dumps(spec)), new, first_id, len(new_merges)


def fertility(tok, texts):
    """Tokens per whitespace-separated word of `texts` under `tok` (no special tokens), and the token count."""
    tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    words = sum(len(t.split()) for t in texts)
    return {"tokens": tokens, "words": words, "tokens_per_word": round(tokens / max(words, 1), 4)}


def extend_vocabulary(source, helper, opts):
    """--extend: the target as the source's tokenizer with opts.extend of the helper tokenizer's tokens appended
    (extend_tokenizer), and its Match: every source id copies its own row bit for bit, the source tokens the helper
    also has (by the bytes they stand for) are the anchors CLP averages, the appended ids are new. The target's
    helper rows (for CLP) are the helper's, moved to the extended ids. Returns (the target ModelInput, the Match,
    the report's `extend` entry)."""
    tok, new, first_id, n_merges = extend_tokenizer(source.tokenizer, helper.tokenizer, opts.extend,
                                                    source.tokenizer_path, helper.tokenizer_path)
    source_ids, helper_ids, _ = match_vocabularies(source.vocab, helper.vocab, source.token_bytes,
                                                   helper.token_bytes)
    anchors = dict(zip(source_ids.tolist(), helper_ids.tolist()))  # source id -> a helper id with its bytes
    anchor_ids = torch.tensor(sorted(anchors), dtype=torch.long)
    rest = torch.arange(first_id)[~torch.isin(torch.arange(first_id), anchor_ids)]  # copied, no anchors
    new_ids = torch.arange(first_id, first_id + len(new))
    embedding = None
    if helper.embedding is not None:
        embedding = helper.embedding.new_zeros(first_id + len(new), helper.embedding.shape[1])
        embedding[anchor_ids] = helper.embedding[[anchors[i] for i in anchor_ids.tolist()]]
        embedding[new_ids] = helper.embedding[[helper.vocab[t] for t in new]]
    target = ModelInput(helper.directory, tok, None, source.special_tokens, helper.tokenizer_sha256,
                        helper.description, embedding=embedding)
    special = {role: {"token": token, "id": source.vocab.get(token), "init": "source row (id kept)"}
               for role, token in sorted(source.special_tokens.items())}
    overlap = {"token_matching": "bytes", "tokenizer_conventions": {"source": "byte_level", "target": "byte_level"}}
    match = Match(anchor_ids, anchor_ids, new_ids, round_up(first_id + len(new), opts.pad_to_multiple_of), rest,
                  rest, special, overlap)
    report = {"source_ids": first_id, "appended_tokens": len(new), "first_appended_id": first_id,
              "appended_examples": new[:20], "appended_merges": n_merges}
    if opts.fertility_text:
        texts = read_texts(opts.fertility_text)
        report["fertility"] = {"text": opts.fertility_text, "source": fertility(source.tokenizer, texts),
                               "extended": fertility(tok, texts)}
    return target, match, report


def read_texts(path):
    """A text file's non-empty lines (the text --fertility_text names)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: --fertility_text file not found")
    with open(path, encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.strip()]


# -----------------------------------------------------------------------------
# the whole transfer: source + helper -> target directory


def check_target(path, override, inputs):
    """Refuse a non-empty target without override (before any work), a file in its place, and a target that is,
    contains or lies inside an input's folder (`inputs`: flag -> path; a hub id counts not at all), with or without
    override: writing the target replaces its folder whole. A tokenizer file's folder may hold the target beside
    it (a file beside the target is untouched), not be or lie inside it."""
    if os.path.isfile(path):
        raise UserError(f"{path}: the target exists and is a file")
    here, target = os.path.realpath(os.getcwd()), os.path.realpath(path)
    if os.path.commonpath([here, target]) == target:
        raise UserError(f"{path}: the target is the current directory or contains it; name a directory of its own")
    for flag, given in inputs.items():
        is_file = bool(given) and os.path.isfile(given)
        folder = os.path.dirname(os.path.abspath(given)) if is_file else given
        if not (folder and os.path.isdir(folder)):
            continue
        other = os.path.realpath(folder)
        common = os.path.commonpath([target, other])
        if common == target or (common == other and not is_file):
            how = "is" if target == other else "contains" if common == target else "lies inside"
            raise UserError(f"--target_model_path {path} {how} the folder of --{flag} {given}: the target is "
                            "replaced whole; name a directory of its own")
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
        "shared_fraction": round(len(match.shared_source) / len(helper.vocab), 6), **match.overlap,
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
    with atomic_dir(path) as tmp, write_errors(path, tmp):
        model.save_pretrained(tmp)
        if ids["pad_token"] is not None:
            config = read_json(os.path.join(tmp, "config.json"))
            write_json(os.path.join(tmp, "config.json"), dict(config, pad_token_id=ids["pad_token"]))
        save_tokenizer(helper.tokenizer_path or tmp, tmp, special_tokens=special, tokenizer=helper.tokenizer)
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
    inputs = {"source_model_name_or_path": opts.source_model_name_or_path,
              "helper_model_name_or_path": opts.helper_model_name_or_path,
              "target_tokenizer" if opts.target_tokenizer else "helper_tokenizer_name_or_path":
                  opts.tokenizer_name_or_path}
    if opts.target_model_path:
        check_target(opts.target_model_path, opts.override, inputs)
    source, helper = read_source(opts), read_helper(opts)
    if opts.target_model_path:  # hub ids, now resolved to their local copies
        check_target(opts.target_model_path, opts.override, {
            "source_model_name_or_path": source.directory, "helper_model_name_or_path": helper.directory,
            "target_tokenizer" if opts.target_tokenizer else "helper_tokenizer_name_or_path": helper.tokenizer_path})
    if opts.extend:
        target, match, extension = extend_vocabulary(source, helper, opts)
    else:
        target, match, extension = helper, match_tokens(source, helper, opts), None
    rows, entries = initialise(source, target, match, opts)
    report = build_report(opts, source, target, match, entries)
    if extension:
        report.update(helper_vocab_size=len(helper.vocab), extend=extension,
                      shared_fraction=round(len(match.shared_source) / len(helper.vocab), 6))
    report["seconds"] = round(time.time() - started, 2)
    if opts.target_model_path:
        write_target(opts.target_model_path, source, target, rows, report, started)
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
    if args["extend"]:
        ext = report["extend"]
        fert = ext.get("fertility")
        print(f"  extended: {ext['appended_tokens']} tokens appended at ids {ext['first_appended_id']}.."
              f"{ext['first_appended_id'] + ext['appended_tokens'] - 1}" + (
                  f"; {fert['source']['tokens_per_word']} -> {fert['extended']['tokens_per_word']} tokens per word"
                  if fert else ""))


if __name__ == "__main__":
    run_cli(main)
