"""clp.py --extend: the extended tokenizer (source ids and merge priority kept, lossless on any text, fewer tokens for
the target language) on the real Pythia, Llama-3 and Qwen tokenizers and by hand; the appended rows by each method
against the formula; the source rows bit for bit; transformers loads the result; bad input."""

import json
import os
import re
import shutil

import pytest
import torch
from conftest import eltec_texts, hf_neox, run_py, safetensors_state, tiny_source_and_helper

from clp import apply_clp, byte_level_alphabet, extend_tokenizer
from common import UserError, load_tokenizer, save_tokenizer
from test_clp import byte_level_bpe

MIXED = ["Größe über Äpfel, Straße! «Das Mädchen» — naïve Ünd 日本語 🤗🇩🇪",
         "def f(x):\n    return x**2  # squares\r\n\tTabs and   spaces ",
         "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it?", "\x00\x01 \ufffd \u200b", ""]


def check_extended(source, extended, new, first_id, german, english):
    """What every extension must keep: each source token and added token at its id, the new tokens after them,
    every text decoded back to itself, and German in fewer tokens than under the source."""
    sv, ev = source.get_vocab(with_added_tokens=True), extended.get_vocab(with_added_tokens=True)
    assert {t: ev[t] for t in sv} == sv
    assert {t: ev[t] for t in new} == {t: first_id + i for i, t in enumerate(new)}
    assert len(ev) == len(sv) + len(new) and first_id == max(sv.values()) + 1
    assert {k: v.content for k, v in extended.get_added_tokens_decoder().items()} == {
        k: v.content for k, v in source.get_added_tokens_decoder().items()}
    for text in MIXED + german[:2] + english[:2]:
        ids = extended.encode(text, add_special_tokens=False).ids
        assert extended.decode(ids, skip_special_tokens=False) == source.decode(
            source.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
    for text in german:
        assert len(extended.encode(text).ids) < len(source.encode(text).ids)
    assert count_tokens(extended, german) < 0.98 * count_tokens(source, german)
    assert count_tokens(extended, english) <= count_tokens(source, english) * 1.001


def count_tokens(tok, texts):
    return sum(len(e.ids) for e in tok.encode_batch(texts))


@pytest.fixture(scope="module")
def german_bpe():
    from data import train_bpe

    return train_bpe(eltec_texts("deu", limit_chars=100_000), 3000)


@pytest.fixture(scope="module")
def texts():
    """Held-out German and English: 2,000-character pieces of the validation novels' slices."""
    def pieces(lang):
        return [t[i:i + 2000] for t in eltec_texts(lang, "valid", 10_000) for i in range(0, 10_000, 2000)]

    return pieces("deu"), pieces("eng")


@pytest.mark.parametrize("family", ["pythia", "llama3", "qwen"])
def test_real_source_tokenizers(family, german_bpe, texts, real_tokenizers, request, tmp_path):
    from transformers import AutoTokenizer

    path = real_tokenizers["pythia"] if family == "pythia" else request.getfixturevalue(f"{family}_tokenizer")
    source = load_tokenizer(path)
    extended, new, first_id, merges = extend_tokenizer(source, german_bpe, 500)
    assert len(new) == 500 and merges >= 500
    check_extended(source, extended, new, first_id, *texts)
    # the source's merges keep priority: an English text tokenizes as before but for the new tokens
    english = texts[1][0]
    assert source.encode(english).ids[:20] == extended.encode(english).ids[:20] or any(
        i >= first_id for i in extended.encode(english).ids[:20])
    if family != "pythia":
        return
    # transformers loads the saved file and encodes as `tokenizers` does
    extended.save(str(tmp_path / "tokenizer.json"))
    save_tokenizer(str(tmp_path), str(tmp_path), {"eos_token": source.id_to_token(first_id - 1)})
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf(texts[0][0], add_special_tokens=False)["input_ids"] == extended.encode(
        texts[0][0], add_special_tokens=False).ids


def test_extension_by_hand(tmp_path):
    """Source: bytes + 'er', 'Ġd', 'Ġder'. Target merges in rank order: 'ch', 'Ġi', 'Ġich' (Ġi + ch), 'Ġd' (the
    source's own merge: skipped), 'Ġdi', 'h.' (the source's pre-tokenizer splits 'h' from '.': never formed,
    skipped), 'ic', 'er' and 'Ġder' (the source's), 'ĠÃ' (bytes 20 C3: part of a character), 'ĠÃ¤' (' ä')."""
    src = byte_level_bpe(["er", "Ġd", "Ġder"], [("e", "r"), ("Ġ", "d"), ("Ġd", "er")], tmp_path / "src.json")
    tgt = byte_level_bpe(["ch", "Ġi", "Ġich", "Ġd", "Ġdi", "h.", "ic", "er", "Ġder", "ĠÃ", "ĠÃ¤"],
                         [("c", "h"), ("Ġ", "i"), ("Ġi", "ch"), ("Ġ", "d"), ("Ġd", "i"), ("h", "."), ("i", "c"),
                          ("e", "r"), ("Ġd", "er"), ("Ġ", "Ã"), ("ĠÃ", "¤")], tmp_path / "tgt.json")
    extended, new, first_id, merges = extend_tokenizer(src, tgt, 4)
    assert new == ["ch", "Ġi", "Ġich", "Ġdi"] and first_id == 260 and merges == 4
    spec = json.loads(extended.to_str())["model"]["merges"]
    assert [tuple(m) for m in spec] == [("e", "r"), ("Ġ", "d"), ("Ġd", "er"), ("c", "h"), ("Ġ", "i"), ("Ġi", "ch"),
                                        ("Ġd", "i")]
    assert extended.encode(" ich der dich").tokens == ["Ġich", "Ġder", "Ġdi", "ch"]
    assert extend_tokenizer(src, tgt, 7)[1][4:] == ["ic", "ĠÃ", "ĠÃ¤"]
    with pytest.raises(UserError, match="--extend 8: .* has only 7 tokens the source lacks"):
        extend_tokenizer(src, tgt, 8)


def test_refuses_other_families(tmp_path, real_tokenizers):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    src = load_tokenizer(real_tokenizers["pythia"])
    sp = Tokenizer(models.BPE({"▁": 0, "a": 1, "▁a": 2}, [("▁", "a")]))
    sp.pre_tokenizer, sp.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    with pytest.raises(UserError, match="sp.json: a sentencepiece BPE tokenizer; --extend merges byte-level BPE"):
        extend_tokenizer(src, sp, 1, target_name="sp.json")
    with pytest.raises(UserError, match="source: a sentencepiece BPE tokenizer"):
        extend_tokenizer(sp, src, 1, source_name="source")
    euro = Tokenizer(models.BPE({"a": 0, "€": 1, "a€": 2}, [("a", "€")]))
    euro.pre_tokenizer, euro.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
    with pytest.raises(UserError, match="the token '€' is not written in the byte-level alphabet"):
        extend_tokenizer(src, euro, 1)


# -----------------------------------------------------------------------------
# the extended model: source rows kept, appended rows by each method, transformers loads it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, eltec_tokenizers):
    """source: GPT-NeoX (untied) with the English BPE; helper: GPT-2 with the German BPE."""
    root = tmp_path_factory.mktemp("extend")
    source, helper, helper_rows = tiny_source_and_helper(root, eltec_tokenizers)
    (root / "german.txt").write_text("\n".join(t[:3000] for t in eltec_texts("deu", limit_chars=3000)))
    return source, helper, helper_rows, root


def test_extended_model_rows_by_method(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, helper, H, root = tiny
    state = safetensors_state(source)
    E_in, E_out = state["gpt_neox.embed_in.weight"], state["embed_out.weight"]
    src_tok, helper_tok = load_tokenizer(str(source)), load_tokenizer(str(helper))
    n_src = src_tok.get_vocab_size()
    target = root / "clp"
    embed_in, embed_out, report = apply_clp(str(source), str(helper), str(target), extend=100,
                                            fertility_text=str(root / "german.txt"))
    ext = report["extend"]
    assert ext["appended_tokens"] == 100 and ext["first_appended_id"] == ext["source_ids"] == n_src
    assert report["new_tokens"] == 100 and embed_in.shape[0] == embed_out.shape[0] == 1152  # 1124 padded to 128
    fert = ext["fertility"]
    assert fert["extended"]["tokens"] < fert["source"]["tokens"] and fert["source"]["words"] > 300
    # the source rows bit for bit, in both matrices
    assert torch.equal(embed_in[:n_src], E_in[:n_src]) and torch.equal(embed_out[:n_src], E_out[:n_src])
    # CLP by its formula: anchors are the source tokens the helper has, helper rows by the helper's ids
    ext_tok = load_tokenizer(str(target))
    sv, hv = src_tok.get_vocab(with_added_tokens=True), helper_tok.get_vocab(with_added_tokens=True)
    anchors = sorted((i, hv[t]) for t, i in sv.items() if t in hv)
    a_src, a_h = torch.tensor([a for a, _ in anchors]), torch.tensor([h for _, h in anchors])
    new = [ext_tok.id_to_token(i) for i in range(n_src, n_src + 100)]
    cos = torch.nn.functional.normalize(H[[hv[t] for t in new]], dim=1) @ torch.nn.functional.normalize(
        H[a_h], dim=1).T
    for E, got in ((E_in, embed_in), (E_out, embed_out)):
        torch.testing.assert_close(got[n_src:n_src + 100], cos @ E[a_src] / cos.sum(1, keepdim=True),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[n_src + 100:], E[a_src].mean(0).expand(1152 - n_src - 100, -1))
    # transformers loads model and tokenizer: a source text's ids are the source's, the model runs on new ids
    hf_tok, model = AutoTokenizer.from_pretrained(target), AutoModelForCausalLM.from_pretrained(target)
    assert hf_tok("The house", add_special_tokens=False)["input_ids"] == src_tok.encode("The house").ids
    assert torch.equal(model.get_input_embeddings().weight, embed_in)
    ids = hf_tok("Er sagte nichts, und sie lächelte.", return_tensors="pt")["input_ids"]
    assert ids.max() >= n_src and torch.isfinite(model(ids).logits).all()

    # mean: every appended row the mean of the source tokens' rows; FVT: the mean of the new token's source pieces
    mean_in, mean_out, _ = apply_clp(str(source), method="mean", target_tokenizer=str(helper), extend=100)
    for E, got in ((E_in, mean_in), (E_out, mean_out)):
        assert torch.equal(got[:n_src], E[:n_src])
        torch.testing.assert_close(got[n_src:n_src + 100], E[:n_src].mean(0).expand(100, -1))
    fvt_in, _, fvt_report = apply_clp(str(source), method="fvt", target_tokenizer=str(helper), extend=100)
    alphabet, partial = byte_level_alphabet(), 0
    for i, token in enumerate(new):
        try:
            text = bytes(alphabet[c] for c in token).decode("utf-8")
        except UnicodeDecodeError:  # part of a character: split byte by byte (test_clp's test_fvt_by_hand)
            partial += 1
            continue
        pieces = src_tok.encode(text, add_special_tokens=False).ids
        torch.testing.assert_close(fvt_in[n_src + i], E_in[pieces].mean(0))
    assert torch.equal(fvt_in[:n_src], E_in[:n_src]) and fvt_report["fvt"]["split_byte_by_byte"] == partial

    # a tied source: one matrix, its source rows kept, the head the same tensor in transformers
    tied = root / "tied"
    hf_neox(vocab_size=n_src, tie_word_embeddings=True).save_pretrained(tied)
    save_tokenizer(str(source), str(tied))
    tied_in, tied_out, _ = apply_clp(str(tied), str(helper), str(root / "tied-target"), extend=100)
    assert tied_out is None and torch.equal(tied_in[:n_src], safetensors_state(tied)["gpt_neox.embed_in.weight"])
    model = AutoModelForCausalLM.from_pretrained(root / "tied-target")
    assert torch.equal(model.get_output_embeddings().weight, tied_in)


def test_extend_cli_and_bad_input(tiny, tmp_path):
    source, helper, _, root = tiny
    out = tmp_path / "out"
    args = ["clp.py", "apply_clp", "--source_model_name_or_path", str(source), "--helper_model_name_or_path",
            str(helper), "--target_model_path", str(out), "--weighting", "sparsemax"]
    r = run_py(args + ["--extend", "50"])
    assert r.returncode == 0, r.stderr
    assert "50 tokens appended at ids 1024..1073" in r.stdout
    assert json.loads((out / "clp_report.json").read_text())["extend"]["appended_tokens"] == 50
    r = run_py(args[:-4] + ["--target_model_path", str(tmp_path / "bad"), "--extend", "100000"])
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search("--extend 100000: .* has only \\d+ tokens the source lacks", r.stderr), r.stderr
    assert not (tmp_path / "bad").exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    for bad, message in (({"extend": -1}, "extend=-1: expected the number of target tokens"),
                         ({"extend": 5, "random_init": True}, "--random_init replaces every row"),
                         ({"fertility_text": "x.txt"}, "--fertility_text applies to --extend only"),
                         ({"extend": 5, "fertility_text": "x.txt"}, "x.txt: --fertility_text file not found")):
        with pytest.raises(UserError, match=message):
            apply_clp(str(source), str(helper), str(tmp_path / "bad"), **bad)
        assert not (tmp_path / "bad").exists()


# -----------------------------------------------------------------------------
# train.py train_new_rows_only: the embedding phase trains the appended rows alone


@pytest.fixture(scope="module")
def extended_run(tiny):
    """An --extend init (mean, 150 tokens appended to the English BPE's 1024) and German token files made with its
    tokenizer: (init dir, data dir, first appended id)."""
    import data

    source, helper, _, root = tiny
    init, texts = root / "ext-init", root / "ext-texts"
    _, _, report = apply_clp(str(source), method="mean", target_tokenizer=str(helper), target_model_path=str(init),
                             extend=150)
    texts.mkdir()
    docs = [text[start:start + 10_000] for text in eltec_texts("deu", limit_chars=40_000) for start in range(0, 40_000,
                                                                                                     10_000)]
    for i, doc in enumerate(docs):
        (texts / f"{i}.txt").write_text(doc)
    data.prepare([str(texts / "*.txt")], str(root / "ext-data"), str(init), subsample_size_mb=0.08, valid_percent=20,
                 progress=False)
    return init, root / "ext-data", report["extend"]["first_appended_id"]


def new_rows_args(extended_run, out, *extra):
    from conftest import TINY_TRAIN

    init, data_dir, _ = extended_run
    return [f"--data_dir={data_dir}", f"--init_from={init}", f"--out_dir={out}", *TINY_TRAIN, "--max_iters=4",
            "--eval_interval=2", "--embedding_tuning_frac=1.0", "--train_new_rows_only=True", "--weight_decay=0.1",
            *extra]


def check_frozen_rows(extended_run, out, body_frozen=True):
    """The source rows of both matrices bit-identical to the init's, every appended row trained."""
    from conftest import weights

    init, _, first = extended_run
    before, after = safetensors_state(init), weights(out)
    for key in ("gpt_neox.embed_in.weight", "embed_out.weight"):
        assert torch.equal(after[key][:first], before[key][:first]), key
        assert (after[key][first:first + 150] != before[key][first:first + 150]).any(1).all(), key
    if body_frozen:
        assert all(torch.equal(after[k], before[k]) for k in before if "embed" not in k)


def test_new_rows_only_one_process_then_everything_trains(extended_run, tmp_path):
    import train

    train.main(new_rows_args(extended_run, tmp_path / "new"))
    check_frozen_rows(extended_run, tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["train_new_rows_only"] is True
    # then the full phase: the source rows train too (the group decays as every matrix does)
    train.main(new_rows_args(extended_run, tmp_path / "both", "--embedding_tuning_frac=0.5"))
    from conftest import weights

    init, _, first = extended_run
    assert not torch.equal(weights(tmp_path / "both")["gpt_neox.embed_in.weight"][:first],
                           safetensors_state(init)["gpt_neox.embed_in.weight"][:first])


@pytest.mark.parametrize("phases", [["--embedding_tuning_frac=1.0"],
                                    ["--embedding_tuning_frac=0.5", "--max_iters=6"]], ids=["new-rows", "then-full"])
def test_new_rows_only_resumes_exactly(extended_run, tmp_path, monkeypatch, phases):
    """Stopped by SIGTERM inside the new-rows phase and resumed (the first appended id from the checkpoint, the
    init's report gone): the same weights as an uninterrupted run, the source rows still the init's; a full phase
    after the resume decays the embedding matrices as an uninterrupted run does."""
    from conftest import stop_by_sigterm_while_reading, weights

    import train

    init, _, first = extended_run
    moved = tmp_path / "init"
    shutil.copytree(init, moved)
    run_args = new_rows_args(extended_run, tmp_path / "stopped", f"--init_from={moved}", *phases)
    stop_by_sigterm_while_reading(monkeypatch, 8, lambda: train.main(run_args))  # during step 2
    os.remove(moved / "clp_report.json")
    train.main([*run_args, "--init_from=resume"])
    train.main(new_rows_args(extended_run, tmp_path / "whole", *phases))
    if phases == ["--embedding_tuning_frac=1.0"]:
        check_frozen_rows(extended_run, tmp_path / "stopped")
    resumed, whole = weights(tmp_path / "stopped"), weights(tmp_path / "whole")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_new_rows_only_float16_overflow_changes_no_row():
    """float16: a step the GradScaler skips (the loss finite, its gradients overflowed) leaves every row as it was,
    the trained rows undecayed too; at a scale that fits, the step trains the appended rows alone."""
    from types import SimpleNamespace

    import train
    from model import GPTNeoX, GPTNeoXConfig

    torch.manual_seed(0)
    model = GPTNeoX(GPTNeoXConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, intermediate_size=32, block_size=8))
    cfg, rt, first = train.TrainConfig(weight_decay=0.1), train.Runtime(dtype="float16"), 48
    new_rows = train.NewRowsOnly(model, first, cfg.weight_decay)
    optimizer = train.configure_optimizer(model, cfg, "cpu", new_rows)
    train.set_trainable(model, SimpleNamespace(name="embedding"), cfg)
    new_rows.set_phase(embedding=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    x = torch.randint(0, 64, (2, 9))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = train.train_step(model, model, optimizer, scaler, [(x[:, :-1], x[:, 1:])], 1e-3, 0.0, rt,
                            new_rows=new_rows)
    assert torch.isfinite(loss) and scaler.get_scale() < 2.0 ** 40  # skipped for overflowed gradients
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    scaler.update(1.0)
    train.train_step(model, model, optimizer, scaler, [(x[:, :-1], x[:, 1:])], 1e-3, 0.0, rt, new_rows=new_rows)
    for name in ("gpt_neox.embed_in.weight", "embed_out.weight"):
        after = dict(model.named_parameters())[name]
        assert torch.equal(after[:first], before[name][:first]) and not torch.equal(after[first:], before[name][first:])


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_new_rows_only_two_processes(extended_run, tmp_path, parallelism):
    r = run_py(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                *new_rows_args(extended_run, tmp_path / "run", f"--parallelism={parallelism}")],
               env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    check_frozen_rows(extended_run, tmp_path / "run")


def test_new_rows_only_bad_input(extended_run, tiny, tmp_path):
    import data
    import train

    init, data_dir, _ = extended_run
    source, unreported = tiny[0], tmp_path / "no-report"
    shutil.copytree(init, unreported, ignore=shutil.ignore_patterns("clp_report.json"))
    with pytest.raises(UserError, match="no-report/clp_report.json does not record extend.source_ids"):
        train.main(new_rows_args(extended_run, tmp_path / "a", f"--init_from={unreported}"))
    with pytest.raises(UserError, match="train_new_rows_only=True applies to the embedding phase"):
        train.main(new_rows_args(extended_run, tmp_path / "b", "--embedding_tuning_frac=0"))
    # the extended model with data made by the source's (unextended) tokenizer
    data.prepare([str(tiny[3] / "ext-texts" / f"{i}.txt") for i in range(4)], str(tmp_path / "eng-data"),
                 str(source), subsample_size_mb=0.02, valid_percent=20, progress=False)
    with pytest.raises(UserError, match="eng-data"):
        train.main(new_rows_args(extended_run, tmp_path / "c", f"--data_dir={tmp_path / 'eng-data'}"))
    assert not (tmp_path / "c").exists() or not os.listdir(tmp_path / "c")
