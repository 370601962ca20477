"""
Any corpus to token files: documents from local files, hub datasets or URLs -> train.bin / val.bin + meta.json.

    python data.py --dataset_name SOURCE --tokenizer TOKENIZER --output_dir data/oscar_de \
        --subsample_size_mb 4096 --valid_percent 10
    python data.py --dataset_name SOURCE --output_dir DIR --train_tokenizer --vocab_size 8192 --subsample_size_mb 8

A SOURCE is a local file, a directory (its readable files, recursively, sorted by path) or a glob; a hub dataset,
hf://datasets/ORG/NAME[@REVISION]/GLOB (exactly the files the glob names) or ORG/NAME (with --dataset_config_name
CONFIG: the files below CONFIG/; of a dataset whose files name their splits, the train split's only, as
load_dataset(..., split="train") reads it);
or an http(s) URL, downloaded once into $DATA_URL_CACHE (default ~/.cache/clp-transfer/urls; append #sha256=HEX
to have it checked). Hub files go through huggingface_hub and its cache, one file at a time. Several sources are read
one after the other. What a document is depends on the file:
    .txt .txt.gz                the whole file (--txt_documents line: each line; blank_line: blocks between empty
                                lines, the layout of the original OSCAR .txt dumps); a file above 64 KiB is read and
                                tokenized in pieces, so a multi-GB dump needs no more memory than a small one
    .jsonl .json (.gz)          one JSON object per line, its --text_field
    .parquet                    one row, its --text_field column (needs pyarrow, an optional dependency)
    .xml .xml.gz                one TEI novel (ELTeC), see read_tei
Bytes that are not UTF-8 are replaced by U+FFFD, counted in meta.json and reported once per file; documents that
are empty or only white space are skipped.

The split is the study's (prepare_oscar.py, with its valid_percent bug fixed): documents in source order; the first
ones go to train until train holds at least --subsample_size_mb MiB (2**20 bytes of UTF-8 text; the document that
crosses the line is kept whole), the following ones to validation until it holds at least --valid_percent % of that.
Each document is tokenized (a literal "<|endoftext|>" in it stays text) and framed as the tokenizer frames a text:
the BOS token first when its post-processor adds one (Llama 2/3, Mistral; GPT-NeoX, GPT-2 and Qwen add none), and
the end-of-text token after it, so the eos id marks document ends and nothing else; train.bin and val.bin hold the
flat token ids (uint16 when every id fits, else uint32) and meta.json says how they were made (its "framing": the
bos and eos ids). The output directory is built
under a temporary name and appears only when complete.
"""

import argparse
import fnmatch
import glob
import gzip
import hashlib
import http.client
import itertools
import json
import os
import queue
import re
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from common import (UserError, atomic_dir, atomic_path, in_context, load_tokenizer, read_json, read_special_tokens,
                    resolve_model_dir, run_cli, save_tokenizer, sha256_file, tokenizer_sha256, write_errors,
                    write_json)

# -----------------------------------------------------------------------------
# readers: each yields documents (strings) in source order

TEI_APPARATUS = {"note", "fw", "head", "trailer"}  # notes, running heads, headings: not prose


def read_tei(path):
    """One TEI novel (ELTeC) as one document: the paragraphs and verse lines of <text><body>, one per line,
    whitespace normalised, without notes, running heads, headings and trailers."""
    try:
        with (gzip.open if path.lower().endswith(".gz") else open)(path, "rb") as f:
            root = ET.parse(f).getroot()
    except (ET.ParseError, gzip.BadGzipFile, EOFError) as e:  # a .gz file: truncated or not gzip
        raise UserError(f"{path}: not well-formed XML ({e})") from None

    def local(tag):
        return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""

    def text_of(el):
        parts = [el.text or ""]
        for child in el:
            if local(child.tag) not in TEI_APPARATUS:
                parts.append(text_of(child))
            parts.append(child.tail or "")
        return "".join(parts)

    lines = []

    def walk(el):
        for child in el:
            tag = local(child.tag)
            if tag in TEI_APPARATUS:
                continue
            if tag in ("p", "l"):
                if line := " ".join(text_of(child).split()):
                    lines.append(line)
            else:
                walk(child)

    for body in root.iter():
        if local(body.tag) == "body":
            walk(body)
    return "\n".join(lines)



MiB = 2**20
PIECE_BYTES = 64 * 1024  # a long .txt document is read and tokenized in pieces of about this size


class Piece(str):
    """Part of a long .txt document that goes on in the next item: tokenized like any document, but the BOS token
    comes only before the document's first part and the end-of-text token only after its last part (a plain str)."""


SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".xml", ".xml.gz")
TXT_DOCUMENTS = ("file", "line", "blank_line")


def file_type(path, suffixes=SUFFIXES):
    """The entry of `suffixes` (the document formats by default) a file name ends with (case-insensitive), or None."""
    name = path.lower()
    return next((s for s in suffixes if name.endswith(s)), None)


def _decode(raw, stats, path, line=None):
    """UTF-8 text of one document's bytes; undecodable bytes become U+FFFD, counted in stats, reported once a file."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _undecodable(raw.decode("utf-8", "replace"), stats, path, line, f"byte {e.start} is not UTF-8")


def _undecodable(text, stats, path, line, why):
    stats["undecodable_documents"] = stats.get("undecodable_documents", 0) + 1
    files = stats.setdefault("undecodable_files", [])
    if path not in files:
        files.append(path)
        print(f"warning: {path}{'' if line is None else f':{line}'}: {why}; replaced by U+FFFD (reported once "
              "per file; meta.json counts undecodable_documents)", file=sys.stderr)
    return text


def _field(obj, text_field, where):
    if not isinstance(obj, dict):
        raise UserError(f"{where}: a JSON {type(obj).__name__}, expected one JSON object per line (JSON lines)")
    if text_field not in obj:
        raise UserError(f"{where}: no field {text_field!r} (fields: {', '.join(map(repr, obj)) or 'none'}); "
                        "choose one with --text_field")
    text = obj[text_field]
    if not isinstance(text, str):
        raise UserError(f"{where}: field {text_field!r} is a JSON {type(text).__name__}, expected a string")
    return text


def import_pyarrow(path):
    """pyarrow.parquet, the optional dependency parquet files need (for documents here and task records in eval.py)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet files needs pyarrow, an optional dependency "
                        "(pip install pyarrow)") from None
    return pq


