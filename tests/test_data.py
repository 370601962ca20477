"""data.py: sources and readers, the study's split rule, token files and meta.json, the error paths, and the block
reader train.py uses. Tiny tokenizers and corpora keep it fast; the hub path runs offline in a subprocess."""

import gzip
import http.server
import json
import os
import re
import threading
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from conftest import ELTEC, make_hub_cache, run_py

import data
from common import UserError, load_tokenizer, sha256_file, tokenizer_sha256

MiB = 2**20


def write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t, "id": len(t)}, ensure_ascii=False) + "\n")
    return str(path)


def corpus(n, size, seed=0):
    """n distinct documents of exactly `size` UTF-8 bytes each (German letters, 2-byte umlauts included)."""
    rng = np.random.default_rng(seed)
    words = ["über", "daß", "Straße", "und", "der", "Mädchen", "ging", "schön", "Haus", "\n"]
    docs = []
    for i in range(n):
        doc = f"Dokument {i}:"
        while len(doc.encode()) < size - 12:
            doc += " " + words[rng.integers(len(words))]
        docs.append(doc + "." * (size - len(doc.encode())))
        assert len(docs[-1].encode()) == size
    return docs


def decode_split(out, split, tok_dir):
    """The documents of <split>.bin: its ids cut at each end-of-text token, decoded."""
    from tokenizers import Tokenizer

    meta = json.load(open(os.path.join(out, "meta.json")))
    ids = np.fromfile(os.path.join(out, f"{split}.bin"), dtype=meta["dtype"])
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    eos = meta["eos_token_id"]
    assert len(ids) == 0 or ids[-1] == eos  # every document, the last included, ends with eos
    cuts = np.flatnonzero(ids == eos)
    pieces = np.split(ids, cuts + 1)[:-1]
    return [tok.decode(p[:-1].tolist(), skip_special_tokens=False) for p in pieces]


def prep(src, out, tok, **kw):
    kw.setdefault("progress", False)
    return data.prepare(src, str(out), str(tok), **kw)


# -----------------------------------------------------------------------------
# split rule, round trip, meta.json


def test_split_rule_and_round_trip(tmp_path, eltec_tokenizers):
    """The study's rule on documents of exactly 1 KiB: train takes documents while it holds < 10 KiB (exactly 10),
    validation the next while it holds < 1 KiB (exactly 1); documents are whole and in order; decoding the token
    files gives the documents back."""
    tok = eltec_tokenizers["deu"]
    docs = corpus(15, 1024)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    meta = prep(src, tmp_path / "out", tok, subsample_size_mb=10 / 1024, valid_percent=10)
    assert decode_split(tmp_path / "out", "train", tok) == docs[:10]
    assert decode_split(tmp_path / "out", "val", tok) == docs[10:11]
    s = meta["splits"]
    assert (s["train"]["documents"], s["train"]["bytes"]) == (10, 10 * 1024)
    assert (s["val"]["documents"], s["val"]["bytes"]) == (1, 1024)
    for split in ("train", "val"):
        n = os.path.getsize(tmp_path / "out" / f"{split}.bin") // 2
        assert s[split]["tokens"] == n


def test_split_keeps_the_crossing_document_whole(tmp_path, eltec_tokenizers):
    """A document that crosses the MiB line stays whole in train; validation starts with the next one and also
    keeps its crossing document (5 x 1000 B >= 4096 B; then 2 x 1000 B >= 409.6 B... 1 document)."""
    tok = eltec_tokenizers["deu"]
    docs = corpus(9, 1000)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    meta = prep(src, tmp_path / "out", tok, subsample_size_mb=4 / 1024, valid_percent=20)  # 4096 B, 819.2 B
    assert decode_split(tmp_path / "out", "train", tok) == docs[:5]
    assert decode_split(tmp_path / "out", "val", tok) == docs[5:6]
    assert meta["splits"]["train"]["bytes"] == 5000


def test_split_documents_unit():
    docs = ["a" * 3, "b" * 3, "c" * 3, "d" * 3, "e"]
    got = [(s, d) for s, d, _ in data.split_documents(docs, 6, 3)]
    assert got == [("train", "aaa"), ("train", "bbb"), ("val", "ccc")]
    assert [s for s, _, _ in data.split_documents(docs, 7, 1)] == ["train"] * 3 + ["val"]
    assert [d for _, d, _ in data.split_documents(docs)] == docs  # no budget: everything is train
    assert [n for _, _, n in data.split_documents(["ä"], 10, 1)] == [2]  # UTF-8 bytes, not characters


def test_meta_fields_and_train_reader(tmp_path, eltec_tokenizers):
    tok = eltec_tokenizers["eng"]
    src = write_jsonl(tmp_path / "c.jsonl", corpus(30, 400))
    meta = prep(src, tmp_path / "out", tok, subsample_size_mb=8000 / MiB, valid_percent=25)
    on_disk = data.load_meta(str(tmp_path / "out"))
    assert on_disk == meta
    for key in data.META_FIELDS + ("tokenizer", "splits", "sources", "created", "eos_token"):
        assert key in meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 1024 and meta["eos_token_id"] == 0
    assert meta["tokenizer_sha256"] == tokenizer_sha256(str(tok)) == sha256_file(str(tok / "tokenizer.json"))
    assert meta["sources"]["train"][0]["files"] == [src]
    assert set(meta["splits"]) == {"train", "val"} and meta["splits"]["train"]["documents"] == 20
    assert meta["created"].endswith("+00:00")
    blocks = data.Blocks(str(tmp_path / "out" / "train.bin"), meta["dtype"], 16, shuffle_seed=1)
    x, y = blocks.batch(0, 4)
    assert x.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "train.bin", "val.bin"]
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "out"]  # no temporary directory left behind


