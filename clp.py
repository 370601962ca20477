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

python clp.py apply_clp --source_model_name_or_path EleutherAI/pythia-410m \\
    --helper_model_name_or_path malteos/gpt2-wechsel-german-ds-meg --target_model_path out/pythia-410m-clp-german
"""

import argparse
import functools
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (UserError, atomic_dir, check_device, load_tokenizer, read_json, read_special_tokens,
                    resolve_model_dir, round_up, run_cli, save_tokenizer, sha256_file, tokenizer_sha256, write_json)
from model import CausalLM, read_weights, weight_files

METHODS = ("clp", "fvt", "mean")
WEIGHTINGS = ("dense", "topk", "sparsemax")
OUTPUT_EMBEDDINGS = ("clp", "source_by_id", "random")
RANDOM_INIT_METHODS = ("small_init", "normal", "xavier")

# -----------------------------------------------------------------------------
# the method on raw tensors


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


def clp_embeddings(source_emb, helper_emb, shared_src_ids, shared_helper_ids, missing_helper_ids, num_rows=None,
                   weighting="dense", top_k=10, chunk_size=1024, device="cpu", extrapolation_fallback=False):
    """CLP on raw matrices. source_emb (V_src, d), or a list of such matrices sharing a vocabulary (input and output
    embeddings: the weights are computed once, applied to each); helper_emb (V_helper, d_helper). Shared token j is
    row shared_src_ids[j] of the source and shared_helper_ids[j] of the helper; missing_helper_ids get the weighted
    average. Returns (matrices, fallback_ids): each matrix (num_rows, d) in its source's dtype, shared rows copied
    bit for bit, the rest computed in fp32 on `device`; rows in neither list (ids no token has, padding) hold the
    mean of the shared source rows. fallback_ids: the missing ids whose similarity sum was not positive (with
    extrapolation_fallback, also those whose weighted sum came out longer than every shared source row)."""
    single = torch.is_tensor(source_emb)
    sources = [source_emb] if single else list(source_emb)
    shared_src_ids, shared_helper_ids, missing_helper_ids = (torch.as_tensor(x, dtype=torch.long).reshape(-1)
                                                             for x in (shared_src_ids, shared_helper_ids,
                                                                       missing_helper_ids))
    if weighting not in WEIGHTINGS:
        raise UserError(f"weighting={weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
    if len(shared_src_ids) == 0:
        raise UserError("no shared tokens: CLP averages the source rows of the tokens both vocabularies have")
    if len(shared_src_ids) != len(shared_helper_ids):
        raise ValueError(f"{len(shared_src_ids)} shared source ids but {len(shared_helper_ids)} shared helper ids")
    num_rows = num_rows or helper_emb.shape[0]
    dev = torch.device(device)

    hs = F.normalize(helper_emb[shared_helper_ids].to(dev, torch.float32), dim=1)  # unit rows, (n_shared, d_helper)
    es = [E[shared_src_ids].to(dev, torch.float32) for E in sources]  # (n_shared, d) each
    radius = [longest_row(e) for e in es]
    covered = torch.zeros(num_rows, dtype=torch.bool)
    covered[shared_helper_ids] = covered[missing_helper_ids] = True
    outs = []
    for E, e in zip(sources, es):
        out = torch.empty(num_rows, E.shape[1], dtype=E.dtype)
        out[~covered] = e.mean(0).to("cpu", E.dtype)  # rows no token has (padding)
        out[shared_helper_ids] = e.to("cpu", E.dtype)  # back from fp32: bit-identical to the source rows
        outs.append(out)
    if weighting == "dense":
        # the factorised sum, no (missing x shared) matrix: sum_j cos(h, h_j) e_j / sum_j cos(h, h_j)
        # = (h @ sum_j unit(h_j) e_j^T) / (h @ sum_j unit(h_j)); |h| cancels, so new rows need no normalising
        hsum = hs.sum(0)
        ms = [hs.T @ e for e in es]  # (d_helper, d) each
    fallback = []
    for ids in tqdm(missing_helper_ids.split(chunk_size), desc=f"clp {weighting}", unit="chunk", disable=None):
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
    return (outs[0] if single else outs), torch.cat(fallback) if fallback else missing_helper_ids[:0]


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


def init_without_helper(method, sources, source_tok, target_tok, shared_src, shared_target, new_ids, num_rows,
                        source_token_ids, mean_sample=False, seed=42, device="cpu"):
    """The target matrices for fvt or mean: shared rows copied, new rows by the method, rows no token has (padding)
    the mean of the shared source rows (as clp_embeddings fills them), as do fvt's tokens with no source piece.
    mean averages the rows of the source's tokens (source_token_ids: not its padding rows). Returns (matrices,
    report entries)."""
    id_to_token = {i: t for t, i in target_tok.get_vocab(with_added_tokens=True).items()}
    if method == "fvt":
        from tokenizers import decoders

        tokens = [id_to_token[int(i)] for i in new_ids]
        added = [t.content for t in target_tok.get_added_tokens_decoder().values()]
        pieces, by_bytes = fvt_pieces(tokens, source_tok, isinstance(target_tok.decoder, decoders.ByteLevel), added)
        counts = torch.tensor([len(p) for p in pieces], dtype=torch.long)
        new_rows = fvt_embeddings(sources, [p for p in pieces if p], device)
        report = {"fvt": {"pieces_histogram": {str(k): int(n) for k, n in enumerate(counts.bincount()) if n},
                          "mean_pieces": round(counts.float().mean().item(), 4) if len(counts) else None,
                          "split_byte_by_byte": by_bytes,
                          "no_source_piece": [t for t, n in zip(tokens, counts.tolist()) if n == 0]}}
        new_ids = new_ids[counts > 0]
    else:
        new_rows = [mean_embeddings(E[source_token_ids], len(new_ids), mean_sample, seed + k)
                    for k, E in enumerate(sources)]
        report = {"mean_sample": mean_sample}
    outs = []
    for E, new in zip(sources, new_rows):
        shared = E[shared_src]
        out = torch.empty(num_rows, E.shape[1], dtype=E.dtype)
        out[:] = shared.float().mean(0).to(E.dtype)
        out[shared_target] = shared
        out[new_ids] = new
        outs.append(out)
    return outs, report


# -----------------------------------------------------------------------------
# reading the helper and matching the vocabularies

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


def describe_input(name_or_path, revision, path, files):
    """Provenance for the report: what the user named, the hub commit it resolved to, and sha256 of the files read."""
    parent, commit = os.path.split(os.path.normpath(path))
    return {"name_or_path": name_or_path, "revision": revision,
            "commit": commit if os.path.basename(parent) == "snapshots" else None,
            "files": {os.path.basename(f): sha256_file(f) for f in files}}


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


def check_method(method, helper_model, helper_tokenizer, target_tokenizer, random_init, weighting,
                 extrapolation_fallback, mean_sample):
    """The method's inputs and options, checked before any work: clp needs the helper model, fvt and mean only a
    target tokenizer; each option belongs to one method."""
    if method not in METHODS:
        raise UserError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    if helper_tokenizer and target_tokenizer:
        raise UserError("--target_tokenizer and --helper_tokenizer_name_or_path name the same tokenizer: give one")
    if method == "clp" and not helper_model:
        raise UserError("--method clp needs --helper_model_name_or_path (its embeddings weigh the shared tokens); "
                        "--method fvt or mean need only --target_tokenizer")
    if method != "clp" and not (helper_model or helper_tokenizer or target_tokenizer):
        raise UserError(f"--method {method} needs the target tokenizer: --target_tokenizer (a tokenizer.json or a "
                        "directory) or --helper_model_name_or_path")
    for flag, given, only in (("--random_init", random_init, "clp"), ("--weighting", weighting != "dense", "clp"),
                              ("--extrapolation_fallback", extrapolation_fallback, "clp"),
                              ("--mean_sample", mean_sample, "mean")):
        if given and method != only:
            raise UserError(f"{flag} does not apply to --method {method} (only to --method {only})")


def write_target(path, model, tokenizer_src, special_tokens, pad_token_id, report, started=None):
    """Build the target directory under a temporary name beside `path`, rename it at the end: never half-written.
    With `started` (a time.time()), the report's seconds include the writing."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        if pad_token_id is not None:
            config = read_json(os.path.join(tmp, "config.json"))
            write_json(os.path.join(tmp, "config.json"), dict(config, pad_token_id=pad_token_id))
        save_tokenizer(tokenizer_src, tmp, special_tokens=special_tokens)
        if started is not None:
            report["seconds"] = round(time.time() - started, 2)
        write_json(os.path.join(tmp, "clp_report.json"), report)


