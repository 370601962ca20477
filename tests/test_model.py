"""model.py against transformers' GPTNeoXForCausalLM, the independent reference."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_neox, make_hub_cache, run_py

from common import UserError
from model import GPTNeoX, GPTNeoXConfig


def compare(ours, ref, vocab_size, T=37, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab_size, (B, T), generator=g)
    targets = torch.randint(0, vocab_size, (B, T), generator=g)
    targets[0, :5] = -100
    with torch.no_grad():
        logits, loss = ours(idx)[0], ours(idx, targets)[1]
        out = ref(input_ids=idx)
        ref_loss = torch.nn.functional.cross_entropy(out.logits.view(-1, vocab_size), targets.view(-1), ignore_index=-100)
    assert logits.shape == (B, T, vocab_size)
    return (logits - out.logits).abs().max().item(), abs(loss.item() - ref_loss.item())


@pytest.mark.parametrize("kw", [
    dict(rotary_pct=0.25, hidden_size=128, num_attention_heads=2),  # head_dim 64, Pythia-70m..410m layout
    dict(rotary_pct=0.25, hidden_size=256, num_attention_heads=1),  # head_dim 256, the Pythia-1b layout
    dict(rotary_pct=1.0, hidden_size=128, num_attention_heads=2, use_parallel_residual=False),
    dict(rotary_pct=0.25, hidden_size=256, num_attention_heads=1, use_parallel_residual=False, vocab_size=997),
    dict(rotary_pct=0.5, hidden_size=128, num_attention_heads=2, attention_bias=False, rotary_emb_base=500.0),
])
def test_logits_match_transformers(tmp_path, kw):
    ref = hf_neox(**kw)
    ref.save_pretrained(tmp_path)
    ours = GPTNeoX.from_pretrained(str(tmp_path)).eval()
    max_diff, loss_diff = compare(ours, ref, ref.config.vocab_size)
    print(f"max |logits diff| = {max_diff:.2e}")
    assert max_diff <= 1e-4
    assert loss_diff <= 1e-5


def test_parameter_names_are_hf_keys(tiny_hf_dir):
    path, ref = tiny_hf_dir
    ours = GPTNeoX.from_pretrained(str(path))
    from safetensors.torch import load_file
    assert set(ours.state_dict()) == set(load_file(path / "model.safetensors"))
    assert "gpt_neox.layers.1.attention.query_key_value.weight" in ours.state_dict()


def test_sharded_safetensors_and_bin(tmp_path):
    ref = hf_neox()
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert compare(GPTNeoX.from_pretrained(str(tmp_path / "sharded")), ref, 1001)[0] <= 1e-4

    # the legacy .bin format, with the old persistent buffers that must be dropped
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    state = dict(ref.state_dict())
    state.pop("lm_head.weight", None)
    state["embed_out.weight"] = ref.get_output_embeddings().weight.detach().clone()
    for i in range(2):
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(4)
    torch.save(state, bin_dir / "pytorch_model.bin")
    assert compare(GPTNeoX.from_pretrained(str(bin_dir)), ref, 1001)[0] <= 1e-4


def test_save_pretrained_loads_in_transformers(tmp_path, tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    path, ref = tiny_hf_dir
    ours = GPTNeoX.from_pretrained(str(path)).eval()
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForCausalLM"] and config["rotary_pct"] == 0.25
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert compare(ours, back, 1001)[0] <= 1e-5
    assert not [f for f in os.listdir(tmp_path / "ours") if f.startswith(".tmp")]


def test_tied_embeddings_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    ref = hf_neox(tie_word_embeddings=True)
    ref.save_pretrained(tmp_path / "ref")
    ours = GPTNeoX.from_pretrained(str(tmp_path / "ref")).eval()
    assert ours.embed_out.weight is ours.gpt_neox.embed_in.weight
    assert compare(ours, ref, 1001)[0] <= 1e-4
    ours.save_pretrained(tmp_path / "ours")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert compare(ours, back, 1001)[0] <= 1e-5


def test_dtype_and_config_variants(tiny_hf_dir):
    path, _ = tiny_hf_dir
    assert GPTNeoX.from_pretrained(str(path), dtype=torch.bfloat16).embed_out.weight.dtype == torch.bfloat16
    hf = json.loads((path / "config.json").read_text())
    # the v5 naming (rope_parameters) and the classic one give the same config
    classic = {k: v for k, v in hf.items() if k != "rope_parameters"}
    classic.update(rotary_pct=hf["rope_parameters"]["partial_rotary_factor"],
                   rotary_emb_base=hf["rope_parameters"]["rope_theta"])
    assert GPTNeoXConfig.from_hf(hf) == GPTNeoXConfig.from_hf(classic)
    assert GPTNeoXConfig.from_hf(GPTNeoXConfig.from_hf(hf).to_hf()) == GPTNeoXConfig.from_hf(hf)


def test_rotary_keys_read_as_transformers_reads_them(tiny_hf_dir):
    """Partial, conflicting or missing rotary keys: the same rotary fraction and base as transformers' config."""
    import transformers

    hf = json.loads((tiny_hf_dir[0] / "config.json").read_text())
    bare = {k: v for k, v in hf.items() if k not in ("rope_parameters", "rotary_pct", "rotary_emb_base")}
    variants = [bare, dict(bare, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
                dict(bare, rotary_pct=0.5, rotary_emb_base=77.0),
                dict(bare, rotary_pct=0.5, rope_parameters={"rope_type": "default", "partial_rotary_factor": 1.0})]
    for variant in variants:
        ref = transformers.GPTNeoXConfig(**variant).rope_parameters
        ours = GPTNeoXConfig.from_hf(variant)
        assert (ours.rotary_pct, ours.rotary_base) == (ref["partial_rotary_factor"], ref["rope_theta"]), variant


def test_hub_path_offline(tmp_path, tiny_hf_dir):
    """A hub id resolves through the real huggingface_hub calls against a hub-layout cache, revisions included."""
    path, ref = tiny_hf_dir
    cache = tmp_path / "hub"
    make_hub_cache(cache, "EleutherAI/pythia-tiny", path, revision="main", commit="a" * 40)
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    # an older revision with only a .bin file (as old Pythia step branches have)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((path / "config.json").read_text())
    state = {k if k != "lm_head.weight" else "embed_out.weight": v for k, v in ref.state_dict().items()}
    torch.save({k: v * 0 for k, v in state.items()}, old / "pytorch_model.bin")
    make_hub_cache(cache, "EleutherAI/pythia-tiny", old, revision="step1000", commit="b" * 40)
    code = ("import torch; from model import GPTNeoX\n"
            "m = GPTNeoX.from_pretrained('EleutherAI/pythia-tiny')\n"
            "ref = torch.load(r'%s')\n"
            "assert torch.equal(m.gpt_neox.embed_in.weight, ref['gpt_neox.embed_in.weight'])\n"
            "old = GPTNeoX.from_pretrained('EleutherAI/pythia-tiny', revision='step1000')\n"
            "assert old.gpt_neox.embed_in.weight.abs().sum() == 0\n"
            "print('ok')" % (tmp_path / "ref.pt"))
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    r = run_py(["-c", code], env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    r = run_py(["-c", "from common import run_cli; from model import GPTNeoX; run_cli(lambda a: GPTNeoX.from_pretrained('EleutherAI/nope'))"],
               env=env)
    assert r.returncode == 1 and "EleutherAI/nope" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name,layers,width,heads,total", [
    ("70m", 6, 512, 8, 70_426_624), ("160m", 12, 768, 12, 162_322_944),
    ("410m", 24, 1024, 16, 405_334_016), ("1b", 16, 2048, 8, 1_011_781_632),
])
def test_pythia_parameter_counts(name, layers, width, heads, total):
    with torch.device("meta"):
        model = GPTNeoX(GPTNeoXConfig(vocab_size=50304, n_layer=layers, n_embd=width, n_head=heads, intermediate_size=4 * width))
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 2 * 50304 * width
    N = total - 50304 * width
    assert model.flops_per_token(2048) == 6 * N + 12 * layers * width * 2048


