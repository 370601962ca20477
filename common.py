"""
The plumbing every tool of the project shares, in one place: the one-line user error and the CLI wrapper, atomic
writes, strict JSON, hashing, hub resolution, tokenizer files, and the small parsers (dtype, device, perplexity,
vocabulary rounding) that would otherwise be written once per file with small differences.
"""

import errno
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager

class UserError(Exception):
    """A problem with the user's input (a path, a file, a config value). CLIs print it as one line, no traceback."""


def run_cli(main, argv=None):
    """Run a CLI main(); a UserError ends it with 'error: ...' on stderr and exit code 1, Ctrl-C with one line and
    exit code 130 (every output is written atomically: nothing half-written is left). DEBUG=1: the traceback."""
    try:
        return main(argv)
    except UserError as e:
        if os.environ.get("DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if os.environ.get("DEBUG"):
            raise
        print("stopped by Ctrl-C: exiting (no output is left half-written)", file=sys.stderr)
        sys.exit(130)


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes without an exception."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-" + os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)  # mkstemp creates the file private (0600); give it the mode a plain open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(path):
    """Yield a temporary directory beside `path`; when the block finishes without an exception it takes `path`'s
    place (a previous `path` goes only then, and comes back if the rename fails). Never a half-written directory."""
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{name}-")
    old = None
    try:
        yield tmp
        umask = os.umask(0)  # mkdtemp creates it private (0700); give it the mode os.mkdir would
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".tmp-old-{name}-")
            os.replace(path, os.path.join(old, name))
        try:
            os.replace(tmp, path)
        except BaseException:
            if old:
                os.replace(os.path.join(old, name), path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old:
            shutil.rmtree(old, ignore_errors=True)


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)


@contextmanager
def write_errors(path, tmp, then=None):
    """A write into `tmp` (atomic_dir's temporary directory for `path`) that fails, a full disk above all, as one
    line naming the file and saying that `path` is as it was (atomic_dir removes `tmp`), and `then` (what else is
    kept, what to do). Such a failure is an OSError naming a file under `tmp`, or naming none with a write's errno,
    or safetensors' SafetensorError (not an OSError); anything else (a source that cannot be read) passes through."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as e:
        inside = e.filename and os.path.abspath(str(e.filename)).startswith(os.path.abspath(tmp) + os.sep)
        if not (inside or (e.filename is None and e.errno in WRITE_ERRNOS)):
            raise
        name = os.path.relpath(str(e.filename), tmp) if inside else ""
        file = os.path.join(path, name) if name and not name.startswith(".tmp-") else path  # not atomic_path's temp
        raise UserError(f"{file}: cannot write it ({e.strerror or e}); {path} is as it was" +
                        (f"; {then}" if then else "")) from None
    except SafetensorError as e:
        raise UserError(f"{os.path.join(path, 'model.safetensors')}: cannot write it ({str(e).splitlines()[0]}); "
                        f"{path} is as it was" + (f"; {then}" if then else "")) from None


def write_json(path, obj):
    """Strict JSON, written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(json_safe(obj), f, indent=2, ensure_ascii=False, allow_nan=False)
            f.write("\n")


def json_safe(obj):
    """JSON has no NaN or Infinity (json.dumps would write invalid tokens): a non-finite float is written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def read_json(path):
    """Read a JSON file; a missing or malformed file is a UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found" + (" (it is a directory)" if os.path.isdir(path) else ""))
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


WEIGHT_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]
CONFIG_PATTERNS = ["config.json", "generation_config.json"] + TOKENIZER_FILES