def _read_parquet(path, text_field, stats):
    pq = import_pyarrow(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError types on damaged files
        raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                        "choose one with --text_field")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, bytes):
                text = _decode(text, stats, path)
            if isinstance(text, str):
                yield text
            elif text is not None:
                raise UserError(f"{path}: column {text_field!r} holds {type(text).__name__} values, expected text "
                                "(strings); choose another with --text_field")


def read_file(path, text_field="text", txt_documents="file", stats=None):
    """The documents of one local file, by its type (see the top of this file), in file order. `stats` (a dict)
    collects undecodable_documents and undecodable_files."""
    stats = {} if stats is None else stats
    kind = file_type(path)
    if kind is None:
        raise UserError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
    kind = kind.removesuffix(".gz")  # _read_text and read_tei open .gz files with gzip
    if txt_documents not in TXT_DOCUMENTS:
        raise UserError(f"txt_documents={txt_documents!r}, expected one of {', '.join(TXT_DOCUMENTS)}")
    if kind == ".xml":
        docs = iter([read_tei(path)])
    elif kind == ".parquet":
        docs = _read_parquet(path, text_field, stats)
    else:
        docs = _read_text(path, kind, text_field, txt_documents, stats)
    for doc in docs:
        if isinstance(doc, Piece) or doc and not doc.isspace():
            yield doc


def _read_text(path, kind, text_field, txt_documents, stats):
    try:
        with (gzip.open if path.lower().endswith(".gz") else open)(path, "rb") as f:
            if kind == ".txt" and txt_documents == "file":
                yield from _txt_pieces(f, stats, path)
            elif kind == ".txt" and txt_documents == "line":
                for n, raw in enumerate(f, 1):
                    yield _decode(raw, stats, path, n).rstrip("\r\n")
            elif kind == ".txt":
                block = []
                for n, raw in enumerate(f, 1):
                    if raw and not raw.isspace():
                        block.append(raw)
                    elif block:
                        yield _decode(b"".join(block), stats, path, n - len(block)).rstrip("\r\n")
                        block = []
                if block:
                    yield _decode(b"".join(block), stats, path, n - len(block) + 1).rstrip("\r\n")
            else:
                for n, raw in enumerate(f, 1):
                    if not raw or raw.isspace():
                        continue
                    where = f"{path}:{n}"
                    try:
                        obj = json.loads(_decode(raw, stats, path, n))
                    except json.JSONDecodeError as e:
                        raise UserError(f"{where}: not valid JSON ({e.msg}); expected one JSON object per line "
                                        "(JSON lines)") from None
                    text = _field(obj, text_field, where)
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800" in the JSON
                        text = _undecodable(text.encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
                                            stats, path, n, "a lone UTF-16 surrogate")
                    yield text
    except (OSError, EOFError) as e:  # unreadable, truncated or not gzip
        raise UserError(f"{path}: cannot read ({e})") from None


WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")


def _txt_pieces(f, stats, path):
    """A whole .txt file as one document, in pieces of about PIECE_BYTES: Piece, Piece, ..., str. Each cut follows a
    newline that a non-space character follows, where a byte-level BPE's pre-tokenizer (GPT-2, GPT-NeoX) splits
    anyway: the pieces tokenized one after the other (a later one as inside a text: encode_items) give the whole
    document's ids (a test checks it, for a byte-level BPE and for SentencePiece)."""
    pending, rest = None, b""
    while block := f.read(PIECE_BYTES):
        buf = rest + block
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        while cut >= 0 and buf[cut + 1] in WHITESPACE:
            cut = buf.rfind(b"\n", 0, cut)
        if cut < 0:  # no cut yet (a line longer than a piece): read on
            rest = buf
            continue
        if pending is not None:
            yield Piece(pending)
        pending, rest = _decode(buf[:cut + 1], stats, path), buf[cut + 1:]
    if rest or pending is None:
        if pending is not None:
            yield Piece(pending)
        pending = _decode(rest, stats, path)
    yield pending


def whole_documents(docs):
    """Documents with their pieces (see Piece) joined again."""
    parts = []
    for doc in docs:
        if isinstance(doc, Piece):
            parts.append(doc)
        else:
            yield "".join(parts) + doc if parts else doc
            parts = []


# -----------------------------------------------------------------------------
# sources: local paths, hub datasets, URLs -> local files, fetched one at a time when the reader reaches them

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[^/]+)?$")
HUB_METADATA = {"dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json"}  # not documents
# how a dataset's file paths name their splits (the keywords of the `datasets` library's data-file patterns)
SPLIT_NAMES = {split: re.compile(rf"(^|[-._ 0-9/])({'|'.join(words)})([-._ 0-9/]|$)", re.IGNORECASE) for split, words in
               (("train", ("train", "training")), ("validation", ("validation", "valid", "dev", "val")),
                ("test", ("test", "testing", "eval", "evaluation")))}


def split_of(path):
    """The split a dataset file's path names (train, validation, test), or None."""
    return next((split for split, pattern in SPLIT_NAMES.items() if pattern.search(path)), None)


