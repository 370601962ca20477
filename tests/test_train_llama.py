"""train.py with the Llama family on the ELTeC corpus fixture: a tied Llama with grouped-query attention (the
Llama-3.2 / Qwen2.5-0.5B shape: one matrix is embedding and head) and an untied Qwen2 (q/k/v biases). The embedding
phase trains the one matrix (tied) or both (untied) and nothing else; a small embedding batch; resume; the hf/ export
loads in transformers as the same class with the same logits; DDP (untied) and FSDP2 (tied: the shared matrix sharded
once, trained once, exported tied), a sharded checkpoint killed mid-run and resumed; training from scratch."""

import json
import os

import pytest
import torch
from conftest import hf_llama, metrics, stop_by_sigterm_while_reading, train_args, weights
from safetensors.torch import load_file
from test_fsdp import LAUNCHER, torchrun

import train
from common import UserError, save_tokenizer
from model import CausalLM

# the embedding phase: 3 of 6 steps at a batch of 2 (the full phase: 4), a checkpoint at its end
PHASES = ("--max_iters=6", "--eval_interval=3", "--embedding_tuning_frac=0.5", "--embedding_batch_size=2")
FAMILIES = {  # name -> (hf_llama arguments, transformers class, the embedding parameters)
    "llama-tied": (dict(model_type="llama", tie_word_embeddings=True), "LlamaForCausalLM",
                   {"model.embed_tokens.weight"}),
    "qwen2-untied": (dict(model_type="qwen2"), "Qwen2ForCausalLM", {"model.embed_tokens.weight", "lm_head.weight"}),
}


@pytest.fixture(scope="module")
def inits(corpus, tmp_path_factory):
    """Each family's tiny init directory, saved by transformers (4 heads sharing 2 key/value heads), over the
    corpus's vocabulary and with its tokenizer."""
    import data

    vocab = data.load_meta(corpus / "data")["vocab_size"]
    out = {}
    for name, (kw, _, _) in FAMILIES.items():
        out[name] = tmp_path_factory.mktemp(name)
        hf_llama(vocab_size=vocab, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=64, **kw).save_pretrained(out[name])
        save_tokenizer(str(corpus / "init"), str(out[name]))
    return out


def run_args(corpus, init, out, *extra):
    return [*train_args(corpus, out, *extra), f"--init_from={init}"]


def assert_export_is_transformers(hf_dir, cls, tied):
    """hf/ loads in transformers as `cls` (tied: the head is the embedding, stored once) with our logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(ref).__name__ == cls
    assert (ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()) == tied
    assert ("lm_head.weight" in load_file(os.path.join(hf_dir, "model.safetensors"))) == (not tied)
    ids = AutoTokenizer.from_pretrained(hf_dir)("Der Bauer ging in den Wald.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(CausalLM.from_pretrained(str(hf_dir)).eval()(ids)[0], ref(ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_embedding_phase_resume_and_export(corpus, inits, family, tmp_path, monkeypatch):
    """Stopped by SIGTERM in the embedding phase: the checkpoint's body is bit-identical to the start, the embedding
    matrices moved and alone have optimizer state (tied: one); resumed across the switch, every parameter trains
    and the run ends with exactly the weights of an uninterrupted one, which exports as transformers' class. MFU
    counts the full phase's FLOPs by hand: 6 per matmul weight (tied: the embedding is the head's matmul; untied:
    the lookup is none) and the attention's 12 * L * n_head * head_dim * T."""
    kw, cls, embeddings = FAMILIES[family]
    init, tied = inits[family], kw.get("tie_word_embeddings", False)
    start = load_file(init / "model.safetensors")
    whole = run_args(corpus, init, tmp_path / "whole", *PHASES, "--device_peak_flops=1e12")
    train.main(whole)
    stopped = [a.replace("whole", "stopped") for a in whole]
    stop_by_sigterm_while_reading(monkeypatch, 2 * 4, lambda: train.main(stopped))  # during step 3 (4 blocks a step)
    ckpt = torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=True)
    assert (ckpt["step"], ckpt["phase"]) == (3, "embedding")
    for name, tensor in start.items():
        assert torch.equal(ckpt["model"][name], tensor) == (name not in embeddings), name
    assert len(ckpt["optimizer"]["state"]) == len(embeddings)
    if tied:
        assert torch.equal(ckpt["model"]["lm_head.weight"], ckpt["model"]["model.embed_tokens.weight"])

    train.main([*stopped, "--init_from=resume"])
    end, reference = weights(tmp_path / "stopped"), weights(tmp_path / "whole")
    assert end.keys() == start.keys()
    for name, tensor in end.items():
        assert not torch.equal(tensor, start[name]), f"{name} never trained"
        assert torch.equal(tensor, reference[name]), f"{name} differs from the uninterrupted run"
    assert_export_is_transformers(tmp_path / "whole" / "hf", cls, tied)

    c = json.loads((init / "config.json").read_text())
    d, V, L, T, hd = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], 32, d_head(c)
    n_kv, inter = c["num_key_value_heads"], c["intermediate_size"]
    matmul = L * (2 * d * 4 * hd + 2 * d * n_kv * hd + 3 * d * inter) + V * d  # q, o, k, v, SwiGLU; the head
    biases = L * (4 * hd + 2 * n_kv * hd) if family.startswith("qwen2") else 0
    norms = L * 2 * d + d
    flops = 6 * (matmul + biases + norms) + 12 * L * 4 * hd * T
    step = next(m for m in metrics(tmp_path / "whole") if m.get("phase") == "full" and "mfu" in m)
    assert step["mfu"] * 1e12 / step["tokens_per_s"] == pytest.approx(flops, rel=1e-9)