def resolve_model_dir(name_or_path, revision=None, weights=True):
    """A local directory as it is, or a hub id (optionally at `revision`, e.g. 'step143000') downloaded into the
    huggingface_hub cache: config and tokenizer files plus safetensors weights, or .bin weights when a revision has no
    safetensors. With HF_HUB_OFFLINE=1 only the cache is read. Returns the local directory."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise UserError(f"{name_or_path}: expected a model directory or a hub id, got a file")
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"{name_or_path}: no such directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    def download(patterns):
        try:
            return snapshot_download(name_or_path, revision=revision, allow_patterns=patterns)
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise UserError(f"{name_or_path} (revision {revision or 'main'}): not found on the Hugging Face hub "
                            f"({type(e).__name__})") from None
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
            raise UserError(f"{name_or_path} (revision {revision or 'main'}): not a local directory and the hub "
                            f"copy is unavailable: {str(e).splitlines()[0]}") from None

    local = download(CONFIG_PATTERNS + (WEIGHT_PATTERNS if weights else []))
    if weights and not glob.glob(os.path.join(local, "*.safetensors")):
        local = download(CONFIG_PATTERNS + BIN_PATTERNS)
    return local


def tokenizer_file(path):
    """The tokenizer.json that a tokenizer path names: the path itself, or the one inside a directory."""
    return os.path.join(path, "tokenizer.json") if path and os.path.isdir(path) else path


def load_tokenizer(path):
    """A `tokenizers.Tokenizer` from tokenizer.json (a file, or a directory holding one), or from the GPT-2-style
    vocab.json + merges.txt pair."""
    from tokenizers import Tokenizer

    file = tokenizer_file(path)
    if os.path.isdir(file):
        raise UserError(f"{file}: is a directory, expected the tokenizer.json file")
    if os.path.isfile(file):
        try:
            return Tokenizer.from_file(file)
        except Exception as e:  # tokenizers raises a plain Exception on malformed files
            if file.endswith(("vocab.json", "merges.txt")):
                raise UserError(f"{file}: one file of a GPT-2-style tokenizer; pass the folder that holds it as "
                                "vocab.json with merges.txt") from None
            raise UserError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if os.path.isdir(path) and os.path.isfile(vocab) and os.path.isfile(merges):
        from tokenizers import decoders, models, pre_tokenizers, processors

        try:
            tok = Tokenizer(models.BPE.from_file(vocab, merges))
        except Exception as e:
            raise UserError(f"{path}: cannot read vocab.json + merges.txt ({str(e).splitlines()[0]})") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        if tok.token_to_id("<|endoftext|>") is not None:
            tok.add_special_tokens(["<|endoftext|>"])
        return tok
    raise UserError(f"{path}: no tokenizer found (expected tokenizer.json, or vocab.json + merges.txt)")


def without_prefix(spec):
    """A normaliser's or pre-tokenizer's JSON without the space or word-start marker it puts before a whole text (a
    Prepend normaliser, Metaspace's prepend_scheme, ByteLevel's add_prefix_space). Returns (JSON, whether it
    changed)."""
    if spec is None or spec["type"] == "Prepend":
        return None, spec is not None
    spec, changed = dict(spec), False
    for key in ("normalizers", "pretokenizers"):
        if key in spec:
            parts = [without_prefix(p) for p in spec[key]]
            spec[key] = [p for p, _ in parts if p is not None]
            changed |= any(c for _, c in parts)
    if spec["type"] == "Metaspace" and (spec.get("prepend_scheme", "always") != "never"
                                        or spec.get("add_prefix_space")):
        spec.pop("add_prefix_space", None)
        spec["prepend_scheme"], changed = "never", True
    if spec["type"] == "ByteLevel" and spec.get("add_prefix_space"):
        spec["add_prefix_space"], changed = False, True
    return spec, changed


def in_context(tok):
    """The tokenizer that splits a piece of text as `tok` splits it inside a longer text: without the space or
    word-start marker `tok` puts before a whole text (SentencePiece's dummy prefix: ' Haus' -> ▁Haus, not
    ▁ + ▁Haus; 'haus' -> pieces of haus, not ▁haus). `tok` itself when it puts none."""
    from tokenizers import Tokenizer

    components = (tok.normalizer, tok.pre_tokenizer)
    if not any(without_prefix(json.loads(c.__getstate__()))[1] for c in components if c is not None):
        return tok
    spec = json.loads(tok.to_str())
    for name in ("normalizer", "pre_tokenizer"):
        spec[name] = without_prefix(spec[name])[0]
    within = Tokenizer.from_str(json.dumps(spec))
    within.encode_special_tokens = tok.encode_special_tokens  # a setting, not in the JSON
    return within


def tokenizer_sha256(path, tokenizer=None):
    """Identity of a tokenizer: sha256 of its tokenizer.json file, or for a vocab.json + merges.txt pair, of the
    tokenizer.json that `save_tokenizer` writes for it. Token files and models carry it so they cannot be mixed up.
    `tokenizer`: the one read from `path`, when the caller holds it (not read again)."""
    file = tokenizer_file(path)
    if os.path.isfile(file):
        return sha256_file(file)
    return hashlib.sha256((tokenizer or load_tokenizer(path)).to_str().encode()).hexdigest()


SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def save_tokenizer(src, out_dir, special_tokens=None, tokenizer=None):
    """Write tokenizer.json (copied byte for byte when `src` has one) plus tokenizer_config.json and
    special_tokens_map.json, so transformers' AutoTokenizer and lm-evaluation-harness load the directory.
    `special_tokens` maps roles (eos_token, ...) to token strings; by default the source's files say, else
    <|endoftext|> when the vocabulary has it. `tokenizer`: the one read from `src`, when the caller holds it."""
    os.makedirs(out_dir, exist_ok=True)
    src_file = tokenizer_file(src)
    dst_file = os.path.join(out_dir, "tokenizer.json")
    if os.path.isfile(src_file):
        if os.path.abspath(src_file) != os.path.abspath(dst_file):
            with atomic_path(dst_file) as tmp:
                shutil.copyfile(src_file, tmp)
    else:
        with atomic_path(dst_file) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write((tokenizer or load_tokenizer(src)).to_str())
    if special_tokens is None:
        special_tokens = read_special_tokens(src, tokenizer)
    model_max_length = int(1e30)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, **special_tokens}
    write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    write_json(os.path.join(out_dir, "special_tokens_map.json"), special_tokens)


def read_special_tokens(src, tokenizer=None):
    """Roles -> token strings from the tokenizer_config.json / special_tokens_map.json of a model directory, or
    beside a tokenizer.json file, falling back to <|endoftext|> (the GPT-2 / GPT-NeoX convention) for bos, eos and
    unk when the vocabulary has it. `tokenizer`: the one read from `src`, when the caller holds it."""
    found = {}
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    if os.path.isdir(folder):
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            file = os.path.join(folder, name)
            if os.path.isfile(file):
                for role in SPECIAL_ROLES:
                    value = read_json(file).get(role)
                    value = value.get("content") if isinstance(value, dict) else value
                    if isinstance(value, str) and role not in found:
                        found[role] = value
    if not found:
        tok = tokenizer or load_tokenizer(src)
        if tok.token_to_id("<|endoftext|>") is not None:
            found = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    return found


# -----------------------------------------------------------------------------
# small parsers shared by the tools (torch imported only where needed: data.py runs without it)

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name, key="dtype"):
    """A dtype name (float32, bfloat16, float16) as a torch.dtype; anything else is a UserError naming `key`."""
    import torch

    if name not in DTYPES:
        raise UserError(f"{key}={name!r}: expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def exp(x):
    """math.exp, but a diverged model's perplexity (beyond 1.8e308) is inf rather than an OverflowError."""
    return math.exp(x) if x < 709.78 else math.inf


def round_up(n, multiple=128):
    """n rounded up to a multiple (the vocabulary padded to a multiple of 128: tensor-core friendly matmuls)."""
    return -(-n // multiple) * multiple


DEVICES = ("cpu", "cuda", "mps")


def check_device(name, flag="--device"):
    """The torch.device `name` names, on this machine: a typo or a missing GPU is a one-line error before any data is
    read and a model loads (torch reports them as tracebacks, CUDA's only at the first .to()). The error spells the
    setting as the user wrote it: a flag ('--device': --device 'cuda') or a config key ('device': device='cuda')."""
    import torch

    def setting(value, quote=True):
        value = repr(value) if quote else value
        return f"{flag} {value}" if flag.startswith("-") else f"{flag}={value}"

    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"{setting(name)}: not a device; expected cpu, cuda, cuda:N or mps") from None
    if device.type not in DEVICES:
        raise UserError(f"{setting(name)}: expected cpu, cuda, cuda:N or mps")
    if not available[device.type]():
        raise UserError(f"{setting(name)}: no {device.type.upper()} device available to this torch "
                        f"{torch.__version__} (use {setting('cpu', quote=False)})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{setting(name)}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