def random_rows(num_rows, method, rows, copy_helper, copy_src, E, seed):
    """A randomly initialised matrix like E; rows='missing' keeps the shared tokens' source rows."""
    out = random_embeddings(num_rows, E, method, seed)
    if rows == "missing":
        out[copy_helper] = E[copy_src]
    return out


def check_options(output_embeddings, weighting, random_init_method, random_init_rows, top_k, pad_to_multiple_of,
                  chunk_size, device):
    """The choices and sizes, checked before any model loads."""
    for name, value, allowed in (("output_embeddings", output_embeddings, OUTPUT_EMBEDDINGS),
                                 ("weighting", weighting, WEIGHTINGS),
                                 ("random_init_method", random_init_method, RANDOM_INIT_METHODS),
                                 ("random_init_rows", random_init_rows, ("all", "missing"))):
        if value not in allowed:
            raise UserError(f"{name}={value!r}: expected one of {', '.join(allowed)}")
    for name, value in (("top_k", top_k), ("pad_to_multiple_of", pad_to_multiple_of), ("chunk_size", chunk_size)):
        if int(value) < 1:
            raise UserError(f"{name}={value}: expected a positive integer")
    check_device(str(device), "device")


def apply_clp(source_model_name_or_path, helper_model_name_or_path=None, target_model_path=None,
              helper_tokenizer_name_or_path=None, seed=42, override=False, random_init=False,
              random_init_method="small_init", random_init_rows="all", output_embeddings=None, weighting="dense",
              top_k=10, pad_to_multiple_of=128, chunk_size=1024, device="cpu", source_revision=None,
              helper_revision=None, extrapolation_fallback=False, method="clp", target_tokenizer=None,
              mean_sample=False):
    """CLP-Transfer from a HF-format GPT-NeoX source and any HF causal LM helper. Returns (embed_in, embed_out,
    report); embed_out is None when the source ties its head to the input matrix. With target_model_path, also
    writes the target: an HF-format directory with the helper's tokenizer and clp_report.json.
    method fvt or mean: the new rows by FVT or the source mean instead; these read only the target tokenizer
    (target_tokenizer, or the helper's), no helper weights."""
    t0 = time.time()
    check_method(method, helper_model_name_or_path, helper_tokenizer_name_or_path, target_tokenizer, random_init,
                 weighting, extrapolation_fallback, mean_sample)
    helper_tokenizer_name_or_path = helper_tokenizer_name_or_path or target_tokenizer
    if output_embeddings is None:
        output_embeddings = "random" if random_init else "clp"
    check_options(output_embeddings, weighting, random_init_method, random_init_rows, top_k, pad_to_multiple_of,
                  chunk_size, device)
    if target_model_path:
        check_target(target_model_path, override)

    source_dir = resolve_model_dir(source_model_name_or_path, source_revision)
    source = CausalLM.from_pretrained(source_dir, dtype="auto")
    source_tok = load_tokenizer(source_dir)
    helper_dir = helper_emb = None
    if method == "clp" or not helper_tokenizer_name_or_path:  # fvt and mean read the helper's tokenizer only
        helper_dir = resolve_model_dir(helper_model_name_or_path, helper_revision, weights=method == "clp")
    if method == "clp":
        helper_emb, helper_key, helper_file = load_input_embeddings(helper_dir)
    tok_src = helper_tokenizer_name_or_path or helper_dir
    if not os.path.isfile(tok_src):  # a tokenizer.json file is used as it is
        tok_src = resolve_model_dir(tok_src, None if helper_tokenizer_name_or_path else helper_revision, weights=False)
    helper_tok = load_tokenizer(tok_src)

    source_vocab = source_tok.get_vocab(with_added_tokens=True)
    helper_vocab = helper_tok.get_vocab(with_added_tokens=True)
    E_in, tied = source.input_embeddings().weight.detach(), source.tied
    E_out = None if tied else source.output_embeddings().weight.detach()
    n_tokens = max(helper_vocab.values()) + 1
    if helper_emb is not None and n_tokens > helper_emb.shape[0]:
        raise UserError(f"{helper_file}: {helper_key} has {helper_emb.shape[0]} rows, but the helper tokenizer "
                        f"({tok_src}) has ids up to {n_tokens - 1}; tokenizer and model do not belong together")
    if max(source_vocab.values()) >= E_in.shape[0]:
        raise UserError(f"{source_dir}: the embedding has {E_in.shape[0]} rows, but the source tokenizer has ids up "
                        f"to {max(source_vocab.values())}")
    shared_src, shared_helper, missing = match_vocabularies(source_vocab, helper_vocab)
    if len(shared_src) == 0 and (not random_init or not tied and output_embeddings == "clp"):  # random: none needed
        raise UserError(f"no shared tokens between the source tokenizer ({source_dir}) and the helper tokenizer "
                        f"({tok_src}): CLP needs tokens whose strings both vocabularies have")
    helper_special = read_special_tokens(tok_src)
    copies, special_report = special_token_rows(helper_special, helper_vocab, read_special_tokens(source_dir),
                                                source_vocab)
    missing = missing[~torch.isin(missing, torch.tensor(list(copies), dtype=torch.long))]
    copy_helper = torch.cat([shared_helper, torch.tensor(list(copies), dtype=torch.long)])
    copy_src = torch.cat([shared_src, torch.tensor(list(copies.values()), dtype=torch.long)])
    num_rows = round_up(n_tokens, pad_to_multiple_of)

    # the method (CLP, FVT or mean) for the matrices it initialises (CLP's weights computed once), random init or
    # the study's head for the rest
    clp_sources = ([] if random_init else [E_in]) + ([E_out] if not tied and output_embeddings == "clp" else [])
    fallback, extrapolated = missing[:0], torch.zeros(len(missing), dtype=torch.bool)
    method_report = {}
    if clp_sources:
        if method == "clp":
            clp_out, fallback = clp_embeddings(clp_sources, helper_emb, shared_src, shared_helper, missing,
                                               num_rows=num_rows, weighting=weighting, top_k=top_k,
                                               chunk_size=chunk_size, device=device,
                                               extrapolation_fallback=extrapolation_fallback)
        else:
            clp_out, method_report = init_without_helper(method, clp_sources, source_tok, helper_tok, shared_src,
                                                         shared_helper, missing, num_rows,
                                                         sorted(source_vocab.values()), mean_sample, seed, device)
        for out, E in zip(clp_out, clp_sources):
            extrapolated |= out[missing].float().norm(dim=1) > longest_row(E[shared_src])
            out[copy_helper] = E[copy_src]  # adds the special tokens matched by role

    randomised = functools.partial(random_rows, num_rows, random_init_method, random_init_rows, copy_helper, copy_src)
    embed_in = randomised(E_in, seed) if random_init else clp_out[0]
    if tied:
        embed_out = None
    elif output_embeddings == "clp":
        embed_out = clp_out[-1]
    elif output_embeddings == "random":
        embed_out = randomised(E_out, seed + 1)
    else:  # source_by_id: the study's head, source row i for helper token i; rows past the source's: their mean
        k = min(num_rows, E_out.shape[0])
        embed_out = torch.cat([E_out[:k], E_out.float().mean(0).to(E_out.dtype).expand(num_rows - k, -1)])

    id_to_token = {i: t for t, i in helper_vocab.items()}
    any_random = random_init or (not tied and output_embeddings == "random")
    report = {
        "method": "random_init" if random_init else method, **method_report,
        "source": describe_input(source_model_name_or_path, source_revision, source_dir,
                                 weight_files(source_dir)),
        "source_tokenizer_sha256": tokenizer_sha256(source_dir),
        "helper": None if helper_emb is None else {
            **describe_input(helper_model_name_or_path, helper_revision, helper_dir, [helper_file]),
            "embedding": helper_key, "embedding_shape": list(helper_emb.shape)},
        "helper_tokenizer": {"name_or_path": helper_tokenizer_name_or_path or helper_model_name_or_path,
                             "sha256": tokenizer_sha256(tok_src)},
        "source_vocab_size": len(source_vocab), "source_embedding_rows": E_in.shape[0],
        "helper_vocab_size": len(helper_vocab), "target_vocab_size": num_rows,
        "padding_rows": num_rows - n_tokens, "unused_ids": n_tokens - len(helper_vocab),
        "shared_tokens": len(shared_src), "shared_fraction": round(len(shared_src) / len(helper_vocab), 6),
        "new_tokens": len(missing), "special_tokens": special_report,
        "weighting": weighting if method == "clp" else None,
        "top_k": top_k if weighting == "topk" and method == "clp" else None,
        "fallback_rows": len(fallback), "fallback_tokens": [id_to_token[int(i)] for i in fallback[:20]],
        "extrapolated_rows": int(extrapolated.sum()), "extrapolation_fallback": extrapolation_fallback,
        "output_embeddings": "tied" if tied else output_embeddings,
        "random_init": random_init, "random_init_method": random_init_method if any_random else None,
        "random_init_rows": random_init_rows if any_random else None,
        "seed": seed, "dtype": str(E_in.dtype).removeprefix("torch."), "device": str(device),
    }
    report["seconds"] = round(time.time() - t0, 2)
    if target_model_path:
        ids = {role: helper_vocab.get(helper_special.get(role)) for role in ("bos_token", "eos_token", "pad_token")}
        model = source.with_embeddings(embed_in, embed_out, bos_token_id=ids["bos_token"],
                                       eos_token_id=ids["eos_token"])
        # a declared special token the tokenizer lacks stays out: transformers would add it as an id past the rows
        special = {role: token for role, token in helper_special.items() if token in helper_vocab}
        write_target(target_model_path, model, tok_src, special, ids["pad_token"], report, started=t0)
    return embed_in, embed_out, report


