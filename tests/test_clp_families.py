"""clp.py across tokenizer families and from Llama-family sources: what a token stands for (byte-level BPE,
SentencePiece) against independent references (transformers' byte table, the sentencepiece library, the tokenizers
library's own decoders), the overlap of real tokenizers of different families, FVT's split in context, and tiny
Llama / Qwen2 / Mistral sources built by transformers, tied and untied, through every method; the targets load in
transformers with our logits. The real tokenizers come from pinned test packages (requirements-tokenizers.txt);
a test whose package is missing skips, naming it."""

import json
import os
import shutil

import pytest
import torch
from conftest import gpt2_helper, hf_llama, hf_neox, package_folder, safetensors_state

from clp import (Convention, Match, TransferOptions, apply_clp, fvt_pieces, init_fvt, match_vocabularies,
                 token_bytes, token_convention)
from common import load_tokenizer, save_tokenizer
from model import CausalLM

KINDS = {"mistral": "sentencepiece", "gpt2": "byte_level", "llama3": "byte_level", "qwen": "byte_level"}


def reference_keys(name, folder):
    """id -> (special, bytes) without clp.py: Mistral's pieces from its tokenizer.model read by the sentencepiece
    library (control and unknown pieces special, byte pieces their byte, ▁ a space); a byte-level vocabulary's
    strings mapped through transformers' bytes_to_unicode, its added tokens (and GPT-2's <|endoftext|>) by content."""
    if name == "mistral":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(
            package_folder("mistral-common", "mistral_common", "data"), "tokenizer.model.v1"))
        keys = {}
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            keys[i] = ((True, piece.encode()) if sp.is_control(i) or sp.is_unknown(i)
                       else (False, bytes([int(piece[3:5], 16)])) if sp.is_byte(i)
                       else (False, piece.replace("\u2581", " ").encode()))
        return keys
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    if name == "gpt2":
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            vocab, added = json.load(f), [{"id": 50256, "content": "<|endoftext|>", "special": True}]
    else:
        with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
            spec = json.load(f)
        vocab, added = spec["model"]["vocab"], spec["added_tokens"]
    keys = {i: (False, bytes(to_byte[c] for c in t)) for t, i in vocab.items()}
    keys.update({t["id"]: (t["special"], t["content"].encode()) for t in added})
    return keys


@pytest.fixture(scope="session")
def family(request, real_tokenizers):
    """name -> (folder, Tokenizer, TokenBytes, reference keys), each big tokenizer loaded once; names: mistral
    (SentencePiece), gpt2, llama3, qwen (byte-level)."""
    cache = {}

    def get(name):
        if name not in cache:
            folder = str(real_tokenizers["gpt2"] if name == "gpt2" else request.getfixturevalue(f"{name}_tokenizer"))
            tok = load_tokenizer(folder)
            cache[name] = folder, tok, token_bytes(tok), reference_keys(name, folder)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def shared(family):
    """(source name, helper name) -> {helper id: source id} of the tokens shared by bytes, each pair matched once."""
    cache = {}

    def get(source, helper):
        if (source, helper) not in cache:
            (_, s_tok, s_bytes, _), (_, h_tok, h_bytes, _) = family(source), family(helper)
            shared_source, shared_helper, _ = match_vocabularies(s_tok.get_vocab(with_added_tokens=True),
                                                                 h_tok.get_vocab(with_added_tokens=True), s_bytes,
                                                                 h_bytes)
            cache[source, helper] = dict(zip(shared_helper.tolist(), shared_source.tolist()))
        return cache[source, helper]

    return get


@pytest.mark.parametrize("name", KINDS)
def test_token_bytes_against_references(family, name):
    """Every id's bytes equal the independent reference's; every token that is text on its own decodes, with the
    tokenizers library's own decoder (after 'a', past SentencePiece's leading-space strip), to those bytes."""
    folder, tok, tb, reference = family(name)
    assert tb.convention.kind == KINDS[name] and tb.keys == reference
    text_ids = [i for i, (special, b) in reference.items() if not special and utf8(b) is not None]
    anchor = tok.token_to_id("a")
    decoded = tok.decode_batch([[anchor, i] for i in text_ids], skip_special_tokens=False)
    wrong = [(i, d) for i, d in zip(text_ids, decoded) if d != "a" + reference[i][1].decode()]
    assert not wrong and len(text_ids) > 0.9 * len(reference), wrong[:5]


def utf8(b):
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


