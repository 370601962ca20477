"""
Any corpus to token files: documents from local files, hub datasets or URLs -> train.bin / val.bin + meta.json.
"""

import os
import xml.etree.ElementTree as ET

from model import UserError

# -----------------------------------------------------------------------------
# readers: each yields documents (strings) in source order

TEI_APPARATUS = {"note", "fw", "head", "trailer"}  # notes, running heads, headings: not prose


def read_tei(path):
    """One TEI novel (ELTeC) as one document: the paragraphs and verse lines of <text><body>, one per line,
    whitespace normalised, without notes, running heads, headings and trailers."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
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
