"""
The model families, exactly as Hugging Face transformers runs them, in one readable file: GPT-NeoX (Pythia).

Each family is a `CausalLM`: it answers what the other tools ask of a model (its input and output embeddings and
whether they are tied, its blocks, its final norm, the names of its embedding parameters, its FLOPs per token), so
clp.py, train.py, eval.py and bench.py never name a family's keys. Parameter names are the family's HF checkpoint
keys, so state dicts round-trip 1:1: `from_pretrained` reads any HF-format directory or hub id of a supported
model_type (FAMILIES), `save_pretrained` writes one that transformers and lm-evaluation-harness load. The plumbing
(hub resolution, atomic writes, JSON, the one-line user error) lives in common.py.
"""

import glob
import os
import dataclasses
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
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise UserError(f"{source}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported "
                            "(only the default rotary embedding)")
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
            if isinstance(value, list):  # eos_token_id may be a list in some configs; the first is the document end
                value = value[0]
            kw[name] = types[name](value) if types[name] in (int, float, bool) else value
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

    def forward(self, idx, targets=None):
        """Logits (B, T, V) for every position; with targets (B, T) also the mean cross-entropy (ignore index -100)."""
        x = self.input_embeddings()(idx)
        cos, sin = self.rotary_tables(idx.shape[1], idx.device)
        for block in self.blocks():
            x = block(x, cos, sin)
        logits = self.output_embeddings()(self.final_norm()(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

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
        so they count 4 instead of 6: the embedding phase's cost."""
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
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gpt_neox = nn.ModuleDict(dict(
            embed_in=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            final_layer_norm=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
        ))
        self.embed_out = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)

    def input_embeddings(self):
        return self.gpt_neox.embed_in

    def output_embeddings(self):
        return self.embed_out

    def blocks(self):
        return self.gpt_neox.layers

    def final_norm(self):
        return self.gpt_neox.final_layer_norm

    def rotary_tables(self, T, device):
        return rotary_cos_sin(self.config, T, device)

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


FAMILIES = {"gpt_neox": (GPTNeoXConfig, GPTNeoX)}  # config.json's model_type -> (config class, model class)


def config_from_hf(hf, source="config.json"):
    """The family's config from a HF config.json dict, by its model_type; an unsupported one is a UserError that
    lists the supported."""
    model_type = hf.get("model_type")
    if model_type is None and "GPTNeoXForCausalLM" in hf.get("architectures", []):
        model_type = "gpt_neox"
    if model_type not in FAMILIES:
        raise UserError(f"{source}: model_type {model_type!r} (architectures {hf.get('architectures')}) is not "
                        f"supported; model.py loads {', '.join(FAMILIES)}")
    return FAMILIES[model_type][0].from_hf(hf, source=source)


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
