"""model.py's Llama family (llama, mistral, qwen2, qwen3) against transformers' LlamaForCausalLM,
MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM, the independent reference."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import LLAMA_CLASSES, hf_llama

from common import UserError
from model import CausalLM, Llama, LlamaConfig, config_from_dict, config_from_hf, model_from_config, tied_keys

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)  # with head_dim 16: frequencies kept, smoothed and divided

CASES = {  # name -> (model_type, hf_llama keywords); T = 37 positions in the comparisons
    "llama-gqa": ("llama", dict(rope_theta=500000.0)),
    "llama-tied-mha-biases": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4, attention_bias=True,
                                            mlp_bias=True)),
    "llama-llama3-rope": ("llama", dict(rope_parameters=LLAMA3_ROPE, num_key_value_heads=1)),
    "mistral-window-8": ("mistral", dict(sliding_window=8)),
    "mistral-window-covers": ("mistral", dict(sliding_window=64)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-window-layer-1": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3-head-dim-32": ("qwen3", dict(head_dim=32)),  # n_head * head_dim = 128 != hidden 64
    "qwen3-tied-biases": ("qwen3", dict(head_dim=32, attention_bias=True, tie_word_embeddings=True)),
}


def batch(vocab_size=1001, B=3, T=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab_size, (B, T), generator=g)
    targets = torch.randint(0, vocab_size, (B, T), generator=g)
    targets[0, :5] = -100
    return idx, targets


def loaded(ref, path):
    ref.save_pretrained(path)
    return CausalLM.from_pretrained(str(path)).eval()


def max_logits_diff(ours, ref):
    idx, _ = batch(ref.config.vocab_size)
    with torch.no_grad():
        return (ours(idx)[0] - ref(input_ids=idx).logits).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_logits_loss_and_gradients_match_transformers(tmp_path, case):
    model_type, kw = CASES[case]
    ref = hf_llama(model_type, **kw)
    ours = loaded(ref, tmp_path)
    assert isinstance(ours, Llama) and ours.config.model_type == model_type
    idx, targets = batch()
    logits, loss = ours(idx)[0].detach(), ours(idx, targets)[1]
    ref_logits = ref(input_ids=idx).logits
    ref_loss = F.cross_entropy(ref_logits.view(-1, 1001), targets.view(-1), ignore_index=-100)
    loss.backward()
    ref_loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters()}
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert grads.keys() == ref_grads.keys()
    grad_diff = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
    logits_diff = (logits - ref_logits.detach()).abs().max().item()
    print(f"{case}: max |logits diff| = {logits_diff:.2e}, |loss diff| = {abs(loss.item() - ref_loss.item()):.2e}, "
          f"max |grad diff| = {grad_diff:.2e}")
    assert logits_diff <= 1e-4
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["llama-tied-mha-biases", "llama-llama3-rope", "mistral-window-8",
                                  "qwen2-window-layer-1", "qwen3-tied-biases"])
def test_round_trips_with_transformers(tmp_path, case):
    """transformers saves -> ours loads (the keys those of the file) -> ours saves -> transformers loads the same
    architecture, config and logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_type, kw = CASES[case]
    ref = hf_llama(model_type, **kw)
    ours = loaded(ref, tmp_path / "ref")
    file_keys = set(load_file(tmp_path / "ref" / "model.safetensors"))
    assert set(ours.state_dict()) - set(tied_keys(ours)) == file_keys
    assert ours.tied == ref.config.tie_word_embeddings
    if ours.tied:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight and "lm_head.weight" not in file_keys
    ours.save_pretrained(tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == file_keys
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back).__name__ == LLAMA_CLASSES[model_type] + "ForCausalLM"
    for key in ("num_key_value_heads", "rope_parameters", "tie_word_embeddings", "sliding_window",
                "layer_types", "attention_bias", "mlp_bias"):
        assert getattr(back.config, key, None) == getattr(ref.config, key, None), key
    assert max_logits_diff(ours, back) <= 1e-5
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config_from_hf(saved) == ours.config


def as_transformers_builds_it(hf, T=40):
    """What transformers builds from a config.json dict: its parameter shapes (biases, q/k norms, head_dim, kv
    heads), rotary tables, norm eps, sliding window per layer and the ids, from a model built on it."""
    import transformers

    cfg = getattr(transformers, LLAMA_CLASSES[hf["model_type"]] + "Config")(**hf)
    model = getattr(transformers, LLAMA_CLASSES[hf["model_type"]] + "ForCausalLM")(cfg)
    positions = torch.arange(T)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    return dict(shapes={k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied_keys(model)},
                cos=cos[0], sin=sin[0], eps=model.model.layers[0].input_layernorm.variance_epsilon,
                windows=[getattr(layer.self_attn, "sliding_window", getattr(cfg, "sliding_window", None))
                         for layer in model.model.layers],
                ids=(cfg.bos_token_id, eos, cfg.max_position_embeddings, cfg.tie_word_embeddings))