@pytest.mark.parametrize("byte_level", ["gpt2", "llama3", "qwen"])
def test_overlap_sentencepiece_and_byte_level(family, byte_level):
    """Mistral's SentencePiece vocabulary and a byte-level one, both directions: the exact-string overlap and the
    overlap by bytes; the latter equals an independent count (reference keys), and the collision rule picks a
    vocabulary token over its byte-fallback twin."""
    for source, helper in (("mistral", byte_level), (byte_level, "mistral")):
        _, s_tok, s_bytes, s_ref = family(source)
        _, h_tok, h_bytes, h_ref = family(helper)
        sv, hv = s_tok.get_vocab(with_added_tokens=True), h_tok.get_vocab(with_added_tokens=True)
        exact, _, _ = match_vocabularies(sv, hv)
        shared_source, shared_helper, missing = match_vocabularies(sv, hv, s_bytes, h_bytes)
        source_keys = set(s_ref.values())
        assert len(shared_helper) == sum(key in source_keys for key in h_ref.values())
        assert len(exact) == len(sv.keys() & hv.keys()) and len(shared_helper) > 2.5 * len(exact)
        assert len(shared_helper) + len(missing) == len(hv)
        assert all(s_ref[s] == h_ref[h] for s, h in zip(shared_source.tolist(), shared_helper.tolist()))
        print(f"{source} source, {helper} helper: {len(exact):,} of {len(hv):,} helper tokens shared by exact string, "
              f"{len(shared_helper):,} by bytes")
    pairs = dict(zip(shared_helper.tolist(), shared_source.tolist()))  # byte-level source, Mistral helper
    mistral, bl = family("mistral")[1], family(byte_level)[1]
    for sp_token, bl_token in (("▁the", "Ġthe"), ("<0x0A>", "Ċ"), ("A", "A"), ("<0x41>", "A"), ("▁", "Ġ")):
        assert pairs[mistral.token_to_id(sp_token)] == bl.token_to_id(bl_token)
    shared_source, shared_helper, _ = match_vocabularies(
        *(t.get_vocab(with_added_tokens=True) for t in (mistral, bl)), family("mistral")[2], family(byte_level)[2])
    pairs = dict(zip(shared_helper.tolist(), shared_source.tolist()))  # Mistral source: 'A', not <0x41>; '▁'
    assert pairs[bl.token_to_id("A")] == mistral.token_to_id("A") and pairs[bl.token_to_id("Ġ")] == 28705


def test_one_family_shares_the_same_tokens_either_way(family):
    """Llama-3 and Qwen (both byte-level): matching by bytes finds exactly the exact-string pairs."""
    _, llama, llama_bytes, _ = family("llama3")
    _, qwen, qwen_bytes, _ = family("qwen")
    lv, qv = llama.get_vocab(with_added_tokens=True), qwen.get_vocab(with_added_tokens=True)
    for a, b in (((lv, qv), (llama_bytes, qwen_bytes)), ((qv, lv), (qwen_bytes, llama_bytes))):
        exact, by_bytes = match_vocabularies(*a), match_vocabularies(*a, *b)
        assert all(torch.equal(x, y) for x, y in zip(exact, by_bytes)) and len(exact[0]) > 100_000


# -----------------------------------------------------------------------------
# FVT: each new token's real text, split by the source as in context