def wordlevel_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    return path


@pytest.mark.parametrize("vocab_size,dtype", [(65536, "uint16"), (65537, "uint32")])
def test_uint16_uint32_switch(tmp_path, vocab_size, dtype):
    """uint16 holds ids up to 65,535, so a vocabulary of 65,536 still fits and 65,537 does not; the largest id
    round-trips either way (a wrong switch would wrap it)."""
    tok = wordlevel_tokenizer(str(tmp_path / "tok"), vocab_size)
    top = vocab_size - 1
    src = write_jsonl(tmp_path / "c.jsonl", [f"w1 w{top} w2", f"w{top}", "w3"])
    meta = prep(src, tmp_path / "out", tok, subsample_size_mb=1 / MiB, valid_percent=50)
    assert meta["dtype"] == dtype == data.token_dtype(vocab_size)
    assert np.fromfile(tmp_path / "out" / "train.bin", dtype=dtype).tolist() == [1, top, 2, 0]
    assert np.fromfile(tmp_path / "out" / "val.bin", dtype=dtype).tolist() == [top, 0]
    assert os.path.getsize(tmp_path / "out" / "train.bin") == 4 * np.dtype(dtype).itemsize


def test_dtype_follows_the_largest_id_not_the_count(tmp_path):
    """A vocabulary may skip ids: three tokens with ids up to 70,000 need uint32."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 70000}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    os.makedirs(tmp_path / "tok")
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    src = write_jsonl(tmp_path / "c.jsonl", ["a b", "b"])
    meta = prep(src, tmp_path / "out", tmp_path / "tok", subsample_size_mb=1 / MiB, valid_percent=50)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70001
    assert np.fromfile(tmp_path / "out" / "train.bin", dtype="uint32").tolist() == [1, 70000, 0]


@pytest.mark.parametrize("name,eos", [("pythia", 0), ("mistral", 2)])
def test_long_txt_file_in_pieces_tokenizes_as_a_whole(tmp_path, monkeypatch, request, real_tokenizers, name, eos):
    """A .txt file far larger than a piece (here 4 KiB) is one document: its pieces, tokenized one after the other
    with a real tokenizer (Pythia's byte-level BPE; Mistral's SentencePiece, which puts a word-start marker and BOS
    before a text), give exactly the ids of the whole text, one end-of-text token, one document; train/val never
    split it, and iter_documents gives it back whole."""
    monkeypatch.setattr(data, "PIECE_BYTES", 4096)
    novel = list(data.iter_documents(os.path.join(ELTEC, "deu", "DEU062.xml.gz")))[0][:60_000]
    # white space of every kind around the line ends: indented lines, blank lines, tabs, CRLF, a trailing space
    text = novel.replace(". ", ".\n  ", 40).replace(", ", ",\n\n", 40).replace("; ", ";\t\n", 20)
    text = text.replace("! ", "!\r\n", 20) + " \n"
    (tmp_path / "novel.txt").write_text(text, encoding="utf-8")
    (tmp_path / "short.txt").write_text("Ein kurzes Dokument.", encoding="utf-8")
    if name == "pythia":
        tok_dir = tmp_path / "pythia"
        tok_dir.mkdir()
        (tok_dir / "tokenizer.json").write_bytes(open(real_tokenizers["pythia"], "rb").read())
    else:
        tok_dir = request.getfixturevalue("mistral_tokenizer")
    pieces = list(data.documents(data.open_sources(str(tmp_path / "novel.txt"))))
    assert len(pieces) > 10 and all(isinstance(p, data.Piece) for p in pieces[:-1])
    assert not isinstance(pieces[-1], data.Piece) and "".join(pieces) == text
    assert list(data.iter_documents(str(tmp_path / "novel.txt"))) == [text]
    meta = prep([str(tmp_path / "novel.txt"), str(tmp_path / "short.txt")], tmp_path / "out", tok_dir,
                subsample_size_mb=1 / MiB, valid_percent=1)  # train's budget ends inside the novel
    whole = load_tokenizer(str(tok_dir)).encode(text).ids
    assert np.fromfile(tmp_path / "out" / "train.bin", dtype="uint16").tolist() == whole + [eos]
    assert meta["splits"]["train"]["documents"] == 1 and meta["splits"]["val"]["documents"] == 1
    assert meta["splits"]["train"]["bytes"] == len(text.encode())


def test_literal_end_of_text_is_text(tmp_path, eltec_tokenizers):
    """A document that contains the string <|endoftext|> is not cut there: the eos id only separates documents."""
    tok = eltec_tokenizers["eng"]
    docs = ["before <|endoftext|> after", "second"]
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    prep(src, tmp_path / "out", tok, validation_sources=[src])
    ids = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    assert (ids == 0).sum() == 2
    assert decode_split(tmp_path / "out", "train", tok) == docs


def test_tokenizer_mismatch_check(tmp_path, eltec_tokenizers):
    src = write_jsonl(tmp_path / "c.jsonl", corpus(4, 300))
    meta = prep(src, tmp_path / "out", eltec_tokenizers["deu"], subsample_size_mb=600 / MiB)
    data.check_tokenizer(meta, str(eltec_tokenizers["deu"]), "de-model", "out")
    with pytest.raises(UserError, match="different tokenizer"):
        data.check_tokenizer(meta, str(eltec_tokenizers["eng"]), "en-model", "out")


# -----------------------------------------------------------------------------
# framing: BOS where the tokenizer adds one


GERMAN = ["Es war einmal ein König.",
          "Grüße aus Köln: „Straßenbahn“ fährt über die Brücke — 5 €, ß und Æ.",
          "  Daß   er kam,\n\nwar gut.  ", "Ein Dokument, das\nüber zwei Zeilen geht."]


@pytest.mark.parametrize("name,bos,eos", [("pythia", None, 0), ("gpt2", None, 50256), ("llama3", 128000, 128001),
                                          ("qwen", None, 151645)])
def test_real_tokenizers_frame_documents_as_they_frame_a_text(tmp_path, request, real_tokenizers, name, bos, eos):
    """Each document of the token files is what the tokenizer itself makes of the text (its default encoding, special
    tokens included: Llama-3.2 puts <|begin_of_text|> first; Pythia, GPT-2 and Qwen add nothing), then its eos id.
    For a tokenizer that adds nothing that is byte for byte what data.py always wrote: each document's ids and eos."""
    tok_path = real_tokenizers.get(name) or request.getfixturevalue(f"{name}_tokenizer")
    src = write_jsonl(tmp_path / "c.jsonl", GERMAN)
    meta = prep(src, tmp_path / "out", tok_path, validation_sources=[src])
    assert meta["framing"] == {"bos_token_id": bos, "eos_token_id": eos} and meta["eos_token_id"] == eos
    tok = load_tokenizer(tok_path)
    framed = [tok.encode(doc).ids + [eos] for doc in GERMAN]
    for split in ("train", "val"):
        assert (tmp_path / "out" / f"{split}.bin").read_bytes() == np.array(sum(framed, []), meta["dtype"]).tobytes()
    if bos is None:
        assert framed == [tok.encode(doc, add_special_tokens=False).ids + [eos] for doc in GERMAN]
    else:
        assert [ids[0] for ids in framed] == [bos] * len(GERMAN)
    assert data.load_meta(tmp_path / "out")["framing"] == meta["framing"]
    if os.path.isfile(os.path.join(tok_path, "tokenizer.json")):  # named as a file: the same end-of-text token
        by_file = prep(src, tmp_path / "by-file", os.path.join(tok_path, "tokenizer.json"), validation_sources=[src])
        assert by_file["framing"] == meta["framing"]