def open_source(spec, config_name=None, revision=None, suffixes=SUFFIXES):
    """(description for meta.json, list of zero-argument functions that each return one local file's path). The
    one reader of source specs: data.py's documents and eval.py's hub task data (its own `suffixes`) go through it."""
    spec = os.fspath(spec)
    if spec.startswith("hf://"):
        if not spec.startswith("hf://datasets/"):
            raise UserError(f"{spec}: expected hf://datasets/ORG/NAME[@REVISION]/GLOB")
        parts = spec[len("hf://datasets/"):].split("/", 2)
        if len(parts) < 2 or not all(parts[:2]):
            raise UserError(f"{spec}: expected hf://datasets/ORG/NAME[@REVISION]/GLOB")
        name, _, rev = parts[1].partition("@")
        return _hub_source(f"{parts[0]}/{name}", urllib.parse.unquote(rev) or revision,
                           parts[2] if len(parts) > 2 else "", spec, suffixes=suffixes)
    if spec.startswith(("http://", "https://")):
        return _url_source(spec, suffixes)
    if os.path.isdir(spec):
        files = sorted((os.path.join(root, f) for root, _, names in os.walk(spec) for f in names
                        if file_type(f, suffixes) and not f.startswith(".")), key=lambda p: os.path.relpath(p, spec))
        if not files:
            raise UserError(f"{spec}: directory holds no readable files (expected {', '.join(suffixes)})")
    elif os.path.isfile(spec):
        files = [spec]
    elif glob.has_magic(spec):
        files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
        if not files:
            raise UserError(f"{spec}: no files match")
    elif HUB_ID.match(spec) and not spec.startswith(".") and not file_type(spec.partition("@")[0], suffixes):
        repo, _, rev = spec.partition("@")
        return _hub_source(repo, rev or revision, f"{config_name}/**" if config_name else "", spec, train_only=True,
                           suffixes=suffixes)
    else:
        raise UserError(f"{spec}: no such file or directory (nor a hub dataset ORG/NAME, hf://datasets/... or URL)")
    for f in files:
        if not file_type(f, suffixes):
            raise UserError(f"{f}: unsupported file type (expected one of {', '.join(suffixes)})")
    return _listed({"source": spec, "files": files}, [lambda f=f: f for f in files])


def _listed(desc, fetchers):
    """A listed source, checked for what can fail before any download: pyarrow for parquet files."""
    parquet = [f for f in desc["files"] if f.lower().endswith(".parquet")]
    if parquet:
        import_pyarrow(f"{desc['source']} ({parquet[0]})")
    return desc, fetchers


def _hub_source(repo_id, revision, pattern, spec, train_only=False, suffixes=SUFFIXES):
    """A hub dataset's files matching `pattern` (fnmatch: * also crosses /; empty: all readable files), at one
    commit; with train_only, of files that name their splits (train/, validation-0000.parquet, ...) the train
    split's only. Listed through the hub API, or from the huggingface_hub cache when offline (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import HfApi, RepoFile, hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    where = f"{repo_id} (hub dataset, revision {revision or 'main'})"
    gated = (f"{where}: gated; accept its terms on https://huggingface.co/datasets/{repo_id} and log in "
             "(`hf auth login` or HF_TOKEN)")
    try:
        api = HfApi()
        commit = api.dataset_info(repo_id, revision=revision).sha
        names = [f.path for f in api.list_repo_tree(repo_id, recursive=True, revision=commit, repo_type="dataset")
                 if isinstance(f, RepoFile)]
    except GatedRepoError:
        raise UserError(gated) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise UserError(f"{where}: not found on the Hugging Face hub ({type(e).__name__})") from None
    except Exception as online_error:  # offline, no connection, hub down: the cache may hold it
        try:
            folder = snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                       allow_patterns=pattern or None, local_files_only=True)
        except Exception:
            raise UserError(f"{where}: the hub is unavailable ({str(online_error).splitlines()[0]}) and the "
                            "huggingface_hub cache has no copy") from None
        commit = os.path.basename(folder)
        names = [os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/")
                 for root, _, fs in os.walk(folder) for f in fs]
    names = sorted(n for n in names if file_type(n, suffixes) and os.path.basename(n) not in HUB_METADATA
                   and (not pattern or fnmatch.fnmatchcase(n, pattern)))
    if train_only and any(split_of(n) for n in names):
        names = [n for n in names if split_of(n) == "train"]
    if not names:
        raise UserError(f"{where}: no readable files match {pattern or '*'} (expected {', '.join(suffixes)})")

    def fetch(name):
        try:
            return hf_hub_download(repo_id, name, repo_type="dataset", revision=commit)
        except GatedRepoError:
            raise UserError(gated) from None
        except Exception as e:
            raise UserError(f"{where}: cannot fetch {name} ({str(e).splitlines()[0]})") from None

    desc = {"source": spec, "hub_dataset": repo_id, "revision": revision or "main", "commit": commit,
            "files": names}
    return _listed(desc, [lambda n=n: fetch(n) for n in names])


def url_cache_dir():
    """Where downloaded URLs are kept: $DATA_URL_CACHE, else ~/.cache/clp-transfer/urls."""
    return os.environ.get("DATA_URL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "clp-transfer", "urls")


def _url_source(spec, suffixes=SUFFIXES):
    url, _, fragment = spec.partition("#")
    expected = fragment.removeprefix("sha256=").lower() if fragment else None
    if fragment and not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise UserError(f"{spec}: the URL fragment must be #sha256=<64 hex digits>")
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not file_type(name, suffixes):
        raise UserError(f"{spec}: unsupported file type {name!r} (expected one of {', '.join(suffixes)})")
    desc = {"source": spec, "url": url, "files": [name]}
    _listed(desc, [])

    def fetch():
        path = os.path.join(url_cache_dir(), hashlib.sha256(url.encode()).hexdigest()[:16], name)
        if not os.path.isfile(path):
            _download(url, path)
        sha = sha256_file(path)
        if expected and sha != expected:
            os.remove(path)  # a later run downloads it afresh
            raise UserError(f"{url}: sha256 {sha} does not match the expected {expected}")
        desc["sha256"] = sha
        return path

    return desc, [fetch]


def _download(url, path):
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out, 1 << 20)
            expected = response.headers.get("Content-Length")
            if expected is not None and out.tell() != int(expected):  # the connection ended early
                raise UserError(f"{url}: download incomplete ({out.tell()} of {int(expected)} bytes); run again")
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise UserError(f"{url}: download failed ({e})") from None


def open_sources(sources, config_name=None, revision=None):
    """open_source for one source or a list of them; every source is listed before any is read."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise UserError("no source given")
    return [open_source(s, config_name, revision) for s in sources]


