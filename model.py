"""
GPT-NeoX (the Pythia architecture), exactly as Hugging Face transformers runs it, in one readable file.

Parameter names are the HF checkpoint keys (gpt_neox.embed_in.weight, ..., embed_out.weight), so state dicts
round-trip 1:1: `GPT.from_pretrained` reads any HF-format GPT-NeoX directory or hub id, `save_pretrained` writes
one that transformers and lm-evaluation-harness load. This file also holds the few things every other tool of the
project shares: hub resolution, tokenizer files, atomic writes and the one-line user error.
"""

import glob
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# shared conventions: user errors, atomic writes, hub resolution, tokenizer files


class UserError(Exception):
    """A problem with the user's input (a path, a file, a config value). CLIs print it as one line, no traceback."""


def run_cli(main, argv=None):
    """Run a CLI main(); a UserError ends it with 'error: ...' on stderr and exit code 1 (traceback with DEBUG=1)."""
    try:
        return main(argv)
    except UserError as e:
        if os.environ.get("DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


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


def load_tokenizer(path):
    """A `tokenizers.Tokenizer` from tokenizer.json (a file, or a directory holding one), or from the GPT-2-style
    vocab.json + merges.txt pair."""
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if os.path.isdir(file):
        raise UserError(f"{file}: is a directory, expected the tokenizer.json file")
    if os.path.isfile(file):
        try:
            return Tokenizer.from_file(file)
        except Exception as e:  # tokenizers raises a plain Exception on malformed files
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


def tokenizer_sha256(path):
    """Identity of a tokenizer: sha256 of its tokenizer.json file, or for a vocab.json + merges.txt pair, of the
    tokenizer.json that `save_tokenizer` writes for it. Token files and models carry it so they cannot be mixed up."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if os.path.isfile(file):
        return sha256_file(file)
    return hashlib.sha256(load_tokenizer(path).to_str().encode()).hexdigest()


SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def save_tokenizer(src, out_dir, special_tokens=None):
    """Write tokenizer.json (copied byte for byte when `src` has one) plus tokenizer_config.json and
    special_tokens_map.json, so transformers' AutoTokenizer and lm-evaluation-harness load the directory.
    `special_tokens` maps roles (eos_token, ...) to token strings; by default the source's files say, else
    <|endoftext|> when the vocabulary has it."""
    os.makedirs(out_dir, exist_ok=True)
    src_file = os.path.join(src, "tokenizer.json") if os.path.isdir(src) else src
    dst_file = os.path.join(out_dir, "tokenizer.json")
    if os.path.isfile(src_file):
        if os.path.abspath(src_file) != os.path.abspath(dst_file):
            with atomic_path(dst_file) as tmp:
                shutil.copyfile(src_file, tmp)
    else:
        with atomic_path(dst_file) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(load_tokenizer(src).to_str())
    if special_tokens is None:
        special_tokens = read_special_tokens(src)
    model_max_length = int(1e30)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, **special_tokens}
    write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    write_json(os.path.join(out_dir, "special_tokens_map.json"), special_tokens)


def read_special_tokens(src):
    """Roles -> token strings from a model directory's tokenizer_config.json / special_tokens_map.json, falling back
    to <|endoftext|> (the GPT-2 / GPT-NeoX convention) for bos, eos and unk when the vocabulary has it."""
    found = {}
    if os.path.isdir(src):
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            file = os.path.join(src, name)
            if os.path.isfile(file):
                for role in SPECIAL_ROLES:
                    value = read_json(file).get(role)
                    value = value.get("content") if isinstance(value, dict) else value
                    if isinstance(value, str) and role not in found:
                        found[role] = value
    if not found:
        tok = load_tokenizer(src)
        if tok.token_to_id("<|endoftext|>") is not None:
            found = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    return found


# -----------------------------------------------------------------------------
# the model

HF_NAMES = {  # GPTConfig field -> HF config.json key
    "vocab_size": "vocab_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_embd": "hidden_size",
    "intermediate_size": "intermediate_size",
    "rotary_pct": "rotary_pct",
    "rotary_base": "rotary_emb_base",
    "layer_norm_eps": "layer_norm_eps",
    "use_parallel_residual": "use_parallel_residual",
    "block_size": "max_position_embeddings",
    "attention_bias": "attention_bias",
    "tie_word_embeddings": "tie_word_embeddings",
    "hidden_act": "hidden_act",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}
GELU_APPROXIMATE = {"gelu": "none", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    n_layer: int = 24
    n_head: int = 16
    n_embd: int = 1024
    intermediate_size: int = 4096
    rotary_pct: float = 0.25  # rotary on the first int(head_dim * rotary_pct) channels of each head
    rotary_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)); False: sequential pre-LN
    block_size: int = 2048  # max_position_embeddings: nothing is learned per position, it only bounds generation
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    hidden_act: str = "gelu"
    bos_token_id: int = 0
    eos_token_id: int = 0

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.hidden_act not in GELU_APPROXIMATE:
            raise UserError(f"hidden_act={self.hidden_act!r} is not supported (known: {', '.join(GELU_APPROXIMATE)})")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise UserError(f"rotary_pct={self.rotary_pct} must lie in [0, 1]")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, hf, source="config.json"):
        """From a HF GPT-NeoX config dict; reads both the classic (rotary_pct, rotary_emb_base) and the newer
        rope_parameters naming."""
        if hf.get("model_type") != "gpt_neox" and "GPTNeoXForCausalLM" not in hf.get("architectures", []):
            raise UserError(f"{source}: model_type {hf.get('model_type')!r} (architectures "
                            f"{hf.get('architectures')}); model.py loads GPT-NeoX (model_type 'gpt_neox') only")
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise UserError(f"{source}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported "
                            "(only the default rotary embedding)")
        # as transformers (v5) reads it: rope_parameters first, then the classic keys, then GPT-NeoX's defaults
        hf = dict(hf, rotary_pct=rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
                  rotary_emb_base=rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
        kw = {}
        for f in fields(cls):
            value = hf.get(HF_NAMES[f.name])
            if value is None:
                if f.name in ("vocab_size", "n_layer", "n_head", "n_embd"):
                    raise UserError(f"{source}: missing required key {HF_NAMES[f.name]!r}")
                continue
            if isinstance(value, list):  # eos_token_id may be a list in some configs; the first is the document end
                value = value[0]
            kw[f.name] = f.type(value) if f.type in (int, float, bool) else value
        kw.setdefault("intermediate_size", 4 * kw["n_embd"])
        return cls(**kw)

    def to_hf(self, dtype=None):
        """The config.json dict: every field transformers needs, in both rotary namings (v4 and v5 read it)."""
        hf = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"}
        hf.update({hf_key: getattr(self, name) for name, hf_key in HF_NAMES.items()})
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rotary_base,
                                 "partial_rotary_factor": self.rotary_pct}
        hf.update(attention_dropout=0.0, hidden_dropout=0.0, initializer_range=0.02, use_cache=True)
        if dtype is not None:
            hf["torch_dtype"] = str(dtype).removeprefix("torch.")
        return hf


def rotary_cos_sin(config, T, device):
    """cos and sin tables (T, rotary_ndims) in fp32, rotate-half layout: cat(freqs, freqs)."""
    rot = int(config.head_dim * config.rotary_pct)
    inv_freq = 1.0 / (config.rotary_base ** (torch.arange(0, rot, 2, device=device, dtype=torch.int64).float() / rot))
    freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    """Rotate the first cos.shape[-1] channels of every head (NeoX rotate_half), pass the rest through."""
    rot = cos.shape[-1]
    if rot == 0:
        return x
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # fp32 tables, applied in the activations' dtype
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.query_key_value = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.attention_bias)
        self.dense = nn.Linear(config.n_embd, config.n_embd, bias=config.attention_bias)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        # the fused projection is laid out per head: [q_h | k_h | v_h] for each head h
        qkv = self.query_key_value(x).view(B, T, self.n_head, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.n_embd, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.n_embd)
        self.approximate = GELU_APPROXIMATE[config.hidden_act]

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin):
        a = self.attention(self.input_layernorm(x), cos, sin)
        if self.use_parallel_residual:  # Pythia: both branches read the same x
            return self.mlp(self.post_attention_layernorm(x)) + a + x
        a = a + x
        return self.mlp(self.post_attention_layernorm(a)) + a


LEGACY_BUFFERS = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gpt_neox = nn.ModuleDict(dict(
            embed_in=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            final_layer_norm=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
        ))
        self.embed_out = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        """transformers' GPT-NeoX init (used when training from scratch): N(0, 0.02), zero biases, unit norms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        """Logits (B, T, V) for every position; with targets (B, T) also the mean cross-entropy (ignore index -100)."""
        x = self.gpt_neox.embed_in(idx)
        cos, sin = rotary_cos_sin(self.config, idx.shape[1], idx.device)
        for block in self.gpt_neox.layers:
            x = block(x, cos, sin)
        logits = self.embed_out(self.gpt_neox.final_layer_norm(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding=True leaves out embed_in and embed_out (the Pythia cards' convention)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.gpt_neox.embed_in.weight.numel()
            if not self.config.tie_word_embeddings:
                n -= self.embed_out.weight.numel()
        return n

    def flops_per_token(self, T):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12*L*d*T, N counting every matmul
        weight (all parameters but embed_in, a lookup), the second term the attention scores. Frozen weights
        (requires_grad False) need no weight gradients, so they count 4 instead of 6: the embedding phase's cost."""
        matmul = [p for name, p in self.named_parameters() if name != "gpt_neox.embed_in.weight"
                  or self.config.tie_word_embeddings]
        N = sum(p.numel() for p in matmul)
        N_frozen = sum(p.numel() for p in matmul if not p.requires_grad)
        return 6 * N - 2 * N_frozen + 12 * self.config.n_layer * self.config.n_embd * T

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_token_id=None):
        """Sample continuations of idx (B, T): no KV cache, the context cropped to block_size. temperature=0 is
        greedy. Stops early once every row has produced eos_token_id."""
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, nxt), dim=1)
            if eos_token_id is not None:
                done |= nxt.squeeze(1) == eos_token_id
                if done.all():
                    break
        return idx

    # ---- HF-format loading and saving

    @classmethod
    def from_pretrained(cls, name_or_path, revision=None, dtype=None, device=None):
        """Load a HF-format GPT-NeoX: a local directory or a hub id (revision e.g. 'step143000'). Weights from
        safetensors (single or sharded), else pytorch_model*.bin (weights_only). dtype defaults to float32 (the
        master weights a trainer wants); 'auto' keeps the checkpoint's."""
        path = resolve_model_dir(name_or_path, revision)
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise UserError(f"{path}: no config.json (expected a Hugging Face model directory)")
        config = GPTConfig.from_hf(read_json(config_file), source=config_file)
        state = load_state_dict(path)
        if dtype == "auto":
            dtype = next(iter(state.values())).dtype if state else torch.float32
        elif isinstance(dtype, str):  # "bfloat16", "float16", ...
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise UserError(f"dtype={dtype!r} is not a torch dtype (float32, bfloat16, float16, or 'auto')")
            dtype = getattr(torch, dtype)
        with torch.device("meta"):
            model = cls(config)
        check_state_dict(model, state, path)
        model.load_state_dict(state, strict=False, assign=True)  # strictness checked above, with better messages
        if config.tie_word_embeddings:
            model.embed_out.weight = model.gpt_neox.embed_in.weight
        return model.to(device=device, dtype=dtype or torch.float32)

    def save_pretrained(self, path):
        """Write config.json and model.safetensors (each atomically) in the model's current dtype."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("embed_out.weight")  # stored once, as transformers does for tied weights
        dtype = self.gpt_neox.embed_in.weight.dtype
        with atomic_path(os.path.join(path, "model.safetensors")) as tmp:
            save_file(state, tmp, metadata={"format": "pt"})
        write_json(os.path.join(path, "config.json"), self.config.to_hf(dtype))


def load_state_dict(path):
    """All weights of a HF-format directory: safetensors first (single or sharded), then pytorch_model*.bin."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def shards(index_name, single_name):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            return [os.path.join(path, f) for f in sorted(set(read_json(index).get("weight_map", {}).values()))]
        single = os.path.join(path, single_name)
        return [single] if os.path.isfile(single) else []

    state = {}
    if files := shards("model.safetensors.index.json", "model.safetensors"):
        for f in files:
            try:
                state.update(load_file(f))
            except (SafetensorError, OSError) as e:
                raise UserError(f"{f}: cannot read safetensors ({e})") from None
    elif files := shards("pytorch_model.bin.index.json", "pytorch_model.bin"):
        for f in files:
            try:
                state.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:  # torch raises several types for truncated or foreign pickles
                raise UserError(f"{f}: cannot read PyTorch weights ({str(e).splitlines()[0]})") from None
    else:
        raise UserError(f"{path}: no weights (expected model.safetensors, model.safetensors.index.json or "
                        "pytorch_model.bin)")
    return {k: v for k, v in state.items() if not k.endswith(LEGACY_BUFFERS)}


def check_state_dict(model, state, source, limit=8):
    """Strict key and shape check with an error that names the missing, unexpected and mis-shaped keys."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("embed_out.weight")
        state.pop("embed_out.weight", None)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [f"{k} {tuple(state[k].shape)} (config expects {tuple(expected[k])})"
              for k in sorted(expected.keys() & state.keys()) if state[k].shape != expected[k]]
    problems = [f"{name}: {', '.join(keys[:limit])}{f' and {len(keys) - limit} more' if len(keys) > limit else ''}"
                for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("wrong shapes", shapes)) if keys]
    if problems:
        raise UserError(f"{source}: weights do not match config.json; " + "; ".join(problems))
