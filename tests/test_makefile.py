"""The Makefile's pipeline: `make train CONFIG=X` builds the init and the data that X names (when they are the
pipeline's outputs) and nothing else; `make eval` writes beside the model folder. Checked with make -n -B (nothing
runs but the config reading; -B: as if nothing were built yet)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make_n(*args):
    r = subprocess.run(["make", "--no-print-directory", "-n", "-B", *args, f"PY={sys.executable}"], cwd=ROOT,
                       text=True, capture_output=True)  # --no-print-directory: also when run under make test
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if not line.startswith("needs=")]  # the config-reading line


def test_make_train_builds_what_the_config_names():
    demo = "\n".join(make_n("train", "CONFIG=config/demo_target.py"))  # names its own init and data
    assert "clp.py" not in demo and "data.py" not in demo and "pythia" not in demo.lower()
    assert f"{sys.executable} train.py config/demo_target.py" in demo
    random_init = "\n".join(make_n("train", "CONFIG=config/oscar_de_random_init.py", "DATA_DIR=/nonexistent"))
    assert "--target_model_path out/pythia-410m-small_init-german" in random_init and "--random_init" in random_init
    assert "out/pythia-410m-clp-german" not in random_init  # the CLP init is not what it trains
    assert "data.py" not in random_init  # its data_dir (data/oscar_de) is not this DATA_DIR
    clp = "\n".join(make_n("train", "CONFIG=config/oscar_de_embedding_tuning.py", "ARGS=--init_from=scratch"))
    assert "clp.py" not in clp and "data.py" in clp


def test_make_eval_writes_beside_the_model_folder():
    for model in ("out/run/hf", "out/run/hf/"):
        assert "--output out/run/eval.json" in "\n".join(make_n("eval", f"MODEL={model}"))


def test_without_a_venv_the_machines_python3_runs_the_targets():
    """A GPU machine gets the checkout without .venv: the targets fall back to its own python3."""
    def dry(*args):
        r = subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=ROOT, text=True, capture_output=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert dry("gpu-check", "VENV=/nonexistent", "OUT=/tmp/x").strip() == "python3 gpu_check.py --out /tmp/x"
    assert dry("test-gpu", "VENV=/nonexistent").strip() == "python3 -m pytest -q -m gpu tests"


def test_make_train_builds_a_modern_sources_init():
    """The embedding-tuning regime from Qwen2.5-0.5B: make train with SOURCE_MODEL builds that source's CLP init
    (out/<name>-clp-german) before training; the default source's names are unchanged."""
    qwen = "\n".join(make_n("train", "CONFIG=config/oscar_de_embedding_tuning_qwen.py",
                            "SOURCE_MODEL=Qwen/Qwen2.5-0.5B", "DATA_DIR=/nonexistent"))
    assert "--source_model_name_or_path Qwen/Qwen2.5-0.5B" in qwen
    assert "--target_model_path out/Qwen2.5-0.5B-clp-german" in qwen
    assert "train.py config/oscar_de_embedding_tuning_qwen.py" in qwen
    assert "--target_model_path out/pythia-410m-clp-german" in "\n".join(make_n("init"))


@pytest.mark.parametrize("source", ["Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B"])
def test_make_init_from_a_modern_source_offline(source, qwen_tokenizer, llama3_tokenizer, real_tokenizers, tmp_path):
    """`make init SOURCE_MODEL=<a Qwen2.5 or Llama-3.2 id>` with the study's helper id, both resolved offline from a
    hub-layout cache: a tiny random model of the source's family with its real tokenizer, and a tiny GPT-2 with
    GPT-2's real tokenizer for the helper. The init is that family (tied), over the helper's vocabulary, its shared
    rows the source's, and transformers loads it with our logits."""
    from conftest import gpt2_helper, hf_llama, make_hub_cache
    from transformers import AutoModelForCausalLM

    from model import CausalLM

    model_type, tokenizer, vocab, extra = {
        "Qwen/Qwen2.5-0.5B": ("qwen2", qwen_tokenizer, 151936, {}),
        "meta-llama/Llama-3.2-1B": ("llama", llama3_tokenizer, 128264, dict(rope_scaling={
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}, rope_theta=500000.0))}[source]
    src, helper = tmp_path / "src", tmp_path / "helper"
    hf_llama(model_type, vocab_size=vocab, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, tie_word_embeddings=True, **extra).save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer, name), src / name)
    gpt2_helper(helper, vocab_size=50257)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(real_tokenizers["gpt2"], name), helper / name)
    cache = tmp_path / "hub"
    make_hub_cache(cache, source, src)
    make_hub_cache(cache, "malteos/gpt2-wechsel-german-ds-meg", helper)
    out = tmp_path / "init"
    r = subprocess.run(["make", "init", f"SOURCE_MODEL={source}", f"INIT_DIR={out}", f"PY={sys.executable}"], cwd=ROOT,
                       text=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                             "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "clp_report.json").read_text())
    ours = CausalLM.from_pretrained(str(out)).eval()
    assert (ours.config.model_type, ours.tied, ours.config.vocab_size) == (model_type, True,
                                                                           report["target_vocab_size"])
    assert report["target_vocab_size"] >= 50257 and report["shared_tokens"] > 30_000, report
    ref = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[464, 3290, 318, 257, 1332, 13]])  # GPT-2 ids: "The dog is a test."
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_make_test_says_why_a_test_skipped(tmp_path):
    """make test runs pytest with the repository's pytest.ini, whose -rs lists each skip with its reason (the GPU
    tests on a machine without one)."""
    assert f"{sys.executable} -m pytest -q tests" in make_n("test")
    (tmp_path / "test_skips.py").write_text("import pytest\n\n\ndef test_gpu():\n    pytest.skip('no CUDA device')\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", f"{ROOT}/pytest.ini", "--rootdir", str(tmp_path),
                        str(tmp_path / "test_skips.py")], cwd=ROOT, text=True, capture_output=True)
    assert r.returncode == 0 and "SKIPPED [1] " in r.stdout and ": no CUDA device" in r.stdout, r.stdout