# -----------------------------------------------------------------------------
# command line: the study's command, unchanged


def main(argv=None):
    parser = argparse.ArgumentParser(description="CLP-Transfer: a source model's body with a helper model's "
                                     "tokenizer, its embeddings initialised from the source's.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("apply_clp", help="build the target model directory")
    p.add_argument("--source_model_name_or_path", required=True, help="HF-format GPT-NeoX (directory or hub id)")
    p.add_argument("--helper_model_name_or_path", default=None,
                   help="any HF causal LM in the target language (needed by clp; fvt and mean read only its "
                        "tokenizer)")
    p.add_argument("--target_model_path", required=True, help="output directory")
    p.add_argument("--helper_tokenizer_name_or_path", default=None, help="default: the helper model's tokenizer")
    p.add_argument("--method", default="clp",
                   help="clp (default): the paper's similarity-weighted average of the shared tokens' rows; fvt: "
                        "each new token the mean of the source rows of the pieces the source tokenizer splits it "
                        "into (Fast Vocabulary Transfer); mean: every new row the mean of the source rows. fvt "
                        "and mean need no helper model, only the target tokenizer")
    p.add_argument("--target_tokenizer", default=None,
                   help="fvt and mean: the target tokenizer (tokenizer.json, a directory or a hub id) when there "
                        "is no helper model")
    p.add_argument("--mean_sample", action="store_true",
                   help="mean: draw each new row from the normal with the source rows' mean and covariance "
                        "(Hewitt 2021; seeded by --seed) instead of the plain mean")
    p.add_argument("--source_revision", default=None, help="hub revision of the source, e.g. step143000")
    p.add_argument("--helper_revision", default=None, help="hub revision of the helper")
    p.add_argument("--seed", type=int, default=42, help="seeds the random init (output head: seed + 1)")
    p.add_argument("--override", action="store_true", help="replace a non-empty target directory")
    p.add_argument("--random_init", action="store_true",
                   help="the random-init baseline instead of CLP; like the study, randomises ALL input rows unless "
                        "--random_init_rows missing (then shared tokens keep their source rows)")
    p.add_argument("--random_init_method", choices=RANDOM_INIT_METHODS, default="small_init",
                   help="small_init: N(0, sqrt(2/(5d))) (the study's); normal: per-dimension N(mean, std) of the "
                        "source matrix (the original clp.py's start); xavier: Glorot normal")
    p.add_argument("--random_init_rows", choices=("all", "missing"), default="all",
                   help="all (the study's) or only the rows that CLP would compute")
    p.add_argument("--output_embeddings", choices=OUTPUT_EMBEDDINGS, default=None,
                   help="untied sources: clp (default) applies the same method (clp weights, fvt pieces, mean) to "
                        "the source's output rows; "
                        "source_by_id keeps source row i for token i (the study); random (default with "
                        "--random_init) uses the random init. Tied sources need nothing.")
    p.add_argument("--weighting", choices=WEIGHTINGS, default="dense",
                   help="dense: the paper's cos/sum over all shared tokens; topk: the same over the top_k most "
                        "similar; sparsemax: CLP+")
    p.add_argument("--top_k", type=int, default=10)
    p.add_argument("--pad_to_multiple_of", type=int, default=128,
                   help="target rows: the helper tokenizer's size rounded up to this (1: no padding)")
    p.add_argument("--extrapolation_fallback", action="store_true",
                   help="rows longer than the longest shared source row (a similarity sum just above zero makes "
                        "the weights extrapolate; the report counts them as extrapolated_rows) average over the "
                        "positive similarities instead; off by default: the paper's formula as published")
    p.add_argument("--chunk_size", type=int, default=1024, help="new tokens per step (bounds memory)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = vars(parser.parse_args(argv))
    args.pop("command")
    _, _, report = apply_clp(**args)
    print(f"{args['target_model_path']}: {report['target_vocab_size']} rows, {report['shared_tokens']} shared tokens "
          f"({100 * report['shared_fraction']:.1f}% of the helper vocabulary), {report['fallback_rows']} fallback "
          f"rows, {report['seconds']:.1f} s")


if __name__ == "__main__":
    run_cli(main)