def test_fvt_pieces_spell_each_token_in_context(family):
    """A SentencePiece source (Mistral) splits each new byte-level token (GPT-2's) as it would inside a text: the
    pieces spell the token's bytes exactly (' Haus' -> ▁Haus, not ▁ + ▁Haus; 'haus' without ▁; byte fallback for
    what Mistral lacks), and equal what Mistral's own tokenizer gives the text after a newline. The hub's older
    form of the same tokenizer (a Prepend + Replace normaliser, no pre-tokenizer) splits alike."""
    from tokenizers import Tokenizer

    _, mistral, _, mistral_ref = family("mistral")
    _, gpt2, gpt2_bytes, _ = family("gpt2")
    new = match_vocabularies(mistral.get_vocab(with_added_tokens=True), gpt2.get_vocab(with_added_tokens=True),
                             family("mistral")[2], gpt2_bytes)[2].tolist()
    tokens = [gpt2.id_to_token(i) for i in new]
    pieces, by_bytes = fvt_pieces(tokens, mistral, token_convention(gpt2), ["<|endoftext|>"])
    spelled = [b"".join(mistral_ref[p][1] for p in ids) for ids in pieces]
    assert spelled == [gpt2_bytes.keys[i][1] for i in new]
    assert by_bytes == sum(utf8(gpt2_bytes.keys[i][1]) is None for i in new) > 100  # pieces of a character
    assert fvt_pieces(["ĠHaus", "haus", "Ċ"], mistral)[0] == [[mistral.token_to_id(t)] for t in ("▁Haus", "haus",
                                                                                                 "<0x0A>")]
    assert sum(3 <= p < 259 for ids in pieces for p in ids) > 100  # <0x00>..<0xFF>: the byte-fallback pieces
    newline = mistral.encode("\n", add_special_tokens=False).ids
    texts = {k: text for k, i in enumerate(new) if (text := utf8(gpt2_bytes.keys[i][1])) is not None}
    in_context = mistral.encode_batch(["\n" + text for text in texts.values()], add_special_tokens=False)
    checked = {k: e.ids[len(newline):] for k, e in zip(texts, in_context) if e.ids[:len(newline)] == newline}
    assert {k: pieces[k] for k in checked} == checked and len(checked) > 0.9 * len(tokens)

    spec = json.loads(mistral.to_str())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {
        "type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    spec["pre_tokenizer"] = None
    legacy = Tokenizer.from_str(json.dumps(spec))
    assert legacy.encode(" Haus", add_special_tokens=False).tokens == ["▁▁", "H", "aus"]  # the whole-text view
    assert fvt_pieces(tokens, legacy, token_convention(gpt2), ["<|endoftext|>"]) == (pieces, by_bytes)


def test_fvt_sentencepiece_target_from_a_file_path(family, tmp_path):
    """A byte-level source (GPT-2's tokenizer on a tiny GPT-NeoX) and Mistral's tokenizer.json named as a file: each
    new token's row is the mean of the source rows of its real text (▁Haus = ' Haus', <0x0A> = a newline, <0xE4>
    byte by byte), exact matching or by bytes alike; the special tokens come from the files beside it."""
    folder, mistral, _, _ = family("mistral")
    gpt2_folder, gpt2, _, _ = family("gpt2")
    source = tmp_path / "source"
    hf_neox(vocab_size=50304, hidden_size=32).save_pretrained(source)
    save_tokenizer(gpt2_folder, str(source))
    E = safetensors_state(source)["gpt_neox.embed_in.weight"]
    rows = {}
    for matching in ("exact", "bytes"):
        target = tmp_path / matching
        rows[matching], _, report = apply_clp(str(source), method="fvt", token_matching=matching,
                                              target_tokenizer=os.path.join(folder, "tokenizer.json"),
                                              target_model_path=str(target))
        config = json.loads((target / "config.json").read_text())
        assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2) and report["token_matching"] == matching
        assert report["tokenizer_conventions"] == {"source": "byte_level", "target": "sentencepiece"}
        assert (report["shared_tokens_exact"], report["shared_tokens_bytes"]) == (8020, 21365)
        for sp_token, text in (("▁Haus", " Haus"), ("<0x0A>", "\n"), ("▁Geschichte", " Geschichte"),
                               ("aus", "aus")):
            ids = gpt2.encode(text, add_special_tokens=False).ids
            torch.testing.assert_close(rows[matching][mistral.token_to_id(sp_token)], E[ids].mean(0), msg=sp_token)
        assert torch.equal(rows[matching][mistral.token_to_id("<0xE4>")], E[gpt2.token_to_id("ä")])
    assert report["shared_tokens"] == 21365 and report["special_tokens"]["eos_token"]["init"].startswith("source eos")


def test_fvt_byte_level_target_with_a_sequence_decoder(eltec_tokenizers, tmp_path):
    """A byte-level target whose decoder is wrapped in a Sequence (it decodes identically) is byte-level: the same
    FVT rows as with the bare ByteLevel decoder."""
    from tokenizers import decoders

    source, target = (load_tokenizer(str(eltec_tokenizers[k])) for k in ("eng", "deu"))
    wrapped = load_tokenizer(str(eltec_tokenizers["deu"]))
    wrapped.decoder = decoders.Sequence([decoders.ByteLevel()])
    assert token_convention(wrapped) == Convention("byte_level")
    E = torch.randn(source.get_vocab_size(), 8, generator=torch.Generator().manual_seed(0))
    shared_source, shared_target, new = match_vocabularies(source.get_vocab(with_added_tokens=True),
                                                           target.get_vocab(with_added_tokens=True))
    match = Match(shared_source, shared_target, new, rows=target.get_vocab_size())
    opts = TransferOptions("source", method="fvt", target_tokenizer="target")
    plain, report = init_fvt({"input": E}, match, source, target, None, opts)
    sequence, _ = init_fvt({"input": E}, match, source, wrapped, None, opts)
    assert torch.equal(plain["input"], sequence["input"])
    assert sum(n for k, n in report["fvt"]["pieces_histogram"].items() if int(k) > 1) > len(new) / 2