def as_we_build_it(hf, T=40):
    model = model_from_config(config_from_hf(hf))
    c = model.config
    cos, sin = model.rotary_tables(T, "cpu")
    return dict(shapes={k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied_keys(model)},
                cos=cos, sin=sin, eps=model.model.layers[0].input_layernorm.eps,
                windows=[layer.self_attn.window for layer in model.model.layers],
                ids=(c.bos_token_id, c.eos_token_id, c.block_size, c.tie_word_embeddings))


REQUIRED = dict(vocab_size=1000, hidden_size=256, intermediate_size=96, num_hidden_layers=3, num_attention_heads=32)
LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)


@pytest.mark.parametrize("hf", [
    *[dict(REQUIRED, model_type=t) for t in LLAMA_CLASSES],  # each family's defaults for absent keys
    dict(REQUIRED, model_type="llama", rope_theta=500000.0, rope_scaling=LLAMA31_ROPE,  # Llama-3.1's hub file
         max_position_embeddings=131072, num_key_value_heads=2, eos_token_id=[7, 8], tie_word_embeddings=True),
    dict(REQUIRED, model_type="llama", rope_parameters=dict(LLAMA31_ROPE, rope_theta=500000.0)),  # as v5 writes it
    dict(REQUIRED, model_type="llama", rope_theta=3.0, rope_parameters={"rope_type": "default", "rope_theta": 7.0}),
    dict(REQUIRED, model_type="llama", rope_scaling={"type": "llama3", **{k: v for k, v in LLAMA31_ROPE.items()
                                                                         if k != "rope_type"}}),
    dict(REQUIRED, model_type="llama", attention_bias=True, mlp_bias=True, head_dim=32, rms_norm_eps=1e-5),
    dict(REQUIRED, model_type="mistral", sliding_window=None),  # Mistral v0.3
    dict(REQUIRED, model_type="mistral", sliding_window=16, attention_bias=True),  # mistral ignores attention_bias
    dict(REQUIRED, model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1,
         attention_bias=True),  # qwen2 ignores attention_bias (its q/k/v biases are always there)
    dict(REQUIRED, model_type="qwen2", use_sliding_window=False, sliding_window=16, max_window_layers=1),
    dict(REQUIRED, model_type="qwen3", use_sliding_window=True, sliding_window=16,
         layer_types=["full_attention", "full_attention", "sliding_attention"]),
    dict(REQUIRED, model_type="qwen3", head_dim=16, attention_bias=True, mlp_bias=True, bos_token_id=5),
])
def test_config_keys_read_as_transformers_reads_them(hf):
    ref, ours = as_transformers_builds_it(json.loads(json.dumps(hf))), as_we_build_it(hf)
    for key in ("cos", "sin"):
        torch.testing.assert_close(ours.pop(key), ref.pop(key), rtol=0, atol=1e-6)
    assert ours == ref


def test_config_from_dict_scratch_init_and_new_embeddings():
    """Checkpoints store asdict(config): it rebuilds the config of every family; a model built from it starts as
    transformers inits one; with_embeddings keeps the body and the family."""
    for model_type, kw in [("llama", dict(attention_bias=True, mlp_bias=True, rope_scaling=dict(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64))),
            ("mistral", dict(sliding_window=16)), ("qwen2", dict(tie_word_embeddings=True)),
            ("qwen3", dict(head_dim=32, sliding_window=8, max_window_layers=1))]:
        config = LlamaConfig(model_type=model_type, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                             intermediate_size=96, block_size=64, **kw)
        assert config_from_dict(dataclasses.asdict(config)) == config
        assert config_from_dict(json.loads(json.dumps(dataclasses.asdict(config)))) == config
        torch.manual_seed(0)
        model = model_from_config(config)
        assert type(model) is Llama
        for name, p in model.named_parameters():
            if "norm" in name:
                assert torch.equal(p, torch.ones_like(p)), name
            elif name.endswith("bias"):
                assert torch.equal(p, torch.zeros_like(p)), name
            else:
                assert abs(p.std().item() - 0.02) < 0.003 and abs(p.mean().item()) < 0.003, name
        assert any(n.endswith("q_proj.bias") for n, _ in model.named_parameters()) == (model_type in ("llama", "qwen2"))
        assert any(n.endswith("q_norm.weight") for n, _ in model.named_parameters()) == (model_type == "qwen3")
        new = model.with_embeddings(torch.randn(500, 64), None if model.tied else torch.randn(500, 64))
        assert type(new) is Llama and new.config == dataclasses.replace(config, vocab_size=500)
        assert torch.equal(new.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)
        idx = torch.randint(0, 500, (2, 20))
        assert new(idx)[0].shape == (2, 20, 500)


