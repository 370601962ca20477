"""
GPT-NeoX (the Pythia architecture), exactly as Hugging Face transformers runs it, in one readable file.

Parameter names are the HF checkpoint keys (gpt_neox.embed_in.weight, ..., embed_out.weight), so state dicts
round-trip 1:1: `GPT.from_pretrained` reads any HF-format GPT-NeoX directory or hub id, `save_pretrained` writes
one that transformers and lm-evaluation-harness load. The plumbing (hub resolution, atomic writes, JSON, the
one-line user error) lives in common.py.
"""

import glob
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, atomic_path, read_json, resolve_model_dir, torch_dtype, write_json


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
            dtype = torch_dtype(dtype)
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