def documents(opened, text_field="text", txt_documents="file", stats=None):
    """The documents of opened sources, long .txt documents in pieces (see Piece)."""
    for _, files in opened:
        for fetch in files:
            yield from read_file(fetch(), text_field, txt_documents, stats)


def iter_documents(source, text_field="text", txt_documents="file", stats=None, config_name=None, revision=None):
    """Documents (strings) of one source or a list of them, in source order, streamed file by file. Sources are
    listed (and errors in them reported) when this is called; files are fetched and read as iteration reaches them."""
    return whole_documents(documents(open_sources(source, config_name, revision), text_field, txt_documents, stats))


# -----------------------------------------------------------------------------
# tokenizers


def train_bpe(texts, vocab_size, special_tokens=("<|endoftext|>",), show_progress=False):
    """A byte-level BPE (GPT-2 / GPT-NeoX style, <|endoftext|> = id 0) trained on an iterator of texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer)
    return tok


def resolve_tokenizer(name, revision=None):
    """(tokenizers.Tokenizer, local path, sha256, eos token, framing) from a tokenizer.json file, a directory holding
    one (or vocab.json + merges.txt), or a hub model id. The end-of-text token is the eos_token its
    tokenizer_config.json / special_tokens_map.json name, else <|endoftext|>; framing: {"bos_token_id": the token
    the tokenizer puts before a text or None, "eos_token_id": its id}."""
    if name.lower().endswith(".json") and not os.path.isfile(name):
        raise UserError(f"{name}: " + ("is a directory, expected the tokenizer.json file" if os.path.isdir(name)
                                       else "tokenizer file not found"))
    path = name if os.path.isfile(name) else resolve_model_dir(name, revision, weights=False)
    tok = load_tokenizer(path)
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text, not a document boundary
    eos = read_special_tokens(path, tok).get("eos_token") or "<|endoftext|>"  # a file's: from the config beside it
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise UserError(f"{name}: the tokenizer has no end-of-text token (no eos_token in its tokenizer_config.json "
                        "or special_tokens_map.json, and no <|endoftext|>)")
    framing = {"bos_token_id": added_bos(tok, eos_id, name), "eos_token_id": eos_id}
    return tok, path, tokenizer_sha256(path), eos, framing


def added_bos(tok, eos_id, name):
    """The id of the token the tokenizer's post-processor puts before every text (Llama 2/3, Mistral: their BOS), or
    None (GPT-NeoX, GPT-2, Qwen), found by asking it: a short text encoded with and without special tokens. More than
    one token before a text, or anything after it but the end-of-text token, is a framing data.py does not write."""
    plain = tok.encode("a", add_special_tokens=False).ids
    framed = tok.encode("a", add_special_tokens=True).ids
    start = next((i for i in range(len(framed) - len(plain) + 1) if framed[i:i + len(plain)] == plain), None)
    if not plain or start is None:
        raise UserError(f"{name}: cannot tell what the tokenizer adds around a text (\"a\" encodes to {plain} without "
                        f"special tokens, {framed} with them)")
    before, after = framed[:start], framed[start + len(plain):]
    if len(before) > 1 or after not in ([], [eos_id]):
        raise UserError(f"{name}: the tokenizer's post-processor frames a text as {before} + text + {after}; data.py "
                        f"writes at most one BOS token before a document and the end-of-text token ({eos_id}) after "
                        "it (edit post_processor in tokenizer.json, or use a tokenizer that adds only a BOS)")
    return before[0] if before else None

def token_dtype(vocab_size):
    """uint16 when every token id (0 ... vocab_size - 1) fits, i.e. vocab_size <= 65,536; else uint32. vocab_size:
    the largest id + 1 (a vocabulary may skip ids)."""
    return "uint16" if vocab_size - 1 <= np.iinfo(np.uint16).max else "uint32"


# -----------------------------------------------------------------------------
# the split and the token files

def split_documents(docs, train_bytes=None, val_bytes=None):
    """The study's split: (split, document, UTF-8 bytes) in source order. Train takes documents while it holds fewer
    than train_bytes (so the document that crosses the line is in train, whole); validation then takes the
    following ones while it holds fewer than val_bytes. train_bytes None: every document goes to train. Stops there;
    a source that ends early leaves a split short, which the caller checks."""
    docs = iter(docs)
    for split, budget in (("train", train_bytes), ("val", val_bytes)):
        if split == "val" and budget is None:
            return
        size, inside = 0, False
        while budget is None or size < budget or inside:  # inside a document (its next piece): it stays whole
            doc = next(docs, None)
            if doc is None:
                return
            n = len(doc.encode("utf-8"))
            size, inside = size + n, isinstance(doc, Piece)
            yield split, doc, n


def batches(items, batch_bytes):
    """(split, documents, bytes) batches of about batch_bytes of text, never mixing splits."""
    batch, batch_split, size = [], None, 0
    for split, doc, n in items:
        if batch and (split != batch_split or size >= batch_bytes):
            yield batch_split, batch, size
            batch, size = [], 0
        batch.append(doc)
        batch_split, size = split, size + n
    if batch:
        yield batch_split, batch, size


def prefetch(iterable, depth=2):
    """Run `iterable` in a background thread, up to `depth` items ahead, so that reading and parsing (Python)
    overlap with tokenizing (Rust, which releases the GIL). Exceptions arrive in the consumer."""
    q, stop = queue.Queue(depth), threading.Event()

    def run():
        try:
            for x in iterable:
                q.put((True, x))
                if stop.is_set():
                    return
            q.put((False, None))
        except BaseException as e:
            q.put((False, e))

    threading.Thread(target=run, daemon=True).start()
    try:
        while True:
            ok, x = q.get()
            if not ok:
                if x is not None:
                    raise x
                return
            yield x
    finally:
        stop.set()
        while not q.empty():  # unblock the producer so that it sees `stop`
            q.get_nowait()


def write_tokens(items, tok, framing, dtype, out_dir, batch_bytes=MiB, progress=None):
    """Tokenize (split, document, bytes) items in batches of about batch_bytes of text with encode_batch_fast
    (Rust, all cores) and append each document's ids, after framing's bos_token_id (when not None) and before its
    eos_token_id, to out_dir/<split>.bin. Returns per-split documents, bytes and tokens. `progress`: the expected
    bytes, True when unknown, or False."""
    from tqdm import tqdm

    counts = {s: {"documents": 0, "bytes": 0, "tokens": 0} for s in ("train", "val")}
    files = {s: open(os.path.join(out_dir, f"{s}.bin"), "wb") for s in counts}
    bar = tqdm(total=progress if progress is not True else None, unit="B", unit_scale=True, unit_divisor=1024,
               desc="tokenizing", disable=None if progress else True, file=sys.stderr)
    bos_id, eos_id = framing["bos_token_id"], framing["eos_token_id"]
    within = in_context(tok)  # a document's later pieces: without the word-start marker put before a whole text
    start, tokens, at_start = time.time(), 0, True  # at_start: the next item begins a document
    try:
        for split, docs, size in prefetch(batches(items, batch_bytes)):
            ids, ends = [], 0
            for doc, enc in zip(docs, encode_items(tok, within, docs, at_start)):
                if at_start and bos_id is not None:
                    ids.append(bos_id)
                ids += enc.ids
                at_start = not isinstance(doc, Piece)  # a piece: the document goes on in the next item
                if at_start:
                    ids.append(eos_id)
                    ends += 1
            try:
                np.array(ids, dtype=dtype).tofile(files[split])
            except OSError as e:  # numpy's short write (a full disk) carries no errno or file name
                raise OSError(e.errno, e.strerror or str(e), files[split].name) from None
            c = counts[split]
            c["documents"], c["bytes"], c["tokens"] = c["documents"] + ends, c["bytes"] + size, c["tokens"] + len(ids)
            tokens += len(ids)
            bar.update(size)
            bar.set_postfix_str(f"{tokens / max(time.time() - start, 1e-9) / 1e3:.0f}k tokens/s", refresh=False)
    finally:
        for f in files.values():
            f.close()
        bar.close()
    return counts


def encode_items(tok, within, docs, at_start):
    """The ids of a batch of items: a document or its first piece as `tok` encodes a text, a later piece of a
    document as `within` (in_context) encodes it, so that the pieces give the whole text's ids (SentencePiece's
    word-start marker, put before every text, is not there inside one). at_start: the first item begins a document."""
    starts = []
    for doc in docs:
        starts.append(at_start)
        at_start = not isinstance(doc, Piece)
    if within is tok or all(starts):
        return tok.encode_batch_fast(docs, add_special_tokens=False)
    first = iter(tok.encode_batch_fast([d for d, s in zip(docs, starts) if s], add_special_tokens=False))
    later = iter(within.encode_batch_fast([d for d, s in zip(docs, starts) if not s], add_special_tokens=False))
    return [next(first) if s else next(later) for s in starts]


def train_tokenizer_on(docs, vocab_size, out_dir, progress=False):
    """Train a byte-level BPE on `docs` and save it as an HF tokenizer directory (tokenizer.json + configs)."""
    tok = train_bpe(docs, vocab_size, show_progress=bool(progress) and sys.stderr.isatty())
    if tok.get_vocab_size() < 257 + 1:
        raise UserError(f"the trained tokenizer has only {tok.get_vocab_size()} tokens; the corpus is too small")
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    save_tokenizer(path, out_dir, {r: "<|endoftext|>" for r in ("bos_token", "eos_token", "unk_token")})
    return path


@dataclass
class PrepareOptions:
    """How prepare reads, splits and tokenizes (data.py's flags but the sources and --output_dir), checked before any
    text is read."""
    tokenizer: str = None
    tokenizer_revision: str = None
    subsample_size_mb: float = None
    valid_percent: float = 10.0
    validation_sources: list = None
    text_field: str = "text"
    txt_documents: str = "file"
    dataset_config_name: str = None
    dataset_revision: str = None
    train_tokenizer: bool = False
    vocab_size: int = None
    override: bool = False
    batch_mb: float = 1.0
    progress: bool = True

    def __post_init__(self):
        if bool(self.tokenizer) == bool(self.train_tokenizer):
            raise UserError("give either --tokenizer (an existing tokenizer) or --train_tokenizer --vocab_size N")
        if self.train_tokenizer and not (self.vocab_size and self.vocab_size > 257):
            raise UserError(f"--train_tokenizer needs --vocab_size above 257 (the 256 bytes and <|endoftext|>), "
                            f"got {self.vocab_size}")
        if self.subsample_size_mb is not None and not self.subsample_size_mb > 0:
            raise UserError(f"--subsample_size_mb {self.subsample_size_mb}: expected a size in MiB above 0")
        if self.validation_sources is None:
            if self.subsample_size_mb is None:
                raise UserError("--subsample_size_mb is needed to split off validation data (the first N MiB go to "
                                "train, the next --valid_percent % to validation), or give --validation_dataset_name")
            if not 0 < self.valid_percent <= 100:
                raise UserError(f"--valid_percent {self.valid_percent}: expected a percentage in (0, 100]")

    @property
    def train_bytes(self):
        """Train's share of the text in bytes (None: all of it)."""
        return self.subsample_size_mb * MiB if self.subsample_size_mb else None

    @property
    def val_bytes(self):
        """Validation's share, when it is split off after train (None: a validation source, read whole)."""
        return None if self.validation_sources else self.train_bytes * self.valid_percent / 100


def prepare(sources, output_dir, tokenizer=None, **options):
    """Sources -> output_dir/{train.bin, val.bin, meta.json} (and tokenizer.json with train_tokenizer). The Python
    API under the CLI; options: PrepareOptions' fields. Returns the meta.json dict."""
    opts = PrepareOptions(tokenizer, **options)  # everything that can be checked before reading any text
    output_dir = os.path.normpath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"{output_dir}: exists and is not a directory")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not opts.override:
        raise UserError(f"{output_dir}: exists and is not empty; pass --override to replace it")
    if tokenizer:
        tok, tok_path, sha, eos, framing = resolve_tokenizer(tokenizer, opts.tokenizer_revision)
    train_opened = open_sources(sources, opts.dataset_config_name, opts.dataset_revision)
    val_opened = (open_sources(opts.validation_sources, opts.dataset_config_name, opts.dataset_revision)
                  if opts.validation_sources else [])
    stats = {}

    def items():
        yield from split_documents(documents(train_opened, opts.text_field, opts.txt_documents, stats),
                                   opts.train_bytes, opts.val_bytes)
        for doc in documents(val_opened, opts.text_field, opts.txt_documents, stats):
            yield "val", doc, len(doc.encode("utf-8"))

    with atomic_dir(output_dir) as tmp, write_errors(output_dir, tmp):  # --override: the old one goes at the end
        if opts.train_tokenizer:
            train_docs = (doc for _, doc, _ in itertools.takewhile(lambda item: item[0] == "train", items()))
            tok_path = train_tokenizer_on(train_docs, opts.vocab_size, tmp, opts.progress)
            tok, _, sha, eos, framing = resolve_tokenizer(tok_path)
            stats["undecodable_documents"] = 0  # counted again while tokenizing; the warnings are not repeated
        vocab = max(tok.get_vocab(with_added_tokens=True).values()) + 1  # the id range, which the count may not be
        dtype = token_dtype(vocab)
        total = (opts.train_bytes + (opts.val_bytes or 0)) if opts.train_bytes and not val_opened else None
        counts = write_tokens(items(), tok, framing, dtype, tmp, int(opts.batch_mb * MiB),
                              opts.progress and (total or True))
        check_split_sizes(counts, sources, opts)
        meta = {
            "dtype": dtype, "vocab_size": vocab, "eos_token_id": framing["eos_token_id"], "eos_token": eos,
            "tokenizer": "tokenizer.json" if opts.train_tokenizer else tokenizer,
            "tokenizer_revision": opts.tokenizer_revision, "tokenizer_sha256": sha,
            "tokenizer_file": "tokenizer.json" if opts.train_tokenizer else os.path.abspath(tok_path),
            "splits": {s: {"file": f"{s}.bin", **c} for s, c in counts.items()},
            "split_rule": {"subsample_size_mb": opts.subsample_size_mb,
                           "valid_percent": None if opts.validation_sources else opts.valid_percent,
                           "MB": "MiB, 2**20 bytes of UTF-8 text; documents in source order, never split"},
            "framing": framing,
            "tokens": "each document: framing's bos_token_id (when not null), its ids, eos_token_id; tokens counts "
                      "include them",
            "sources": {"train": [d for d, _ in train_opened], "val": [d for d, _ in val_opened] or "after train"},
            "text_field": opts.text_field, "txt_documents": opts.txt_documents,
            "undecodable_documents": stats.get("undecodable_documents", 0),
            "undecodable_files": stats.get("undecodable_files", [])[:20],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(os.path.join(tmp, "meta.json"), meta)
    return meta


def check_split_sizes(counts, sources, opts):
    """A source that ends before the split rule is satisfied is an error (the study's script crashed there)."""
    train, val = counts["train"], counts["val"]
    train_bytes, val_bytes, validation_sources = opts.train_bytes, opts.val_bytes, opts.validation_sources
    if not train["documents"]:
        raise UserError(f"{_names(sources)}: no documents (empty files, or nothing but white space)")
    if validation_sources and not val["documents"]:
        raise UserError(f"{_names(validation_sources)}: no documents (empty files, or nothing but white space)")
    have = (train["bytes"] + val["bytes"]) / MiB
    if train_bytes and train["bytes"] < train_bytes or val_bytes and val["bytes"] < val_bytes:
        pct = val_bytes / train_bytes if val_bytes else 0
        n = train["documents"] + val["documents"]
        way_out = ("split the text into more documents (more files or records; for .txt files --txt_documents "
                   "line|blank_line makes each line / each blank-line block a document)")
        if val_bytes and n == 1:
            raise UserError(f"{_names(sources)}: 1 document, {have:.2f} MiB, and a document is never split: the split "
                            f"rule needs at least one for train and one for validation; " + way_out)
        if val_bytes and have * MiB >= train_bytes + val_bytes:  # enough text, but the documents are too large
            raise UserError(f"{_names(sources)}: {n} documents, {have:.2f} MiB; documents are never split, and the "
                            f"one that crosses the {train_bytes / MiB:g} MiB train line leaves "
                            f"{val['bytes'] / MiB:.3g} of the {val_bytes / MiB:.3g} MiB validation needs; lower "
                            f"--subsample_size_mb so that train ends at an earlier document, or " + way_out)
        raise UserError(f"{_names(sources)}: {n} documents, {have:.2f} MiB; the "
                        f"split rule needs {train_bytes / MiB:g} MiB for train"
                        + (f" and {val_bytes / MiB:g} MiB more for validation" if val_bytes else "")
                        + f"; lower --subsample_size_mb (at most about {have / (1 + pct) * 0.98:.3g})")


def _names(sources):
    return sources if isinstance(sources, (str, os.PathLike)) else ", ".join(map(str, sources))


# -----------------------------------------------------------------------------
# reading token files for training (train.py)

META_FIELDS = ("dtype", "vocab_size", "eos_token_id", "tokenizer_sha256")


def load_meta(data_dir):
    """meta.json of a prepared data directory, checked: required fields present, token files a whole number of
    tokens of the recorded dtype. A meta.json without "framing" (data.py before it recorded one) means no BOS."""
    import numpy as np

    if not os.path.isdir(data_dir):
        raise UserError(f"{data_dir}: data directory not found (prepare it with `python data.py ... --output_dir "
                        f"{data_dir}` or `make data`)")
    path = os.path.join(data_dir, "meta.json")
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise UserError(f"{path}: a JSON {type(meta).__name__}, expected an object")
    missing = [k for k in META_FIELDS if k not in meta]
    if missing:
        raise UserError(f"{path}: missing fields {', '.join(missing)}")
    for key, ok, want in (("dtype", lambda v: v in ("uint16", "uint32"), "'uint16' or 'uint32'"),
                          ("vocab_size", lambda v: type(v) is int and v > 0, "a positive integer"),
                          ("eos_token_id", lambda v: type(v) is int and 0 <= v < meta["vocab_size"],
                           "an integer id below vocab_size"),
                          ("tokenizer_sha256", lambda v: type(v) is str, "a string"),
                          ("tokenizer_file", lambda v: v is None or type(v) is str, "a path"),
                          ("framing", lambda v: isinstance(v, dict) and set(v) == {"bos_token_id", "eos_token_id"}
                           and (v["bos_token_id"] is None or type(v["bos_token_id"]) is int
                                and 0 <= v["bos_token_id"] < meta["vocab_size"])
                           and v["eos_token_id"] == meta["eos_token_id"],
                           '{"bos_token_id": null or an id below vocab_size, "eos_token_id": eos_token_id}')):
        if key in meta and not ok(meta[key]):
            raise UserError(f"{path}: {key} is {meta[key]!r}, expected {want}")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        file = os.path.join(data_dir, f"{split}.bin")
        if os.path.isfile(file) and os.path.getsize(file) % itemsize:
            raise UserError(f"{file}: {os.path.getsize(file)} bytes is not a whole number of {meta['dtype']} tokens "
                            "(truncated or not a token file)")
    return meta


def data_fingerprint(data_dir, samples=64, chunk=1 << 16):
    """What a checkpoint records of the data it trains on, cheap on GBs (at most 2 x samples x chunk bytes read):
    the token files' sizes, the sha256 of meta.json without its creation time (the same text prepared again is the
    same data), and one sha256 over both files' sizes and `samples` evenly spaced chunks of each, the first and the
    last included. Other text tokenized into the same directory changes the sizes, meta.json's counts, or sampled
    bytes."""
    meta = read_json(os.path.join(data_dir, "meta.json"))
    meta.pop("created", None)
    record = {"meta_sha256": hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()}
    content = hashlib.sha256()
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        size = os.path.getsize(path)
        record[f"{split}_bytes"] = size
        content.update(f"{split}.bin {size}\n".encode())
        with open(path, "rb") as f:
            for offset in sorted({(size - chunk) * i // (samples - 1) for i in range(samples)} if size > chunk
                                 else {0}):
                f.seek(offset)
                content.update(f.read(chunk))
    record["content_sha256"] = content.hexdigest()
    return record


def check_data_fingerprint(saved, now, data_dir, checkpoint_path):
    """A resumed run reads the data it was trained on (saved: data_fingerprint then, now: today's): the same position
    in other token files is other blocks, and a validation curve that changes mid-run. Other data is refused in one
    line."""
    if now == saved:
        return
    differ = [f"{s}.bin {saved[f'{s}_bytes']:,} -> {now[f'{s}_bytes']:,} bytes" for s in ("train", "val")
              if saved[f"{s}_bytes"] != now[f"{s}_bytes"]]
    if saved["meta_sha256"] != now["meta_sha256"]:
        differ.append("meta.json")
    differ = differ or ["the token files' content"]
    raise UserError(f"data_dir={data_dir!r} is not the data {checkpoint_path} was trained on ({', '.join(differ)}; "
                    "prepared again in place?): put that data back to resume, or train on this data in a fresh "
                    "run (another out_dir, or --override=True)")


def check_tokenizer(meta, tokenizer_dir, model_source, data_dir):
    """The model's tokenizer (tokenizer_dir) must be the one the token files were made with, and frame a text as they
    frame each document: a model whose tokenizer adds BOS reads data that starts documents with it, and only such."""
    sha256 = tokenizer_sha256(tokenizer_dir)
    if meta["tokenizer_sha256"] != sha256:
        raise UserError(f"{data_dir} was tokenized with {meta.get('tokenizer', '?')} (sha256 "
                        f"{meta['tokenizer_sha256'][:12]}...), but the model {model_source} has a different tokenizer "
                        f"(sha256 {sha256[:12]}...); prepare the data with the model's tokenizer")
    model_bos = added_bos(load_tokenizer(tokenizer_dir), meta["eos_token_id"], tokenizer_dir)
    data_bos = meta.get("framing", {}).get("bos_token_id")
    if model_bos != data_bos:
        def framed(bos):
            return "text + EOS, no BOS" if bos is None else f"BOS (id {bos}) + text + EOS"

        raise UserError(f"{data_dir} frames each document as {framed(data_bos)}"
                        f"{'' if 'framing' in meta else ' (its meta.json has no framing: an older data.py)'}, but the "
                        f"tokenizer of the model {model_source} frames a text as {framed(model_bos)}; prepare the data "
                        "again with data.py and the model's tokenizer")


class Blocks:
    """Non-overlapping blocks of block_size + 1 tokens (inputs and their next-token targets; block k starts at
    token k * block_size) from a flat token file, memory-mapped afresh per batch so resident memory stays flat.

    Positions count blocks globally: the global batch at `pos` is blocks pos ... pos + batch_size * world_size - 1
    of the visiting order, of which each rank reads its own batch_size. With a shuffle seed the order is a seeded
    permutation per epoch (every block once per epoch, without replacement); without one it is file order. A run
    resumes from the saved position alone."""

    def __init__(self, path, dtype, block_size, shuffle_seed=None, rank=0, world_size=1):
        import numpy as np

        if not os.path.isfile(path):
            raise UserError(f"{path}: token file not found")
        self.path, self.dtype, self.block_size = path, np.dtype(dtype), block_size
        self.shuffle_seed, self.rank, self.world_size = shuffle_seed, rank, world_size
        self.n_tokens = os.path.getsize(path) // self.dtype.itemsize
        self.n_blocks = max(0, (self.n_tokens - 1) // block_size)
        if self.n_blocks < world_size:
            raise UserError(f"{path}: {self.n_tokens} tokens make {self.n_blocks} blocks of {block_size}; "
                            f"need at least {world_size} (one per rank)")
        self._order = {}

    def order(self, epoch):
        import numpy as np

        if self.shuffle_seed is None:
            return None
        if epoch not in self._order:
            self._order = {epoch: np.random.default_rng([self.shuffle_seed, epoch]).permutation(self.n_blocks)}
        return self._order[epoch]

    def block_ids(self, pos, batch_size):
        """The block ids this rank reads for the global batch starting at position pos."""
        import numpy as np

        positions = pos + self.rank * batch_size + np.arange(batch_size)
        ids = positions % self.n_blocks
        if self.shuffle_seed is not None:
            epochs = positions // self.n_blocks
            ids = np.concatenate([self.order(e)[ids[epochs == e]] for e in np.unique(epochs)])
        return ids

    def batch(self, pos, batch_size):
        """(x, y) int64 tensors (batch_size, block_size) for this rank."""
        import numpy as np
        import torch

        data = np.memmap(self.path, dtype=self.dtype, mode="r")
        T = self.block_size
        rows = np.stack([data[i * T: i * T + T + 1] for i in self.block_ids(pos, batch_size)]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_name", nargs="+", required=True, metavar="SOURCE",
                   help="file, directory, glob, hub dataset (ORG/NAME or hf://datasets/ORG/NAME[@REV]/GLOB) or "
                        "http(s) URL[#sha256=HEX]; several are read in order")
    p.add_argument("--dataset_config_name", help="hub dataset ORG/NAME: read the files below CONFIG/")
    p.add_argument("--dataset_revision", help="hub dataset branch, tag or commit (default main)")
    p.add_argument("--validation_dataset_name", nargs="+", metavar="SOURCE",
                   help="a separate validation source (all of it); then --valid_percent is not used")
    p.add_argument("--tokenizer", help="tokenizer.json, a directory holding one (or vocab.json + merges.txt), or a "
                                       "hub model id")
    p.add_argument("--tokenizer_revision", help="hub revision of --tokenizer")
    p.add_argument("--output_dir", required=True, help="gets train.bin, val.bin, meta.json (and tokenizer.json)")
    p.add_argument("--subsample_size_mb", type=float,
                   help="train = the first documents up to this many MiB (2**20 bytes of UTF-8 text)")
    p.add_argument("--valid_percent", type=float, default=10.0,
                   help="validation = the next documents up to this percentage of --subsample_size_mb (default 10)")
    p.add_argument("--text_field", default="text", help="JSON field / parquet column holding the text (default text)")
    p.add_argument("--txt_documents", choices=TXT_DOCUMENTS, default="file",
                   help=".txt files: one document per file (default), per line, or per blank-line-separated block")
    p.add_argument("--num_workers", type=int,
                   help="tokenizer threads (default: all cores; sets RAYON_NUM_THREADS)")
    p.add_argument("--train_tokenizer", action="store_true", help="train a byte-level BPE on the train split first")
    p.add_argument("--vocab_size", type=int, help="with --train_tokenizer: its vocabulary size")
    p.add_argument("--batch_mb", type=float, default=1.0, help="MiB of text per encode_batch call (default 1)")
    p.add_argument("--override", action="store_true", help="replace a non-empty --output_dir")
    args = p.parse_args(argv)
    if args.num_workers:  # read by the tokenizers thread pool when it starts, which is after this
        os.environ["RAYON_NUM_THREADS"] = str(args.num_workers)
    start = time.time()
    meta = prepare(args.dataset_name, args.output_dir, args.tokenizer, tokenizer_revision=args.tokenizer_revision,
                   subsample_size_mb=args.subsample_size_mb, valid_percent=args.valid_percent,
                   validation_sources=args.validation_dataset_name, text_field=args.text_field,
                   txt_documents=args.txt_documents, dataset_config_name=args.dataset_config_name,
                   dataset_revision=args.dataset_revision, train_tokenizer=args.train_tokenizer,
                   vocab_size=args.vocab_size, override=args.override, batch_mb=args.batch_mb)
    took = time.time() - start
    s = meta["splits"]
    print(f"{args.output_dir}: train {s['train']['documents']} documents, {s['train']['tokens']:,} tokens; "
          f"val {s['val']['documents']} documents, {s['val']['tokens']:,} tokens ({meta['dtype']}); "
          f"{(s['train']['bytes'] + s['val']['bytes']) / MiB / took:.1f} MiB/s, "
          f"{(s['train']['tokens'] + s['val']['tokens']) / took / 1e3:.0f}k tokens/s")


if __name__ == "__main__":
    run_cli(main)