def d_head(c):
    return c["hidden_size"] // c["num_attention_heads"]


def test_from_scratch_in_the_llama_family(corpus, tmp_path):
    """init_from=scratch with the Llama keys: a tied GQA Llama whose export transformers loads as LlamaForCausalLM
    of that shape (the SwiGLU width 8/3 * n_embd rounded up to 64)."""
    train.main(train_args(corpus, tmp_path, "--init_from=scratch", "--model_type=llama", "--n_layer=1", "--n_head=4",
                          "--n_kv_head=2", "--n_embd=48", "--tie_word_embeddings=True", "--max_iters=2"))
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (c["model_type"], c["num_key_value_heads"], c["intermediate_size"], c["tie_word_embeddings"],
            c["vocab_size"]) == ("llama", 2, 128, True, 1280)
    assert_export_is_transformers(tmp_path / "hf", "LlamaForCausalLM", tied=True)
    with pytest.raises(UserError, match="num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        train.main(train_args(corpus, tmp_path / "bad", "--init_from=scratch", "--model_type=llama", "--n_head=4",
                              "--n_kv_head=3", "--n_embd=48"))


# 12 steps of 8 sequences (2 processes x 4), the first 6 in the embedding phase, a checkpoint every 3
DISTRIBUTED = ("--max_iters=12", "--eval_interval=3", "--embedding_tuning_frac=0.5")


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    path = tmp_path_factory.mktemp("launcher") / "launch_train.py"
    path.write_text(LAUNCHER)
    return path


def test_tied_llama_fsdp_through_a_kill_and_resume_matches_one_process(corpus, inits, launcher, tmp_path):
    """The tied Llama under FSDP2 on 2 processes (x 4 sequences), with activation checkpointing, compiled, killed
    (kill -9) in step 8 and resumed from its sharded checkpoint of step 6, ends where one process accumulating 2 x 4
    does: the same losses and weights (the one matrix sharded, reduced and trained once), the export tied and
    loaded by transformers; each rank held half the parameter bytes."""
    init = inits["llama-tied"]
    fsdp = [*run_args(corpus, init, tmp_path / "fsdp", *DISTRIBUTED), "--parallelism=fsdp",
            "--activation_checkpointing=True", "--compile=True"]
    r = torchrun(launcher, fsdp, env={"DIE_AT_POS": str(7 * 8)})
    assert r.returncode != 0 and sorted(os.listdir(tmp_path / "fsdp" / "ckpt")) == ["latest", "step-00000006"], \
        r.stderr[-3000:]
    r = torchrun(launcher, [*fsdp, "--init_from=resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    train.main(run_args(corpus, init, tmp_path / "single", *DISTRIBUTED))
    logs = {name: [m for m in metrics(tmp_path / name) if "lr" in m] for name in ("single", "fsdp")}
    assert [m["phase"] for m in logs["fsdp"]] == ["embedding"] * 6 + ["full"] * 6
    for a, b in zip(logs["single"], logs["fsdp"], strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
    single, fsdp_w = weights(tmp_path / "single"), weights(tmp_path / "fsdp")
    assert single.keys() == fsdp_w.keys() == load_file(init / "model.safetensors").keys()
    for name in single:
        torch.testing.assert_close(fsdp_w[name], single[name], rtol=1e-4, atol=1e-5)
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("single", "fsdp")]
    assert 0.45 < summaries[1]["rank0_param_bytes"] / summaries[0]["rank0_param_bytes"] < 0.6
    assert_export_is_transformers(tmp_path / "fsdp" / "hf", "LlamaForCausalLM", tied=True)


def test_untied_qwen2_ddp_matches_one_process(corpus, inits, launcher, tmp_path):
    """The untied Qwen2 under DDP (2 processes x 4 sequences): the ranks stay identical and the run ends where one
    process accumulating 2 x 4 does."""
    init = inits["qwen2-untied"]
    r = torchrun(launcher, run_args(corpus, init, tmp_path / "ddp", *DISTRIBUTED))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["ddp_ranks_identical"] is True
    train.main(run_args(corpus, init, tmp_path / "single", *DISTRIBUTED))
    single = weights(tmp_path / "single")
    for name, tensor in weights(tmp_path / "ddp").items():
        torch.testing.assert_close(tensor, single[name], rtol=1e-4, atol=1e-5)
