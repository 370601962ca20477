"""Cut the vendored ELTeC slices (tests/data/eltec/) from a local copy of the ELTeC files, reproducibly:

    python tests/data/cut_eltec.py ELTEC_DIR     # ELTEC_DIR holds eng/ and deu/ as config/demo_eltec.tsv lists them

Each slice is the published file's own bytes up to the end of the first <p> (or verse <l>) of <body> after which
the body holds at least the wanted number of characters, then end tags for the elements still open inside <body>,
then the published file again from </body> on (the <back> matter, notes included, is kept). So it is valid TEI with
the header as published; it is written gzipped (-9, no timestamp) with its sha256 in MANIFEST.tsv."""

import gzip
import hashlib
import os
import sys
import xml.parsers.expat

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

# lang, split, file, characters of <body> text to keep (at least); train: the tiny BPEs, the training fixtures and
# the quick demo; valid: the quick demo's held-out slices (15,000 characters each) and the reader tests
SLICES = [
    ("eng", "train", "ENG18411_Tupper.xml", 140_000),
    ("eng", "train", "ENG18480_Thackeray.xml", 140_000),
    ("eng", "train", "ENG18661_Oliphant.xml", 140_000),
    ("eng", "valid", "ENG18570_Bronte.xml", 16_000),
    ("eng", "valid", "ENG19020_Nesbit.xml", 16_000),
    ("deu", "train", "DEU002.xml", 140_000),
    ("deu", "train", "DEU003.xml", 140_000),
    ("deu", "train", "DEU007.xml", 140_000),
    ("deu", "valid", "DEU062.xml", 70_000),
    ("deu", "valid", "DEU020.xml", 16_000),
]
CUT_AFTER = {"p", "l"}


def cut(raw, chars):
    """The slice of one TEI file's bytes (see the top of this file)."""
    parser = xml.parsers.expat.ParserCreate()
    stack, state = [], {"count": 0, "cut": None, "closing": None, "body_end": None}

    def local(name):
        return name.rsplit(":", 1)[-1]

    def start(name, attrs):
        stack.append(name)

    def end(name):
        stack.pop()
        names = [local(n) for n in stack]
        if local(name) == "body" and state["body_end"] is None:
            state["body_end"] = parser.CurrentByteIndex
        elif (state["cut"] is None and local(name) in CUT_AFTER and "body" in names and "note" not in names
              and state["count"] >= chars):
            state["cut"] = raw.index(b">", parser.CurrentByteIndex) + 1
            inside = stack[names.index("body") + 1:]
            state["closing"] = "".join(f"</{n}>" for n in reversed(inside)).encode()

    def text(data):
        if "body" in (local(n) for n in stack):
            state["count"] += len(data.strip())

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, text
    parser.Parse(raw, True)
    if state["cut"] is None:
        return raw  # shorter than wanted: the whole file
    return raw[:state["cut"]] + state["closing"] + b"\n" + raw[state["body_end"]:]


def main(eltec_dir):
    import data

    out_dir = os.path.join(HERE, "eltec")
    with open(os.path.join(ROOT, "config", "demo_eltec.tsv"), encoding="utf-8") as f:
        urls = {tuple(row[:3]): row[5] for row in (line.rstrip("\n").split("\t") for line in f)}
    rows = ["lang\tsplit\tfile\tsha256\tbytes\tchars\tsource_url\tsource_sha256"]
    for lang, split, name, chars in SLICES:
        with open(os.path.join(eltec_dir, lang, name), "rb") as f:
            raw = f.read()
        piece = cut(raw, chars)
        os.makedirs(os.path.join(out_dir, lang), exist_ok=True)
        path = os.path.join(out_dir, lang, name + ".gz")
        with open(path, "wb") as f:
            f.write(gzip.compress(piece, compresslevel=9, mtime=0))
        n = len(data.read_tei(path))  # parses: a cut that left invalid XML fails here
        sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
        rows.append(f"{lang}\t{split}\t{name}.gz\t{sha}\t{os.path.getsize(path)}\t{n}\t{urls[lang, split, name]}\t"
                    f"{hashlib.sha256(raw).hexdigest()}")
        print(f"{lang}/{name}.gz: {n:,} characters of text, {os.path.getsize(path):,} bytes")
    with open(os.path.join(out_dir, "MANIFEST.tsv"), "w", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