def test_bos_once_per_document_also_when_it_comes_in_pieces(tmp_path, monkeypatch, bos_tokenizer):
    """A tokenizer that adds BOS: each document starts with it and ends with eos, a long .txt file read in pieces
    included (one BOS, not one per piece), across encode_batch batches; the counts include both."""
    monkeypatch.setattr(data, "PIECE_BYTES", 4096)
    novel = list(data.iter_documents(os.path.join(ELTEC, "deu", "DEU062.xml.gz")))[0][:40_000]
    (tmp_path / "novel.txt").write_text(novel, encoding="utf-8")
    short = write_jsonl(tmp_path / "short.jsonl", GERMAN)
    assert len(list(data.documents(data.open_sources(str(tmp_path / "novel.txt"))))) > 5
    meta = prep([str(tmp_path / "novel.txt"), short], tmp_path / "out", bos_tokenizer, validation_sources=[short],
                batch_mb=8192 / MiB)
    assert meta["framing"] == {"bos_token_id": 1, "eos_token_id": 2}
    tok = load_tokenizer(str(bos_tokenizer))
    expected = [i for doc in [novel] + GERMAN for i in tok.encode(doc).ids + [2]]
    assert expected[0] == 1 and expected.count(1) == 1 + len(GERMAN)
    assert np.fromfile(tmp_path / "out" / "train.bin", dtype="uint16").tolist() == expected
    assert (meta["splits"]["train"]["documents"], meta["splits"]["train"]["tokens"]) == (1 + len(GERMAN), len(expected))


@pytest.mark.parametrize("template,error", [("<s> <s> $A", r"frames a text as \[2, 2\] \+ text \+ \[\]"),
                                            ("$A <sep>", r"frames a text as \[\] \+ text \+ \[3\]"),
                                            ("$A <|endoftext|>", None)])