# -----------------------------------------------------------------------------
# Llama-family sources: Llama-3 (tied as 3.2-1B, untied as 3.1-8B), Qwen2 (tied as 2.5-0.5B), Mistral (untied)


def family_source(path, model_type, tokenizer_folder, vocab_size, tied, seed=0, offset=0.0):
    """A tiny transformers model of `model_type` with a real tokenizer's files beside it (offset: added to its input
    embeddings, anisotropic as trained ones are: a helper's)."""
    model = hf_llama(model_type, vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=tied, seed=seed)
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(offset)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tokenizer_folder, name), os.path.join(path, name))
    return path


def gpt2_helper_dir(path, gpt2_folder):
    """A tiny GPT-2 helper with the real GPT-2 tokenizer (vocab.json + merges.txt, no config: <|endoftext|>)."""
    gpt2_helper(path, 50257)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(gpt2_folder, name), os.path.join(path, name))
    return path


def assert_same_logits(target, vocab_size):
    """Ours and transformers load the target alike: same logits, tied or not as the config says."""
    from transformers import AutoModelForCausalLM

    ours = CausalLM.from_pretrained(str(target)).eval()
    ref = AutoModelForCausalLM.from_pretrained(target, attn_implementation="eager").eval()
    idx = torch.randint(0, vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], ref(input_ids=idx).logits, rtol=1e-4, atol=1e-4)
    assert ours.tied == ref.config.tie_word_embeddings
    return ref


def assert_copied(matrix, source_matrix, report, pairs):
    """The shared tokens' rows (helper id -> source id) are the source rows bit for bit."""
    h, s = zip(*pairs.items())
    assert torch.equal(matrix[list(h)], source_matrix[list(s)]) and report["shared_tokens"] == len(pairs)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama3_source_with_a_gpt2_helper(family, shared, tmp_path, tied):
    """CLP from a Llama-3-shaped source: the byte-level vocabularies share the same tokens either way; GPT-2's
    <|endoftext|> (its bos, eos and unk) takes Llama-3's <|end_of_text|> row (eos first); the target's config ids
    are GPT-2's; transformers loads it with our logits."""
    source = family_source(tmp_path / "source", "llama", family("llama3")[0], 128384, tied)
    helper = gpt2_helper_dir(tmp_path / "helper", family("gpt2")[0])
    embed_in, embed_out, report = apply_clp(str(source), str(helper), str(tmp_path / "target"))
    pairs, llama = shared("llama3", "gpt2"), family("llama3")[1]
    state = safetensors_state(source)
    assert_copied(embed_in, state["model.embed_tokens.weight"], report, pairs)
    assert report["shared_tokens_exact"] == report["shared_tokens_bytes"] == len(pairs) > 40_000
    eos = llama.token_to_id("<|end_of_text|>")
    assert torch.equal(embed_in[50256], state["model.embed_tokens.weight"][eos])
    roles = {role: entry["init"] for role, entry in report["special_tokens"].items()}
    assert roles == {"eos_token": f"source eos_token '<|end_of_text|>' (id {eos})",
                     "bos_token": f"as eos_token: source eos_token '<|end_of_text|>' (id {eos})",
                     "unk_token": f"as eos_token: source eos_token '<|end_of_text|>' (id {eos})"}
    if tied:
        assert embed_out is None and report["output_embeddings"] == "tied"
    else:
        assert_copied(embed_out, state["lm_head.weight"], report, pairs)
        assert torch.equal(embed_out[50256], state["lm_head.weight"][eos])
    ref = assert_same_logits(tmp_path / "target", 50257)
    assert (ref.config.bos_token_id, ref.config.eos_token_id, ref.config.vocab_size) == (50256, 50256, 50304)


@pytest.fixture(scope="module")
def qwen_source(family, tmp_path_factory):
    """A tied Qwen2 source (as Qwen2.5-0.5B) with Qwen's tokenizer, and a tiny GPT-2 helper."""
    root = tmp_path_factory.mktemp("qwen")
    source = family_source(root / "source", "qwen2", family("qwen")[0], 151936, tied=True)
    return source, gpt2_helper_dir(root / "helper", family("gpt2")[0]), root


