"""
The model families, exactly as Hugging Face transformers runs them, in one readable file: GPT-NeoX (Pythia) and the
Llama family (model_type llama, mistral, qwen2, qwen3: Llama 2/3.x, TinyLlama, SmolLM2, Mistral, Qwen2.5, Qwen3).

Each family is a `CausalLM`: it answers what the other tools ask of a model (its input and output embeddings and
whether they are tied, its blocks, its final norm, the names of its embedding parameters, its FLOPs per token), so
clp.py, train.py, eval.py and bench.py never name a family's keys. Parameter names are the family's HF checkpoint
keys, so state dicts round-trip 1:1: `from_pretrained` reads any HF-format directory or hub id of a supported
model_type (FAMILIES), `save_pretrained` writes one that transformers and lm-evaluation-harness load. The file reads
top to bottom: the two configs (how each reads and writes config.json), the pieces both families share (rotary
tables, causal attention), each family's block, then the models. The plumbing (hub resolution, atomic writes, JSON,
the one-line user error) lives in common.py.
"""

import glob
import math
import os
import dataclasses
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from common import UserError, atomic_path, read_json, resolve_model_dir, torch_dtype, write_json


ARCHITECTURES = {  # config.json's model_type -> its transformers class (config.json's architectures)
    "gpt_neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def hf_rope(hf, source, supported):
    """The rotary parameters of a config.json dict as transformers (v5) reads them: `rope_scaling` (as hub files of
    Llama-3.x have it), else `rope_parameters` (as v5 writes it); returns (that dict, its rope type), the type one of
    `supported`."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if any(isinstance(value, dict) for value in rope.values()):
        raise UserError(f"{source}: rotary parameters per layer type ({', '.join(rope)}) are not supported")
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type not in supported:
        raise UserError(f"{source}: rope type {rope_type!r} is not supported (supported: {', '.join(supported)})")
    return rope, rope_type


def first_id(value):
    """eos_token_id may be a list in some configs (Llama-3 instruct models); the first is the document end."""
    return value[0] if isinstance(value, list) else value


HF_NAMES = {  # GPTNeoXConfig field -> HF config.json key
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
class GPTNeoXConfig:
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
    model_type: str = "gpt_neox"

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

    @property
    def attention_width(self):
        """n_head * head_dim: the width of the attention scores' and values' matmuls (FLOPs)."""
        return self.n_embd

    @classmethod
    def from_hf(cls, hf, source="config.json"):
        """From a HF GPT-NeoX config dict; reads both the classic (rotary_pct, rotary_emb_base) and the newer
        rope_parameters naming."""
        rope, _ = hf_rope(hf, source, ("default",))
        # as transformers (v5) reads it: rope_parameters first, then the classic keys, then GPT-NeoX's defaults
        hf = dict(hf, rotary_pct=rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
                  rotary_emb_base=rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
        kw = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, hf_key in HF_NAMES.items():
            value = hf.get(hf_key)
            if value is None:
                if name in ("vocab_size", "n_layer", "n_head", "n_embd"):
                    raise UserError(f"{source}: missing required key {hf_key!r}")
                continue
            value = first_id(value)
            kw[name] = types[name](value) if types[name] in (int, float, bool) else value
        kw.setdefault("intermediate_size", 4 * kw["n_embd"])
        return cls(**kw)

    def to_hf(self, dtype=None):
        """The config.json dict: every field transformers needs, in both rotary namings (v4 and v5 read it)."""
        hf = {"architectures": [ARCHITECTURES["gpt_neox"]], "model_type": "gpt_neox"}
        hf.update({hf_key: getattr(self, name) for name, hf_key in HF_NAMES.items()})
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rotary_base,
                                 "partial_rotary_factor": self.rotary_pct}
        hf.update(attention_dropout=0.0, hidden_dropout=0.0, initializer_range=0.02, use_cache=True)
        if dtype is not None:
            hf["torch_dtype"] = str(dtype).removeprefix("torch.")
        return hf


LLAMA_HF_NAMES = {  # LlamaConfig field -> HF config.json key, the keys all four model_types read alike
    "vocab_size": "vocab_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
    "n_embd": "hidden_size",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "rms_norm_eps": "rms_norm_eps",
    "block_size": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
    "hidden_act": "hidden_act",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}
LLAMA_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
LLAMA_DEFAULTS = {  # what transformers' config class of each model_type takes for a key config.json leaves out
    "llama": dict(num_key_value_heads=None, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    "mistral": dict(num_key_value_heads=8, max_position_embeddings=131072, bos_token_id=1, eos_token_id=2,
                    sliding_window=4096),
    "qwen2": dict(num_key_value_heads=32, max_position_embeddings=32768, bos_token_id=None, eos_token_id=None,
                  sliding_window=4096, max_window_layers=28),
    "qwen3": dict(num_key_value_heads=32, head_dim=128, max_position_embeddings=32768, bos_token_id=None,
                  eos_token_id=None, sliding_window=4096, max_window_layers=28),
}
LLAMA_FLAGS = {  # LlamaConfig field -> the model_types whose transformers modeling has it (the others ignore the key)
    "attention_bias": ("llama", "qwen3"),
    "mlp_bias": ("llama",),
    "sliding_window": ("mistral", "qwen2", "qwen3"),
    "max_window_layers": ("qwen2", "qwen3"),
}
LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
SILU = ("silu", "swish")  # transformers' names of the one activation the family's SwiGLU uses


@dataclass
class LlamaConfig:
    """One architecture under four model_types: pre-norm blocks with RMSNorm, grouped-query attention with full
    rotary, a SwiGLU MLP. What tells them apart: qwen2 always has q/k/v biases (never on o); qwen3 normalises each
    head's q and k (RMSNorm) and sets head_dim apart from the width; llama may have biases on all four attention
    projections (attention_bias) and on the MLP (mlp_bias), qwen3 on the attention only; mistral none. mistral,
    qwen2 and qwen3 may attend within a sliding window."""
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None  # num_key_value_heads; None: n_head (no grouping)
    n_embd: int = 4096
    head_dim: int | None = None  # None: n_embd // n_head
    intermediate_size: int = 11008
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # rope type llama3 (Llama-3.1/3.2): the four LLAMA3_ROPE values; None: default
    block_size: int = 2048  # max_position_embeddings
    attention_bias: bool = False  # llama, qwen3: biases on q, k, v and o
    mlp_bias: bool = False  # llama: biases on gate, up and down
    sliding_window: int | None = None  # mistral, qwen2, qwen3: each position attends to itself and window-1 before
    max_window_layers: int = 0  # qwen2, qwen3: the layers below this index attend fully all the same
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    model_type: str = "llama"

    def __post_init__(self):
        model_type = self.model_type
        if model_type not in LLAMA_DEFAULTS:
            raise UserError(f"model_type {model_type!r} is not of the Llama family ({', '.join(LLAMA_DEFAULTS)})")
        if self.hidden_act not in SILU:
            raise UserError(f"hidden_act={self.hidden_act!r} is not supported for {model_type} (supported: silu)")
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_head % self.n_kv_head:
            raise UserError(f"num_attention_heads={self.n_head} is not a multiple of "
                            f"num_key_value_heads={self.n_kv_head}")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise UserError(f"hidden_size={self.n_embd} is not divisible by num_attention_heads={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} must be even (rotary pairs its channels)")
        if self.rope_scaling is not None and sorted(self.rope_scaling) != sorted(LLAMA3_ROPE):
            raise UserError(f"rope_scaling {self.rope_scaling} must hold exactly {', '.join(LLAMA3_ROPE)} "
                            "(rope type llama3)")
        for name, allowed in LLAMA_FLAGS.items():
            if getattr(self, name) and model_type not in allowed:
                raise UserError(f"{name}={getattr(self, name)} does not exist in transformers' {model_type} "
                                f"(only in {', '.join(allowed)})")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise UserError(f"sliding_window={self.sliding_window} must be at least 1")

    @property
    def qkv_bias(self):
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def qk_norm(self):
        return self.model_type == "qwen3"

    @property
    def attention_width(self):
        """n_head * head_dim (may differ from n_embd): the width of the attention scores' and values' matmuls."""
        return self.n_head * self.head_dim

    def window(self, layer):
        """The sliding window of this layer's attention, None where it attends to every earlier position."""
        return self.sliding_window if layer >= self.max_window_layers else None

    @classmethod
    def from_hf(cls, hf, source="config.json"):
        """From a HF config dict of any of the four model_types, every key read as transformers' config class of
        that model_type reads it (its defaults for absent keys; both rotary namings)."""
        model_type = hf["model_type"]
        defaults = LLAMA_DEFAULTS[model_type]
        for key in LLAMA_REQUIRED:
            if hf.get(key) is None:
                raise UserError(f"{source}: missing required key {key!r}")

        def read(key, default=None):
            return hf[key] if key in hf else defaults.get(key, default)

        kw = {name: read(hf_key) for name, hf_key in LLAMA_HF_NAMES.items() if hf_key in hf or hf_key in defaults}
        kw["eos_token_id"] = first_id(kw["eos_token_id"])
        rope, rope_type = hf_rope(hf, source, ("default", "llama3"))
        kw["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise UserError(f"{source}: partial_rotary_factor {partial} is not supported for {model_type} (only 1.0)")
        if rope_type == "llama3":
            missing = [k for k in LLAMA3_ROPE[:3] if k not in rope]
            if missing:
                raise UserError(f"{source}: rope type 'llama3' without {', '.join(missing)}")
            original = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
            kw["rope_scaling"] = dict({k: float(rope[k]) for k in LLAMA3_ROPE[:3]},
                                      original_max_position_embeddings=int(original or kw["block_size"]))
        for name in ("attention_bias", "mlp_bias"):
            if model_type in LLAMA_FLAGS[name]:
                kw[name] = bool(read(name, False))
        if model_type == "mistral":
            kw["sliding_window"] = read("sliding_window")
        elif model_type in ("qwen2", "qwen3") and read("use_sliding_window", False):
            kw["sliding_window"] = read("sliding_window")
            kw["max_window_layers"] = min(read("max_window_layers"), kw["n_layer"])
            layer_types = hf.get("layer_types")
            if layer_types is not None and kw["sliding_window"] is not None:
                full = next((i for i, t in enumerate(layer_types) if t != "full_attention"), len(layer_types))
                if layer_types != ["full_attention"] * full + ["sliding_attention"] * (kw["n_layer"] - full):
                    raise UserError(f"{source}: layer_types {layer_types} are not supported (supported: full "
                                    "attention in the first layers, sliding attention in all after them)")
                kw["max_window_layers"] = full
        try:
            return cls(model_type=model_type, **kw)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None

    def to_hf(self, dtype=None):
        """The config.json dict transformers loads as the same architecture, the rotary parameters in both namings
        (rope_theta + rope_scaling as v4 and the hub's Llama-3.x files have them, rope_parameters as v5 writes)."""
        hf = {"architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type}
        hf.update({hf_key: getattr(self, name) for name, hf_key in LLAMA_HF_NAMES.items()})
        rope_scaling = None if self.rope_scaling is None else {"rope_type": "llama3", **self.rope_scaling}
        hf.update(rope_theta=self.rope_theta, rope_scaling=rope_scaling,
                  rope_parameters={**(rope_scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta})
        hf.update({name: getattr(self, name) for name in ("attention_bias", "mlp_bias")
                   if self.model_type in LLAMA_FLAGS[name]})
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            hf.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                      max_window_layers=self.max_window_layers,
                      layer_types=["full_attention" if self.window(i) is None else "sliding_attention"
                                   for i in range(self.n_layer)])
        hf.update(attention_dropout=0.0, initializer_range=0.02, use_cache=True)
        if dtype is not None:
            hf["torch_dtype"] = str(dtype).removeprefix("torch.")
        return hf


# ---- the pieces both families share

def inverse_frequencies(dim, base, device=None):
    """Rotary frequencies of `dim` channels (dim/2 pairs) in fp32, as transformers computes them."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim))


def llama3_scaled(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama-3.1's long-context frequencies: wavelengths shorter than L/high_freq_factor stay, those longer than
    L/low_freq_factor are divided by factor, the ones between are interpolated (transformers' arithmetic)."""
    L = original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > L / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < L / high_freq_factor) * ~(wavelen > L / low_freq_factor)
    return torch.where(medium, smoothed, scaled)


def rotary_cos_sin(inv_freq, T):
    """cos and sin tables (T, 2 * len(inv_freq)) in fp32 for positions 0..T-1, rotate-half layout: cat(f, f)."""
    freqs = torch.outer(torch.arange(T, device=inv_freq.device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    """Rotate the first cos.shape[-1] channels of every head (rotate_half), pass the rest through."""
    rot = cos.shape[-1]
    if rot == 0:
        return x
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # fp32 tables, applied in the activations' dtype
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return rotated if x_pass.shape[-1] == 0 else torch.cat((rotated, x_pass), dim=-1)  # full rotary: no copy


def causal_attention(q, k, v, window=None):
    """Causal scaled dot-product attention of q (B, n_head, T, hd) over k and v (B, n_kv_head, T, hd), each group
    of n_head/n_kv_head query heads sharing one key/value head. window: each position sees itself and the window-1
    before it (a window covering T is plain causal attention). SDPA groups the heads itself only where no mask is
    given and hd <= 256: the flash kernel then reads the shared heads in place; anywhere else CUDA would fall back
    to the math kernel, so the heads are repeated first (the same numbers either way)."""
    T = q.shape[-2]
    mask = None
    if window is not None and window < T:
        pos = torch.arange(T, device=q.device)
        offset = pos[:, None] - pos[None, :]  # query minus key position
        mask = (offset >= 0) & (offset < window)
    groups = q.shape[1] // k.shape[1]
    grouped = groups > 1 and mask is None and q.shape[-1] <= 256
    if groups > 1 and not grouped:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    options = dict(is_causal=True) if mask is None else dict(attn_mask=mask)
    if grouped:
        options["enable_gqa"] = True  # only the options in use: bench.py stands in for SDPA with (q, k, v, is_causal)
    return F.scaled_dot_product_attention(q, k, v, **options)


class RMSNorm(nn.Module):
    """x / rms(x) * weight: the statistics in fp32, cast back to x's dtype before the weight (transformers'
    LlamaRMSNorm)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


# ---- GPT-NeoX's block: fused per-head qkv projection, partial rotary, LayerNorm, GELU MLP, parallel residual

class GPTNeoXAttention(nn.Module):
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
        y = causal_attention(q, k, v)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.n_embd, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.n_embd)
        self.approximate = GELU_APPROXIMATE[config.hidden_act]

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class GPTNeoXBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, x, cos, sin):
        a = self.attention(self.input_layernorm(x), cos, sin)
        if self.use_parallel_residual:  # Pythia: both branches read the same x
            return self.mlp(self.post_attention_layernorm(x)) + a + x
        a = a + x
        return self.mlp(self.post_attention_layernorm(a)) + a


# ---- the Llama family's block: separate q, k, v, o projections (k, v with n_kv_head heads), full rotary,
# RMSNorm, SwiGLU MLP, sequential residual

class LlamaAttention(nn.Module):
    def __init__(self, config, window):
        super().__init__()
        self.head_dim, self.window = config.head_dim, window
        width, kv_width = config.attention_width, config.n_kv_head * config.head_dim
        self.q_proj = nn.Linear(config.n_embd, width, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, kv_width, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, kv_width, bias=config.qkv_bias)
        self.o_proj = nn.Linear(width, config.n_embd, bias=config.attention_bias)
        # qwen3: each head's q and k normalised before the rotation
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = causal_attention(q, k, v, self.window)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, config, window=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, window)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


LEGACY_BUFFERS = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")  # in old checkpoints


LOSS_CHUNK_TOKENS = 2048  # positions whose logits a training loss holds at once (Head)


class Head(nn.Linear):
    """The output head (a Linear without bias: HF's embed_out / lm_head). Given targets it returns the mean
    cross-entropy (ignore index -100) instead of the logits: over chunks of LOSS_CHUNK_TOKENS positions, each chunk's
    logits recomputed in backward (torch.utils.checkpoint) rather than kept. The full logits and their fp32 softmax
    would live through the whole model's backward (about 5 GB at 8 x 2048 x 50,304), a chunk's is a transient
    fraction; the price is one more head matmul per chunk (none for a single chunk, whose logits are kept: no more
    than a recomputation would hold). One call of the module per forward, so FSDP and DDP hooks see it once."""

    def __init__(self, n_embd, vocab_size):
        super().__init__(n_embd, vocab_size, bias=False)

    def forward(self, x, targets=None):
        if targets is None:
            return F.linear(x, self.weight)
        x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
        if len(targets) <= LOSS_CHUNK_TOKENS:  # one chunk: what it keeps is what recomputing it would hold at once
            return self.chunk_loss(x, targets) / (targets != -100).sum()
        total = 0.0
        for xc, tc in zip(x.split(LOSS_CHUNK_TOKENS), targets.split(LOSS_CHUNK_TOKENS)):
            total = total + torch.utils.checkpoint.checkpoint(self.chunk_loss, xc, tc, use_reentrant=False)
        return total / (targets != -100).sum()

    def chunk_loss(self, x, targets):
        return F.cross_entropy(F.linear(x, self.weight).float(), targets, ignore_index=-100, reduction="sum")


def embedding(num_embeddings, dim):
    """nn.Embedding without its own random init (init_weights gives it transformers' off the meta device)."""
    return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))


class CausalLM(nn.Module):
    """What every family shares: the forward pass (embed, blocks, final norm, head), counting, generation, HF-format
    loading and saving. A family defines its modules with its HF names and answers the questions below; nothing
    outside model.py needs to know those names."""

    def input_embeddings(self):
        """The token embedding (nn.Embedding)."""
        raise NotImplementedError

    def output_embeddings(self):
        """The output head (nn.Linear without bias); when tied, its weight is the input embedding's."""
        raise NotImplementedError

    def blocks(self):
        """The transformer blocks (nn.ModuleList), each called as block(x, cos, sin)."""
        raise NotImplementedError

    def final_norm(self):
        raise NotImplementedError

    def rotary_tables(self, T, device):
        """cos and sin tables (T, rotary dims) in fp32 for positions 0..T-1."""
        raise NotImplementedError

    @property
    def tied(self):
        return self.config.tie_word_embeddings

    def embedding_parameter_names(self):
        """{'input': name, 'output': name} of the embedding weights in named_parameters() and the state dict; a tied
        head has no parameter of its own ('output' absent)."""
        names = {id(p): n for n, p in self.named_parameters()}  # a tied weight under its first name
        found = {"input": names[id(self.input_embeddings().weight)]}
        if not self.tied:
            found["output"] = names[id(self.output_embeddings().weight)]
        return found

    def tie_weights(self):
        """The head shares the input embedding's weight (after loading or to_empty, which allocate it twice)."""
        if self.tied:
            self.output_embeddings().weight = self.input_embeddings().weight

    def init_weights(self):
        """transformers' init, for training from scratch; nothing on the meta device, where weights are loaded later
        (a normal_ there imports torch._dynamo: seconds of a process that only loads a model, as clp.py and eval.py do)."""
        if self.input_embeddings().weight.device.type != "meta":
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        """transformers' init (used when training from scratch): N(0, 0.02) weights, zero biases, unit norms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        """(logits (B, T, V), None) for every position; with targets (B, T), (None, the mean cross-entropy, ignore
        index -100), computed without holding the full logits (Head)."""
        out = self.output_embeddings()(self.hidden_states(idx), targets)
        return (out, None) if targets is None else (None, out)

    def hidden_states(self, idx):
        """What the head reads (B, T, n_embd), after the final norm: for callers that need only some positions'
        logits (eval.py scores long windows without their full (T, V) logits)."""
        x = self.input_embeddings()(idx)
        cos, sin = self.rotary_tables(idx.shape[1], idx.device)
        for block in self.blocks():
            x = block(x, cos, sin)
        return self.final_norm()(x)

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding=True leaves out the input and output embeddings (the Pythia cards'
        convention)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(self.get_parameter(name).numel() for name in self.embedding_parameter_names().values())
        return n

    def flops_per_token(self, T):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12*L*T*(n_head*head_dim), N counting
        every matmul weight (all parameters but the input embedding, a lookup, unless the head shares it), the
        second term the attention scores and values. Frozen weights (requires_grad False) need no weight gradients,
        so they count 4 instead of 6: the embedding phase's cost. A sliding window counts as full attention: the
        masked kernel computes every score all the same."""
        lookup = None if self.tied else self.input_embeddings().weight
        matmul = [p for p in self.parameters() if p is not lookup]
        N = sum(p.numel() for p in matmul)
        N_frozen = sum(p.numel() for p in matmul if not p.requires_grad)
        return 6 * N - 2 * N_frozen + 12 * len(self.blocks()) * self.config.attention_width * T

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

    def with_embeddings(self, embed_in, embed_out=None, **config_changes):
        """A model of this family with this model's body and new embeddings (embed_out None: tied, or the head
        follows the input), its config changed as given (vocab_size follows embed_in); built without copying."""
        config = dataclasses.replace(self.config, vocab_size=embed_in.shape[0], **config_changes)
        with torch.device("meta"):
            model = type(self)(config)
        names = self.embedding_parameter_names()
        repeated = tied_keys(self)
        state = {k: v for k, v in self.state_dict().items() if k not in repeated}
        state[names["input"]] = embed_in
        if "output" in names:
            state[names["output"]] = embed_in if embed_out is None else embed_out
        model.load_state_dict(state, assign=True, strict=not model.tied)
        model.tie_weights()
        return model

    # ---- HF-format loading and saving

    @staticmethod
    def from_pretrained(name_or_path, revision=None, dtype=None, device=None):
        """Load a HF-format model of any supported family (config.json's model_type): a local directory or a hub id
        (revision e.g. 'step143000'). Weights from safetensors (single or sharded), else pytorch_model*.bin
        (weights_only). dtype defaults to float32 (the master weights a trainer wants); 'auto' keeps the
        checkpoint's."""
        path = resolve_model_dir(name_or_path, revision)
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise UserError(f"{path}: no config.json (expected a Hugging Face model directory)")
        config = config_from_hf(read_json(config_file), source=config_file)
        state = load_state_dict(path)
        if dtype == "auto":
            dtype = next(iter(state.values())).dtype if state else torch.float32
        elif isinstance(dtype, str):  # "bfloat16", "float16", ...
            dtype = torch_dtype(dtype)
        with torch.device("meta"):
            model = model_from_config(config)
        check_state_dict(model, state, path)
        model.load_state_dict(state, strict=False, assign=True)  # strictness checked above, with better messages
        model.tie_weights()
        return model.to(device=device, dtype=dtype or torch.float32)

    def save_pretrained(self, path):
        """Write config.json and model.safetensors (each atomically) in the model's current dtype."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        for key in tied_keys(self):
            state.pop(key)  # stored once, as transformers does for tied weights
        dtype = self.input_embeddings().weight.dtype
        with atomic_path(os.path.join(path, "model.safetensors")) as tmp:
            save_file(state, tmp, metadata={"format": "pt"})
        write_json(os.path.join(path, "config.json"), self.config.to_hf(dtype))


class GPTNeoX(CausalLM):
    """GPT-NeoX (Pythia): HF keys gpt_neox.* and embed_out."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gpt_neox = nn.ModuleDict(dict(
            embed_in=embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList([GPTNeoXBlock(config) for _ in range(config.n_layer)]),
            final_layer_norm=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
        ))
        self.embed_out = Head(config.n_embd, config.vocab_size)
        self.tie_weights()
        self.init_weights()

    def input_embeddings(self):
        return self.gpt_neox.embed_in

    def output_embeddings(self):
        return self.embed_out

    def blocks(self):
        return self.gpt_neox.layers

    def final_norm(self):
        return self.gpt_neox.final_layer_norm

    def rotary_tables(self, T, device):
        rot = int(self.config.head_dim * self.config.rotary_pct)
        return rotary_cos_sin(inverse_frequencies(rot, self.config.rotary_base, device), T)


class Llama(CausalLM):
    """The Llama family (model_type llama, mistral, qwen2, qwen3): HF keys model.* and lm_head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList([LlamaBlock(config, config.window(i)) for i in range(config.n_layer)]),
            norm=RMSNorm(config.n_embd, config.rms_norm_eps),
        ))
        self.lm_head = Head(config.n_embd, config.vocab_size)
        self.tie_weights()
        self.init_weights()

    def input_embeddings(self):
        return self.model.embed_tokens

    def output_embeddings(self):
        return self.lm_head

    def blocks(self):
        return self.model.layers

    def final_norm(self):
        return self.model.norm

    def rotary_tables(self, T, device):
        inv_freq = inverse_frequencies(self.config.head_dim, self.config.rope_theta, device)
        if self.config.rope_scaling is not None:
            inv_freq = llama3_scaled(inv_freq, **self.config.rope_scaling)
        return rotary_cos_sin(inv_freq, T)


FAMILIES = {  # config.json's model_type -> (config class, model class)
    "gpt_neox": (GPTNeoXConfig, GPTNeoX),
    **{model_type: (LlamaConfig, Llama) for model_type in LLAMA_DEFAULTS},
}


def config_from_hf(hf, source="config.json"):
    """The family's config from a HF config.json dict, by its model_type (else its architectures); an unsupported
    one is a UserError that lists the supported."""
    model_type = hf.get("model_type")
    if model_type is None:
        model_type = next((t for t, arch in ARCHITECTURES.items() if arch in hf.get("architectures", [])), None)
    if model_type not in FAMILIES:
        raise UserError(f"{source}: model_type {model_type!r} (architectures {hf.get('architectures')}) is not "
                        f"supported; model.py loads {', '.join(FAMILIES)}")
    return FAMILIES[model_type][0].from_hf(dict(hf, model_type=model_type), source=source)


def config_from_dict(d):
    """A config from its asdict() form (as checkpoints store it); a dict without model_type is GPT-NeoX's."""
    model_type = d.get("model_type", "gpt_neox")
    if model_type not in FAMILIES:
        raise UserError(f"model_type {model_type!r} is not supported; model.py builds {', '.join(FAMILIES)}")
    return FAMILIES[model_type][0](**d)


def model_from_config(config):
    """A randomly initialised model of the config's family (on the current default device)."""
    return FAMILIES[config.model_type][1](config)


def tied_keys(model):
    """State-dict keys that repeat another key's tensor (a tied head): left out of saved files."""
    seen, repeated = set(), []
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            repeated.append(key)
        seen.add(id(value))
    return repeated


def weight_files(path):
    """The weight files of a HF-format directory: safetensors first (the shards its index names, else every
    *.safetensors), then pytorch_model*.bin likewise. The one place that decides which files hold the weights."""
    def listed(index_name, pattern):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            return [os.path.join(path, f) for f in sorted(set(read_json(index).get("weight_map", {}).values()))]
        return sorted(glob.glob(os.path.join(path, pattern)))

    files = listed("model.safetensors.index.json", "*.safetensors") or listed("pytorch_model.bin.index.json",
                                                                              "pytorch_model*.bin")
    if not files:
        raise UserError(f"{path}: no weights (expected model.safetensors, model.safetensors.index.json or "
                        "pytorch_model.bin)")
    return files


def read_weights(file, keys=None):
    """The tensors of one weight file (safetensors, else a PyTorch pickle read weights_only), only `keys` when given
    (from safetensors those alone are read). Returns (tensors, the names of every tensor the file holds)."""
    if file.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(file, framework="pt") as f:
                names = list(f.keys())
                return {k: f.get_tensor(k) for k in names if keys is None or k in keys}, names
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file}: cannot read safetensors ({e})") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign pickles
        raise UserError(f"{file}: cannot read PyTorch weights ({str(e).splitlines()[0]})") from None
    return {k: v for k, v in state.items() if keys is None or k in keys}, list(state)


def load_state_dict(path):
    """All weights of a HF-format directory (see weight_files), without the buffers old checkpoints carry."""
    state = {}
    for file in weight_files(path):
        state.update(read_weights(file)[0])
    return {k: v for k, v in state.items() if not k.endswith(LEGACY_BUFFERS)}


def check_state_dict(model, state, source, limit=8):
    """Strict key and shape check with an error that names the missing, unexpected and mis-shaped keys."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    for key in tied_keys(model):  # a tied head may be stored or not
        expected.pop(key)
        state.pop(key, None)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [f"{k} {tuple(state[k].shape)} (config expects {tuple(expected[k])})"
              for k in sorted(expected.keys() & state.keys()) if state[k].shape != expected[k]]
    problems = [f"{name}: {', '.join(keys[:limit])}{f' and {len(keys) - limit} more' if len(keys) > limit else ''}"
                for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("wrong shapes", shapes)) if keys]
    if problems:
        raise UserError(f"{source}: weights do not match config.json; " + "; ".join(problems))