def hand_count(V, d, inter, L, n_head, n_kv, hd, tied, qk_norm=False):
    """Parameters by hand: per layer q, k, v (n_kv heads), o, the three SwiGLU matrices and two RMSNorms (qwen3:
    two more of head_dim); the final norm, the embedding and, untied, the head."""
    per_layer = d * n_head * hd + 2 * d * n_kv * hd + n_head * hd * d + 3 * d * inter + 2 * d + 2 * hd * qk_norm
    return L * per_layer + d + V * d * (1 if tied else 2)


@pytest.mark.parametrize("name,shape,total", [
    ("Llama-3.2-1B", dict(model_type="llama", vocab_size=128256, n_embd=2048, intermediate_size=8192, n_layer=16,
                          n_head=32, n_kv_head=8, tie_word_embeddings=True), 1_235_814_400),
    ("Llama-3.1-8B", dict(model_type="llama", vocab_size=128256, n_embd=4096, intermediate_size=14336, n_layer=32,
                          n_head=32, n_kv_head=8), 8_030_261_248),
    ("Qwen3-0.6B", dict(model_type="qwen3", vocab_size=151936, n_embd=1024, intermediate_size=3072, n_layer=28,
                        n_head=16, n_kv_head=8, head_dim=128, tie_word_embeddings=True), 596_049_920),
])
def test_parameter_counts_and_flops_count_gqa_and_swiglu(name, shape, total):
    with torch.device("meta"):
        model = Llama(LlamaConfig(**shape))
    c = model.config
    assert model.num_params(non_embedding=False) == total == hand_count(
        c.vocab_size, c.n_embd, c.intermediate_size, c.n_layer, c.n_head, c.n_kv_head, c.head_dim,
        c.tie_word_embeddings, qk_norm=c.model_type == "qwen3")
    T = 2048
    N = total - (0 if c.tie_word_embeddings else c.vocab_size * c.n_embd)  # the input lookup is no matmul
    assert model.flops_per_token(T) == 6 * N + 12 * c.n_layer * c.n_head * c.head_dim * T
    model.model.embed_tokens.weight.requires_grad_(False)
    frozen = c.vocab_size * c.n_embd if c.tie_word_embeddings else 0  # tied: the frozen matrix is also the head
    assert model.flops_per_token(T) == 6 * N - 2 * frozen + 12 * c.n_layer * c.n_head * c.head_dim * T


def write_config(tmp_path, name, hf):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(hf))
    return str(tmp_path / name)


def test_bad_inputs(tmp_path):
    good = dict(REQUIRED, model_type="llama")
    with pytest.raises(UserError, match=r"model_type 'gemma' .*not supported.*gpt_neox, llama, mistral, qwen2, qwen3"):
        CausalLM.from_pretrained(write_config(tmp_path, "gemma", dict(good, model_type="gemma")))
    for rope_type in ("yarn", "longrope", "dynamic", "linear"):
        with pytest.raises(UserError, match=rf"config.json: rope type '{rope_type}' is not supported "
                                            r"\(supported: default, llama3\)"):
            CausalLM.from_pretrained(write_config(tmp_path, rope_type, dict(
                good, rope_scaling={"rope_type": rope_type, "factor": 4.0})))
    with pytest.raises(UserError, match=r"config.json: hidden_act='gelu' is not supported for llama "
                                        r"\(supported: silu\)"):
        config_from_hf(dict(good, hidden_act="gelu"))
    with pytest.raises(UserError, match=r"config.json: missing required key 'hidden_size'"):
        config_from_hf({k: v for k, v in good.items() if k != "hidden_size"})
    with pytest.raises(UserError, match=r"rope type 'llama3' without low_freq_factor"):
        config_from_hf(dict(good, rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}))
    with pytest.raises(UserError, match=r"partial_rotary_factor 0.5 is not supported for llama"):
        config_from_hf(dict(good, partial_rotary_factor=0.5))
    with pytest.raises(UserError, match=r"layer_types .* not supported"):
        config_from_hf(dict(good, model_type="qwen2", use_sliding_window=True, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"]))
    with pytest.raises(UserError, match=r"num_attention_heads=32 is not a multiple of num_key_value_heads=3"):
        config_from_hf(dict(good, num_key_value_heads=3))
    with pytest.raises(UserError, match=r"sliding_window=8 does not exist in transformers' llama"):
        LlamaConfig(sliding_window=8)
    with pytest.raises(UserError, match=r"attention_bias=True does not exist in transformers' mistral"):
        LlamaConfig(model_type="mistral", attention_bias=True)
    with pytest.raises(UserError, match=r"model_type 'gemma' is not supported"):
        config_from_dict(dict(model_type="gemma"))