@pytest.mark.parametrize("method", ["clp", "clp+", "fvt", "mean", "random"])
def test_qwen_tied_source_every_method(family, shared, qwen_source, method):
    """Each method from a tied Qwen2 source: the one matrix; shared rows copied (<|endoftext|> shared by content);
    FVT's rows the mean of Qwen's pieces of each token's text; transformers loads the target with our logits."""
    source, helper, root = qwen_source
    options = {"clp": {}, "clp+": {"weighting": "sparsemax"}, "fvt": {"method": "fvt"}, "mean": {"method": "mean"},
               "random": {"random_init": True, "random_init_rows": "missing"}}[method]
    target = root / f"target-{method}"
    embed_in, embed_out, report = apply_clp(str(source), str(helper), str(target), **options)
    pairs, qwen, gpt2 = shared("qwen", "gpt2"), family("qwen")[1], family("gpt2")[1]
    E = safetensors_state(source)["model.embed_tokens.weight"]
    assert embed_out is None and embed_in.shape == (50304, 32) and torch.isfinite(embed_in).all()
    assert_copied(embed_in, E, report, pairs)
    assert pairs[50256] == qwen.token_to_id("<|endoftext|>")
    assert report["special_tokens"]["eos_token"]["init"].startswith("shared")
    if method == "fvt":
        new = sorted(set(range(50257)) - pairs.keys())
        for i in new[::500]:
            ids = qwen.encode(gpt2.decode([i]), add_special_tokens=False).ids
            if "\ufffd" not in gpt2.decode([i]):
                torch.testing.assert_close(embed_in[i], E[ids].mean(0), msg=gpt2.id_to_token(i))
    assert_same_logits(target, 50257)


def test_mistral_untied_source_to_llama3_and_qwen_targets(family, shared, tmp_path):
    """A SentencePiece source (Mistral, untied) with byte-level targets: FVT into Llama-3's tokenizer, whose
    <|begin_of_text|> and <|end_of_text|> take Mistral's <s> and </s> rows, and CLP with a tiny Qwen helper, whose
    <|im_end|> (eos) takes </s>'s row and whose <|im_start|> is new; both matrices; config ids follow the target."""
    source = family_source(tmp_path / "source", "mistral", family("mistral")[0], 32000, tied=False)
    state = safetensors_state(source)
    fvt_in, fvt_out, report = apply_clp(str(source), method="fvt", target_tokenizer=family("llama3")[0],
                                        target_model_path=str(tmp_path / "llama3"))
    pairs, mistral, llama = shared("mistral", "llama3"), family("mistral")[1], family("llama3")[1]
    assert report["tokenizer_conventions"] == {"source": "sentencepiece", "target": "byte_level"}
    assert report["shared_tokens_bytes"] == len(pairs) > 2.5 * report["shared_tokens_exact"]
    for matrix, key in ((fvt_in, "model.embed_tokens.weight"), (fvt_out, "lm_head.weight")):
        assert_copied(matrix, state[key], report, pairs)
        for role, sp_token in (("<|begin_of_text|>", "<s>"), ("<|end_of_text|>", "</s>")):
            assert torch.equal(matrix[llama.token_to_id(role)], state[key][mistral.token_to_id(sp_token)])
        ids = [mistral.token_to_id(t) for t in ("▁Unter", "nehmen")]  # ' Unternehmen', split as in a text
        torch.testing.assert_close(matrix[llama.token_to_id("ĠUnternehmen")], state[key][ids].mean(0))
    assert report["special_tokens"]["pad_token"]["init"] == "fvt (the source has no token for this role)"
    ref = assert_same_logits(tmp_path / "llama3", 128257)
    assert (ref.config.bos_token_id, ref.config.eos_token_id, ref.config.pad_token_id) == (128000, 128001, 128004)

    helper = family_source(tmp_path / "qwen-helper", "qwen2", family("qwen")[0], 151936, tied=True, seed=1,
                           offset=0.02)
    clp_in, clp_out, report = apply_clp(str(source), str(helper), str(tmp_path / "qwen"))
    pairs, qwen = shared("mistral", "qwen"), family("qwen")[1]
    for matrix, key in ((clp_in, "model.embed_tokens.weight"), (clp_out, "lm_head.weight")):
        assert_copied(matrix, state[key], report, pairs)
        assert torch.equal(matrix[qwen.token_to_id("<|im_end|>")], state[key][mistral.token_to_id("</s>")])
    assert qwen.token_to_id("<|im_start|>") not in pairs
    ref = assert_same_logits(tmp_path / "qwen", 151669)
    assert (ref.config.bos_token_id, ref.config.eos_token_id) == (None, qwen.token_to_id("<|im_end|>"))