def test_framing_data_py_does_not_write_is_refused(tmp_path, template, error):
    """More than one token before a text, or after it anything but the eos, is refused before any text is read and
    nothing is written; a tokenizer that appends its own eos frames documents as data.py does anyway (no BOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<|endoftext|>": 0, "a": 1, "<s>": 2, "<sep>": 3, "b": 4}
    specials = [(t, vocab[t]) for t in ("<|endoftext|>", "<s>", "<sep>")]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([t for t, _ in specials])
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    os.makedirs(tmp_path / "tok")
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    src = write_jsonl(tmp_path / "c.jsonl", ["a b", "b"])
    if error:
        with pytest.raises(UserError, match=f"tok: the tokenizer's post-processor {error}; data.py writes at most"):
            prep(src, tmp_path / "out", tmp_path / "tok", validation_sources=[src])
        assert not (tmp_path / "out").exists()
    else:
        meta = prep(src, tmp_path / "out", tmp_path / "tok", validation_sources=[src])
        assert meta["framing"] == {"bos_token_id": None, "eos_token_id": 0}
        assert np.fromfile(tmp_path / "out" / "train.bin", dtype="uint16").tolist() == [1, 4, 0, 4, 0]


def test_data_framed_otherwise_than_the_models_tokenizer_is_refused(tmp_path, bos_tokenizer, eltec_tokenizers):
    """Same tokenizer file, other framing: data from before data.py recorded framing (no BOS) for a model whose
    tokenizer adds BOS, and the reverse; one line naming both and the way out."""
    src = write_jsonl(tmp_path / "c.jsonl", corpus(4, 300))
    meta = prep(src, tmp_path / "bos", bos_tokenizer, validation_sources=[src])
    data.check_tokenizer(meta, str(bos_tokenizer), "llama-like", "bos")
    older = {k: v for k, v in meta.items() if k != "framing"}
    with pytest.raises(UserError, match=r"^bos frames each document as text \+ EOS, no BOS \(its meta.json has no "
                                        r"framing: an older data.py\), but the tokenizer of the model llama-like "
                                        r"frames a text as BOS \(id 1\) \+ text \+ EOS; prepare the data again with "
                                        r"data.py and the model's tokenizer$"):
        data.check_tokenizer(older, str(bos_tokenizer), "llama-like", "bos")
    meta = prep(src, tmp_path / "plain", eltec_tokenizers["deu"], validation_sources=[src])
    data.check_tokenizer({k: v for k, v in meta.items() if k != "framing"}, str(eltec_tokenizers["deu"]), "neox", "x")
    claims_bos = {**meta, "framing": {"bos_token_id": 5, "eos_token_id": 0}}
    with pytest.raises(UserError, match=r"^plain frames each document as BOS \(id 5\) \+ text \+ EOS, but the "
                                        r"tokenizer of the model neox frames a text as text \+ EOS, no BOS; prepare"):
        data.check_tokenizer(claims_bos, str(eltec_tokenizers["deu"]), "neox", "plain")


def test_meta_framing_is_checked(tmp_path, eltec_tokenizers):
    src = write_jsonl(tmp_path / "c.jsonl", corpus(4, 300))
    meta = prep(src, tmp_path / "out", eltec_tokenizers["deu"], validation_sources=[src])
    for framing in ({"bos_token_id": "1", "eos_token_id": 0}, {"bos_token_id": 5000, "eos_token_id": 0},
                    {"bos_token_id": None, "eos_token_id": 7}, {"bos_token_id": None}, [None, 0]):
        (tmp_path / "out" / "meta.json").write_text(json.dumps({**meta, "framing": framing}))
        with pytest.raises(UserError, match=re.escape(f"meta.json: framing is {framing!r}, expected ")):
            data.load_meta(tmp_path / "out")


def test_train_tokenizer_on_train_split_only(tmp_path):
    """--train_tokenizer: a BPE trained on the train split (a word frequent only in validation gets no merge),
    saved as an HF tokenizer directory, whose sha256 meta.json records."""
    train = [("zyxw " * 200 + f"doc {i}") for i in range(6)]
    val = [("qvjk " * 200 + f"doc {i}") for i in range(6)]
    src = write_jsonl(tmp_path / "c.jsonl", train + val)
    n = sum(len(d.encode()) for d in train)
    meta = data.prepare(src, str(tmp_path / "out"), train_tokenizer=True, vocab_size=300,
                        subsample_size_mb=(n - 10) / MiB, valid_percent=50, progress=False)
    out = tmp_path / "out"
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(out))
    assert meta["tokenizer_sha256"] == sha256_file(str(out / "tokenizer.json"))
    vocab = json.load(open(out / "tokenizer.json"))["model"]["vocab"]
    assert any("zyx" in t for t in vocab) and not any("qv" in t for t in vocab)
    assert decode_split(out, "train", out) == train and decode_split(out, "val", out)[:3] == val[:3]


# -----------------------------------------------------------------------------
# readers


def test_tei_reader_on_eltec():
    """Paragraphs intact (each childless <p> of <body> is one line), no notes (in <back>), no headings."""
    TEI = "{http://www.tei-c.org/ns/1.0}"
    for path in (os.path.join(ELTEC, "eng", "ENG18661_Oliphant.xml.gz"), os.path.join(ELTEC, "deu", "DEU062.xml.gz")):
        doc = data.read_tei(path)
        lines = doc.split("\n")
        root = ET.parse(gzip.open(path)).getroot()
        body = root.find(f"{TEI}text/{TEI}body")
        paragraphs = [" ".join(p.text.split()) for p in body.iter(f"{TEI}p") if len(p) == 0 and p.text]
        assert len(paragraphs) > 100 and set(paragraphs) <= set(lines)
        heads = {" ".join("".join(h.itertext()).split()) for h in body.iter(f"{TEI}head")}
        assert len(heads) >= 4 and not heads & set(lines)
        for note in root.iter(f"{TEI}note"):
            assert " ".join("".join(note.itertext()).split())[:60] not in doc
    assert "It may be mentioned here that this was an engagement" not in data.read_tei(
        os.path.join(ELTEC, "eng", "ENG18661_Oliphant.xml.gz"))
    assert "Erstes Buch" not in data.read_tei(os.path.join(ELTEC, "deu", "DEU062.xml.gz")).split("\n")


def test_tei_reader_rules(tmp_path):
    """Inline apparatus inside a paragraph is dropped (the paragraph kept), verse lines are lines, text outside
    <text><body> (header, <front>, <back>) is not read, white space is normalised."""
    (tmp_path / "n.xml").write_text("""<TEI xmlns="http://www.tei-c.org/ns/1.0"><teiHeader><p>header</p></teiHeader>