def test_generate_greedy_matches_argmax(tiny_hf_dir):
    path, _ = tiny_hf_dir
    model = GPTNeoX.from_pretrained(str(path)).eval()
    idx = torch.tensor([[1, 2, 3]])
    out = model.generate(idx, 5, temperature=0)
    assert out.shape == (1, 8)
    logits, _ = model(out[:, :-1])
    assert torch.equal(logits.argmax(-1)[0, 2:], out[0, 3:])
    torch.manual_seed(0)
    sampled = model.generate(idx, 4, temperature=1.0, top_k=1)
    assert torch.equal(sampled, out[:, :7])  # top_k=1 is greedy


def test_bad_inputs(tmp_path, tiny_hf_dir):
    path, ref = tiny_hf_dir
    with pytest.raises(UserError, match="no config.json"):
        GPTNeoX.from_pretrained(str(tmp_path))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="model_type 'gpt2'.*supported.*gpt_neox"):
        GPTNeoX.from_pretrained(str(gpt2))
    with pytest.raises(UserError, match="no weights"):
        (tmp_path / "noweights").mkdir()
        (tmp_path / "noweights" / "config.json").write_text((path / "config.json").read_text())
        GPTNeoX.from_pretrained(str(tmp_path / "noweights"))

    from safetensors.torch import load_file, save_file
    state = load_file(path / "model.safetensors")

    def broken(name, change):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((path / "config.json").read_text())
        s = dict(state)
        change(s)
        save_file(s, d / "model.safetensors")
        return str(d)

    with pytest.raises(UserError, match=r"missing keys: gpt_neox.layers.1.mlp.dense_4h_to_h.bias"):
        GPTNeoX.from_pretrained(broken("missing", lambda s: s.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.bias")))
    with pytest.raises(UserError, match=r"unexpected keys: gpt_neox.layers.7.foo"):
        GPTNeoX.from_pretrained(broken("unexpected", lambda s: s.update({"gpt_neox.layers.7.foo": torch.zeros(1)})))
    with pytest.raises(UserError, match=r"wrong shapes: embed_out.weight \(1000, 64\) \(config expects \(1001, 64\)\)"):
        GPTNeoX.from_pretrained(broken("shape", lambda s: s.update({"embed_out.weight": s["embed_out.weight"][:1000]})))
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "config.json").write_text((path / "config.json").read_text())
    (tmp_path / "trunc" / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(UserError, match="cannot read safetensors"):
        GPTNeoX.from_pretrained(str(tmp_path / "trunc"))
    with pytest.raises(UserError, match="no such directory"):
        GPTNeoX.from_pretrained(str(tmp_path / "does-not-exist"))


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_training_loss_in_chunks_equals_the_full_logits_loss_and_holds_no_full_logits(monkeypatch, family):
    """With targets the head computes the loss chunk by chunk (model.Head): the loss and every gradient equal
    cross-entropy over the full logits, and nothing the backward keeps has a row per position and a column per token
    beyond one chunk's."""
    import model as model_module
    from conftest import hf_llama
    from model import Llama, LlamaConfig

    torch.manual_seed(0)
    V, B, T, chunk = 1001, 3, 37, 16
    ours = GPTNeoX(GPTNeoXConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32, intermediate_size=64)) \
        if family == "gpt_neox" else Llama(LlamaConfig.from_hf(hf_llama("llama", vocab_size=V).config.to_dict()))
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    targets[0, :5] = -100

    full = F.cross_entropy(ours(idx)[0].view(-1, V), targets.view(-1), ignore_index=-100)
    full.backward()
    want = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad(set_to_none=True)

    monkeypatch.setattr(model_module, "LOSS_CHUNK_TOKENS", chunk)  # 111 positions: 7 chunks, the last one short
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        logits, loss = ours(idx, targets)
    loss.backward()
    assert logits is None
    torch.testing.assert_close(loss, full, rtol=1e-6, atol=1e-6)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not [s for s in saved if len(s) and s[-1] == V and s.numel() > chunk * V]  # no (B, T, V) or (B * T, V) kept
