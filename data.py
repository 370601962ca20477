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


# -----------------------------------------------------------------------------
# reading token files for training (train.py)

META_FIELDS = ("dtype", "vocab_size", "eos_token_id", "tokenizer_sha256")


def load_meta(data_dir):
    """meta.json of a prepared data directory, checked: required fields present, token files a whole number of
    tokens of the recorded dtype."""
    import numpy as np

    from model import read_json

    if not os.path.isdir(data_dir):
        raise UserError(f"{data_dir}: data directory not found (prepare it with `python data.py ... --output_dir "
                        f"{data_dir}` or `make data`)")
    path = os.path.join(data_dir, "meta.json")
    meta = read_json(path)
    missing = [k for k in META_FIELDS if k not in meta]
    if missing:
        raise UserError(f"{path}: missing fields {', '.join(missing)}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise UserError(f"{path}: dtype {meta['dtype']!r}, expected 'uint16' or 'uint32'")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        file = os.path.join(data_dir, f"{split}.bin")
        if os.path.isfile(file) and os.path.getsize(file) % itemsize:
            raise UserError(f"{file}: {os.path.getsize(file)} bytes is not a whole number of {meta['dtype']} tokens "
                            "(truncated or not a token file)")
    return meta


def check_tokenizer(meta, sha256, model_source, data_dir):
    """The model's tokenizer must be the one the token files were made with."""
    if meta["tokenizer_sha256"] != sha256:
        raise UserError(f"{data_dir} was tokenized with {meta.get('tokenizer', '?')} (sha256 "
                        f"{meta['tokenizer_sha256'][:12]}...), but the model {model_source} has a different tokenizer "
                        f"(sha256 {sha256[:12]}...); prepare the data with the model's tokenizer")


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