<text><front><p>front matter</p></front><body><div><head>Kapitel <hi>I</hi></head>
<fw>Kopfzeile 12</fw><p>Er  sagte<note>eine Fußnote</note> leise,
   <hi>ganz</hi> leise.</p><lg><l>Erste Zeile,</l><l>zweite <fw>17</fw>Zeile.</l></lg>
<trailer>Ende</trailer></div></body><back><p>Anhang</p></back></text></TEI>""", encoding="utf-8")
    assert data.read_tei(str(tmp_path / "n.xml")) == "Er sagte leise, ganz leise.\nErste Zeile,\nzweite Zeile."


def test_file_types_and_document_rules(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("one file\n\nis one document\n", encoding="utf-8")
    with gzip.open(tmp_path / "d" / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    (tmp_path / "d" / "c.json").write_text(json.dumps({"body": "x", "text": "   "}) + "\n")  # blank: skipped
    (tmp_path / "d" / "README.md").write_text("not read")
    (tmp_path / "d" / "sub").mkdir()
    with gzip.open(tmp_path / "d" / "sub" / "e.txt.gz", "wt", encoding="utf-8") as f:
        f.write("gz text")
    assert list(data.iter_documents(str(tmp_path / "d"))) == ["first", "second", "one file\n\nis one document\n",
                                                              "gz text"]
    lines = tmp_path / "lines.txt"
    lines.write_text("doc one\ndoc two\r\n\nblock two\n", encoding="utf-8")
    assert list(data.iter_documents(str(lines), txt_documents="line")) == ["doc one", "doc two", "block two"]
    assert list(data.iter_documents(str(lines), txt_documents="blank_line")) == ["doc one\ndoc two",
                                                                                 "block two"]
    both = [str(lines), str(tmp_path / "d" / "*.txt")]  # a list of sources: in the order given; a glob
    assert list(data.iter_documents(both)) == [lines.read_bytes().decode(), "one file\n\nis one document\n"]
    assert list(data.iter_documents(os.path.join(ELTEC, "deu", "DEU062.xml.gz")))[0].startswith("Der Großbauer")


def test_parquet_needs_pyarrow_or_reads(tmp_path, monkeypatch):
    path = tmp_path / "c.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": ["a", "b", None, "c"], "n": [1, 2, 3, 4]}), path)
        assert list(data.iter_documents(str(path))) == ["a", "b", "c"]
        with pytest.raises(UserError, match="no column 'body'"):
            list(data.iter_documents(str(path), text_field="body"))
        with pytest.raises(UserError, match="column 'n' holds int values, expected text"):
            list(data.iter_documents(str(path), text_field="n"))
    except ImportError:
        path.write_bytes(b"PAR1")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match=r"c\.parquet.*needs pyarrow.*pip install pyarrow"):
        data.iter_documents(str(path))  # listed, not yet read: the error comes before any download


def test_undecodable_bytes_become_replacement_characters(tmp_path, eltec_tokenizers, capfd):
    """Bytes that are not UTF-8 are replaced by U+FFFD (the rest of the document kept), counted in meta.json and
    reported once per file; a lone surrogate escape in JSON is treated the same way."""
    tok = eltec_tokenizers["deu"]
    (tmp_path / "bad.txt").write_bytes(b"gut \xff\xfe schlecht")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "sur \\ud800 rogate"}\n')
    meta = prep([str(tmp_path / "bad.txt"), str(tmp_path / "bad.jsonl")], tmp_path / "out", tok,
                validation_sources=[str(tmp_path / "bad.txt")])
    assert decode_split(tmp_path / "out", "train", tok) == ["gut \ufffd\ufffd schlecht", "ok", "sur \ufffd\ufffd\ufffd rogate"]
    assert meta["undecodable_documents"] == 3  # two in train, one in val
    err = capfd.readouterr().err
    assert "bad.txt: byte 4 is not UTF-8" in err and "bad.jsonl:2: a lone UTF-16 surrogate" in err


# -----------------------------------------------------------------------------
# bad input: clear errors, no half-written output


def assert_nothing_written(tmp_path, out="out"):
    assert not os.path.exists(tmp_path / out)
    assert not [n for n in os.listdir(tmp_path) if n.startswith((".tmp-", ".old-"))]


def test_empty_corpus(tmp_path, eltec_tokenizers):
    (tmp_path / "empty.jsonl").write_text("\n" + json.dumps({"text": " \n "}) + "\n")
    with pytest.raises(UserError, match="empty.jsonl: no documents"):
        prep(str(tmp_path / "empty.jsonl"), tmp_path / "out", eltec_tokenizers["deu"], subsample_size_mb=1)
    assert_nothing_written(tmp_path)
    with pytest.raises(UserError, match="no readable files"):
        os.mkdir(tmp_path / "nothing")
        prep(str(tmp_path / "nothing"), tmp_path / "out", eltec_tokenizers["deu"], subsample_size_mb=1)


def test_missing_text_field_midway(tmp_path, eltec_tokenizers):
    """The bad line comes after enough text for a few batches: still no output and no temporary files."""
    lines = [json.dumps({"text": d}) for d in corpus(300, 1000)] + [json.dumps({"content": "x", "id": 1})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"c\.jsonl:301: no field 'text' \(fields: 'content', 'id'\).*--text_field"):
        prep(str(tmp_path / "c.jsonl"), tmp_path / "out", eltec_tokenizers["deu"], subsample_size_mb=1,
             batch_mb=0.05)
    assert_nothing_written(tmp_path)
    (tmp_path / "arr.json").write_text('[{"text": "a"}]\n')
    with pytest.raises(UserError, match=r"arr\.json:1: a JSON list, expected one JSON object per line"):
        list(data.iter_documents(str(tmp_path / "arr.json")))


def test_source_shorter_than_the_split_rule(tmp_path, eltec_tokenizers):
    src = write_jsonl(tmp_path / "c.jsonl", corpus(10, 1000))
    with pytest.raises(UserError, match=r"10 documents, 0\.01 MiB; the split rule needs 1 MiB.*lower --subsample_size_mb"):
        prep(src, tmp_path / "out", eltec_tokenizers["deu"], subsample_size_mb=1)
    with pytest.raises(UserError, match="MiB more for validation"):  # train is satisfied (9 docs), validation not
        prep(src, tmp_path / "out", eltec_tokenizers["deu"], subsample_size_mb=9000 / MiB, valid_percent=20)
    assert_nothing_written(tmp_path)


def test_split_rule_that_would_split_a_document(tmp_path, eltec_tokenizers):
    """Enough text, but the split would have to cut a document: the error says so and names the ways out (no
    "lower --subsample_size_mb" for a single document: no value can work), and the ways out work."""
    novel = tmp_path / "novel.txt"
    novel.write_text(list(data.iter_documents(os.path.join(ELTEC, "deu", "DEU062.xml.gz")))[0], encoding="utf-8")
    mib = novel.stat().st_size / MiB
    cmd = ["data.py", "--dataset_name", str(novel), "--tokenizer", str(eltec_tokenizers["deu"]),
           "--output_dir", str(tmp_path / "out"), "--subsample_size_mb", f"{mib * 0.6:.4f}"]
    r = run_py(cmd)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: {novel}: 1 document, {mib:.2f} MiB, and a document is never split")
    assert "--txt_documents line|blank_line" in r.stderr and "lower --subsample_size_mb" not in r.stderr
    r = run_py([*cmd, "--txt_documents", "line"])  # each paragraph a document: the same text splits
    assert r.returncode == 0, r.stderr
    meta = data.load_meta(tmp_path / "out")
    assert meta["splits"]["train"]["documents"] > 100 and meta["splits"]["val"]["documents"] > 10

    # several documents, and the one that crosses the train line takes what validation needs
    src = write_jsonl(tmp_path / "c.jsonl", ["kurz " * 20, "lang " * 1000])
    with pytest.raises(UserError, match=r"2 documents, .*documents are never split, and the one that crosses the "
                                        r"0\.00019\d* MiB train line leaves 0 of .*lower --subsample_size_mb so that train "
                                        r"ends at an earlier document, or split the text into more documents"):
        prep(src, tmp_path / "out2", eltec_tokenizers["deu"], subsample_size_mb=200 / MiB, valid_percent=20)
    assert prep(src, tmp_path / "out2", eltec_tokenizers["deu"], subsample_size_mb=50 / MiB,
                valid_percent=20)["splits"]["val"]["documents"] == 1


def test_missing_tokenizer_and_bad_arguments(tmp_path, eltec_tokenizers):
    src = write_jsonl(tmp_path / "c.jsonl", corpus(3, 100))
    for tok, msg in ((tmp_path / "nope" / "tokenizer.json", "tokenizer file not found"),
                     (tmp_path, "no tokenizer found")):
        with pytest.raises(UserError, match=msg):
            prep(src, tmp_path / "out", tok, subsample_size_mb=1)
    with pytest.raises(UserError, match="--subsample_size_mb is needed"):
        prep(src, tmp_path / "out", eltec_tokenizers["deu"])
    with pytest.raises(UserError, match="either --tokenizer"):
        data.prepare(src, str(tmp_path / "out"), subsample_size_mb=1)
    with pytest.raises(UserError, match="no such file or directory"):
        prep(str(tmp_path / "missing.jsonl"), tmp_path / "out", eltec_tokenizers["deu"], subsample_size_mb=1)
    (tmp_path / "c.csv").write_text("a")
    with pytest.raises(UserError, match="unsupported file type"):
        prep(str(tmp_path / "c.csv"), tmp_path / "out", eltec_tokenizers["deu"], subsample_size_mb=1)
    assert_nothing_written(tmp_path)


def test_existing_output_dir_and_override(tmp_path, eltec_tokenizers):
    tok = eltec_tokenizers["deu"]
    old, new = write_jsonl(tmp_path / "old.jsonl", ["alt"]), write_jsonl(tmp_path / "new.jsonl", ["neu"])
    (tmp_path / "out").mkdir()  # an empty directory is fine
    prep(old, tmp_path / "out", tok, validation_sources=[old])
    with pytest.raises(UserError, match="exists and is not empty; pass --override"):
        prep(new, tmp_path / "out", tok, validation_sources=[new])
    assert decode_split(tmp_path / "out", "train", tok) == ["alt"]
    with pytest.raises(UserError, match="no documents"):  # a failed --override run leaves the old output alone
        prep(write_jsonl(tmp_path / "e.jsonl", [" "]), tmp_path / "out", tok, validation_sources=[new],
             override=True)
    assert decode_split(tmp_path / "out", "train", tok) == ["alt"]
    prep(new, tmp_path / "out", tok, validation_sources=[new], override=True)
    assert decode_split(tmp_path / "out", "train", tok) == ["neu"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith((".tmp-", ".old-"))]


def test_cli_one_line_error_and_success(tmp_path, eltec_tokenizers):
    src = write_jsonl(tmp_path / "c.jsonl", corpus(12, 500))
    r = run_py(["data.py", "--dataset_name", src, "--tokenizer", str(tmp_path / "none.json"),
                "--output_dir", str(tmp_path / "out"), "--subsample_size_mb", "0.004"])
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: {tmp_path / 'none.json'}: tokenizer file not found"]
    r = run_py(["data.py", "--dataset_name", src, "--tokenizer", str(eltec_tokenizers["deu"]),
                "--output_dir", str(tmp_path / "out"), "--subsample_size_mb", "0.004", "--valid_percent", "25"])
    assert r.returncode == 0, r.stderr
    assert "train 9 documents" in r.stdout and "val 3 documents" in r.stdout
    assert data.load_meta(str(tmp_path / "out"))["split_rule"]["valid_percent"] == 25


# -----------------------------------------------------------------------------
# hub (offline, hub-layout cache) and URL (loopback server)


def test_hub_dataset_offline(tmp_path, eltec_tokenizers):
    files = tmp_path / "files"
    (files / "de" / "train").mkdir(parents=True)
    docs = corpus(8, 600)
    write_jsonl(files / "de" / "train" / "0000.jsonl", docs[:4])
    write_jsonl(files / "de" / "train" / "0001.jsonl", docs[4:])
    write_jsonl(files / "other.jsonl", ["not this one"])
    (files / "de" / "validation").mkdir()
    write_jsonl(files / "de" / "validation" / "0000.jsonl", ["nor the validation split"])
    write_jsonl(files / "de" / "test-00000-of-00001.jsonl", ["nor the test split"])
    (files / "README.md").write_text("card")
    commit = "0123456789abcdef0123456789abcdef01234567"
    make_hub_cache(str(tmp_path / "hub"), "org/oscar-de", str(files), commit=commit)
    os.rename(tmp_path / "hub" / "models--org--oscar-de", tmp_path / "hub" / "datasets--org--oscar-de")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")}
    tok = eltec_tokenizers["deu"]
    # a glob names exactly its files; ORG/NAME --dataset_config_name takes the config's train split (as
    # load_dataset(name, config, split="train") does)
    for i, source in enumerate([["hf://datasets/org/oscar-de/de/train/*.jsonl"],
                                ["org/oscar-de", "--dataset_config_name", "de"]]):
        out = tmp_path / f"out{i}"
        r = run_py(["data.py", "--dataset_name", *source, "--tokenizer", str(tok), "--output_dir", str(out),
                    "--subsample_size_mb", str(3000 / MiB), "--valid_percent", "40"], env=env)
        assert r.returncode == 0, r.stderr
        assert decode_split(out, "train", tok) == docs[:5] and decode_split(out, "val", tok) == docs[5:7]
        desc = json.load(open(out / "meta.json"))["sources"]["train"][0]
        assert desc["commit"] == commit and desc["hub_dataset"] == "org/oscar-de"
        assert desc["files"] == ["de/train/0000.jsonl", "de/train/0001.jsonl"]
    r = run_py(["data.py", "--dataset_name", "org/not-cached", "--tokenizer", str(tok), "--output_dir",
                str(tmp_path / "out9"), "--subsample_size_mb", "1"], env=env)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "org/not-cached (hub dataset, revision main): the hub is unavailable" in r.stderr
    assert not os.path.exists(tmp_path / "out9")


@pytest.fixture
def http_dir(tmp_path):
    """A loopback HTTP server for a fresh directory: yields (directory, base URL, stop function)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()

    yield root, f"http://127.0.0.1:{server.server_address[1]}", stop
    stop()


def test_url_source_with_cache_and_sha256(tmp_path, http_dir, eltec_tokenizers, monkeypatch):
    root, base, stop = http_dir
    monkeypatch.setenv("DATA_URL_CACHE", str(tmp_path / "cache"))
    tok = eltec_tokenizers["deu"]
    docs = corpus(6, 300)
    write_jsonl(root / "c.jsonl", docs)
    sha = sha256_file(str(root / "c.jsonl"))
    with pytest.raises(UserError, match=f"sha256 {sha} does not match the expected {'0' * 64}"):
        prep(f"{base}/c.jsonl#sha256={'0' * 64}", tmp_path / "out", tok, subsample_size_mb=600 / MiB)
    assert_nothing_written(tmp_path)
    assert not [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs]  # the mismatching file is not kept
    meta = prep(f"{base}/c.jsonl#sha256={sha}", tmp_path / "out", tok, subsample_size_mb=600 / MiB)
    assert decode_split(tmp_path / "out", "train", tok) == docs[:2]
    assert meta["sources"]["train"][0]["sha256"] == sha
    stop()  # from now on only the cache can answer
    assert list(data.iter_documents(f"{base}/c.jsonl")) == docs
    with pytest.raises(UserError, match="download failed"):
        list(data.iter_documents(f"{base}/other.jsonl"))
    with pytest.raises(UserError, match="#sha256=<64 hex digits>"):
        data.iter_documents(f"{base}/c.jsonl#md5=abc")


def test_truncated_download_is_an_error_and_not_cached(tmp_path, monkeypatch):
    """A server that promises 100,000 bytes and closes after 16: an error, and nothing in the cache."""

    class Short(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b'{"text": "cut"}\n')

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Short)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("DATA_URL_CACHE", str(tmp_path / "cache"))
    try:
        with pytest.raises(UserError, match="c.jsonl: download (incomplete|failed)"):
            list(data.iter_documents(f"http://127.0.0.1:{server.server_address[1]}/c.jsonl"))
    finally:
        server.shutdown()
        server.server_close()
    assert not [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs]


def test_missing_relative_file_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="corpus/missing.jsonl: no such file"):
        data.iter_documents("corpus/missing.jsonl")


# -----------------------------------------------------------------------------
# the block reader train.py uses


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(10 * 8 + 1, dtype=np.uint16).tofile(path)  # 10 blocks of 8 tokens (+1 for the last target)
    return str(path)


def visit(blocks, start, stop, batch_size):
    return np.concatenate([blocks.block_ids(pos, batch_size) for pos in range(start, stop, batch_size)])


def test_blocks_every_block_once_per_epoch_seeded(token_file):
    b = data.Blocks(token_file, "uint16", 8, shuffle_seed=7)
    assert b.n_blocks == 10
    epoch0, epoch1 = visit(b, 0, 10, 2), visit(b, 10, 20, 2)
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))  # without replacement
    assert list(epoch0) != list(range(10)) and list(epoch0) != list(epoch1)  # shuffled, afresh per epoch
    same = data.Blocks(token_file, "uint16", 8, shuffle_seed=7)
    assert list(visit(same, 0, 20, 2)) == list(np.concatenate([epoch0, epoch1]))
    other = data.Blocks(token_file, "uint16", 8, shuffle_seed=8)
    assert list(visit(other, 0, 10, 2)) != list(epoch0)
    assert list(visit(data.Blocks(token_file, "uint16", 8), 0, 10, 5)) == list(range(10))  # no seed: file order
    x, y = b.batch(0, 2)
    for row, i in zip(x.tolist(), b.block_ids(0, 2)):
        assert row == list(range(8 * i, 8 * i + 8))  # block k starts at token k * block_size
    assert (y == x + 1).all()


def test_blocks_ranks_disjoint_and_resumable(token_file):
    world, bs = 2, 2
    ranks = [data.Blocks(token_file, "uint16", 8, shuffle_seed=3, rank=r, world_size=world) for r in range(world)]
    seen = []
    for pos in range(0, 10 - 10 % (bs * world), bs * world):
        per_rank = [r.block_ids(pos, bs).tolist() for r in ranks]
        assert not set(per_rank[0]) & set(per_rank[1])
        seen += per_rank[0] + per_rank[1]
    assert len(seen) == len(set(seen)) == 8
    single = data.Blocks(token_file, "uint16", 8, shuffle_seed=3)
    assert seen == [int(i) for i in visit(single, 0, 8, 2)]  # the ranks split the single-process order
    run = [ranks[1].batch(pos, bs) for pos in range(0, 24, bs * world)]
    resumed = data.Blocks(token_file, "uint16", 8, shuffle_seed=3, rank=1, world_size=world)
    for k, pos in enumerate(range(0, 24, bs * world)):
        if pos >= 12:  # a fresh reader started from the saved position gives the same batches
            x, y = resumed.batch(pos, bs)
            assert (x == run[k][0]).all() and (y == run[k][1]).all()
    with pytest.raises(UserError, match="need at least 11"):
        data.Blocks(token_file, "uint16", 8, world_size=11)
