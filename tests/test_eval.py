"""eval.py against transformers' GPTNeoXForCausalLM and LlamaForCausalLM (the independent references): perplexity sums
over rolling windows after the harness's prefix token (BOS for a tokenizer that has one), task scores as a by-hand
log-likelihood argmax, the GermEval 2018 definition on a vendored sample of the original files (tests/data/eval), bad
input."""

import json
import math
import os
import re

import pytest
import torch
from conftest import TESTDATA, eltec_texts, hf_llama, hf_neox, run_py

import eval as ev
from common import UserError, load_tokenizer, save_tokenizer
from model import GPTNeoX

BLOCK = 32  # max_position_embeddings of the tiny model: ELTeC paragraphs are many windows long
EOT = 0  # <|endoftext|> of the ELTeC tokenizers
EVAL_DATA = os.path.join(TESTDATA, "eval")  # germeval2018/: the first 100 rows of each original file
SHORT = ["Es war einmal ein König.", "Grüße aus Köln: „Straßenbahn“ fährt über die Brücke — 5 €, ß und Æ.",
         "  Daß   er kam,\n\nwar gut.  "]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, eltec_tokenizers):
    """(dir, transformers model, our model, tokenizer): a random GPT-NeoX saved with the German ELTeC tokenizer."""
    tok = load_tokenizer(str(eltec_tokenizers["deu"]))
    path = tmp_path_factory.mktemp("tiny-de")
    ref = hf_neox(vocab_size=tok.get_vocab_size(), hidden_size=32, num_attention_heads=2, max_position_embeddings=BLOCK)
    ref.save_pretrained(path)
    save_tokenizer(str(eltec_tokenizers["deu"]), str(path))
    return path, ref, GPTNeoX.from_pretrained(str(path)).eval(), load_tokenizer(str(path))


@pytest.fixture(scope="module")
def long_doc():
    return eltec_texts("deu", limit_chars=600)[0]


def token_logprobs(ref, context, targets):
    """log p(each target | context and the targets before it), one transformers forward."""
    ids = torch.tensor([context + targets])
    with torch.no_grad():
        logp = torch.log_softmax(ref(input_ids=ids[:, :-1]).logits[0].double(), -1)
    return [logp[len(context) - 1 + j, t].item() for j, t in enumerate(targets)]


def reference_nll(ref, ids, L, S, prefix=EOT):
    """NLL of one document from the documented rule, token by token: a token is scored after all tokens before it
    (from the prefix token) in the first window; later, after the L tokens before the end of its window, windows ending
    every S tokens after the first L. Tokens with the same context start share one transformers forward."""
    seq, by_start = [prefix] + ids, {}
    for i in range(1, len(seq)):
        start = 0 if i <= L else min(L + math.ceil((i - L) / S) * S, len(ids)) - L
        by_start.setdefault(start, []).append(i)
    nll = 0.0
    for start, positions in by_start.items():
        logps = token_logprobs(ref, seq[start:positions[0]], seq[positions[0]:positions[-1] + 1])
        nll -= sum(logps[i - positions[0]] for i in positions)
    return nll


def test_rolling_windows_are_the_harness_windows():
    # lm-evaluation-harness get_rolling_token_windows(range(1, 11), prefix 0, max_seq_len 4, context_len 1), by hand
    assert ev.rolling_windows(list(range(1, 11)), 0, 4) == [([0, 1, 2, 3, 4], 4), ([4, 5, 6, 7, 8], 4),
                                                            ([6, 7, 8, 9, 10], 2)]
    assert ev.rolling_windows(list(range(1, 11)), 0, 4, stride=2) == [
        ([0, 1, 2, 3, 4], 4), ([2, 3, 4, 5, 6], 2), ([4, 5, 6, 7, 8], 2), ([6, 7, 8, 9, 10], 2)]
    assert ev.rolling_windows([7], 0, 4) == [([0, 7], 1)] and ev.rolling_windows([], 0, 4) == []


@pytest.mark.parametrize("stride,score_chunk", [(None, ev.SCORE_CHUNK), (12, ev.SCORE_CHUNK), (None, 5)])
def test_perplexity_sums_match_transformers(tiny, long_doc, stride, score_chunk, monkeypatch):
    """Summed over the harness's windows, the same NLL as transformers token by token; also with each window's
    logits made a few positions at a time (score_chunk 5: how a long window is scored without its full logits)."""
    monkeypatch.setattr(ev, "SCORE_CHUNK", score_chunk)
    path, ref, model, tok = tiny
    docs = SHORT + [long_doc]
    ids = [tok.encode(d, add_special_tokens=False).ids for d in docs]
    assert len(ids[-1]) > 4 * BLOCK
    nll = sum(reference_nll(ref, x, BLOCK, stride or BLOCK) for x in ids)
    r = ev.perplexity(model, tok, docs, stride=stride, batch_size=3, prefix_token_id=EOT, chunk_documents=2)
    n_tok, n_words, n_bytes = sum(map(len, ids)), sum(len(d.split()) for d in docs), sum(len(d.encode()) for d in docs)
    assert (r["documents"], r["tokens"], r["words"], r["bytes"]) == (len(docs), n_tok, n_words, n_bytes)
    assert r["nll"] == pytest.approx(nll, rel=1e-6)
    assert r["token_perplexity"] == pytest.approx(math.exp(nll / n_tok), rel=1e-6)
    assert r["word_perplexity"] == pytest.approx(math.exp(nll / n_words), rel=1e-6)
    assert r["byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-6)
    assert r["bits_per_byte"] == pytest.approx(nll / (n_bytes * math.log(2)), rel=1e-6)
    assert (r["max_length"], r["stride"]) == (BLOCK, stride or BLOCK)


def test_bits_per_byte_on_german_text(tiny):
    path, ref, model, tok = tiny
    text = SHORT[1]  # umlauts, ß, „“, —, €: 2- and 3-byte UTF-8 characters
    assert len(text.encode()) > len(text)
    nll = reference_nll(ref, tok.encode(text, add_special_tokens=False).ids, BLOCK, BLOCK)
    r = ev.perplexity(model, tok, [text], prefix_token_id=EOT)
    assert r["bytes"] == len(text.encode("utf-8"))
    assert r["bits_per_byte"] == pytest.approx(nll / len(text.encode()) / math.log(2), rel=1e-6)
    assert r["byte_perplexity"] == pytest.approx(2 ** r["bits_per_byte"], rel=1e-9)


@pytest.fixture(scope="module", params=["self-made", "llama3"])
def bos_model(request, tmp_path_factory):
    """(dir, transformers model): a random tiny LlamaForCausalLM saved with a tokenizer that adds BOS before every
    text: the self-made one (tests need no package), or Llama-3.2's real one (skipped without its package)."""
    tok_dir = request.getfixturevalue("bos_tokenizer" if request.param == "self-made" else "llama3_tokenizer")
    path = tmp_path_factory.mktemp(f"tiny-llama-{request.param}")
    ref = hf_llama(vocab_size=load_tokenizer(str(tok_dir)).get_vocab_size(), hidden_size=32, num_attention_heads=2,
                   num_key_value_heads=1, intermediate_size=64, max_position_embeddings=BLOCK, tie_word_embeddings=True)
    ref.save_pretrained(path)
    save_tokenizer(str(tok_dir), str(path))
    return path, ref


def test_bos_prefix_and_perplexity_match_transformers(bos_model, long_doc, tiny, tmp_path):
    """For a tokenizer that adds BOS (Llama 2/3) the prefix is the harness's HFLM.prefix_token_id (transformers'
    bos_token_id, else its eos_token_id): BOS, not eos; the perplexity sums equal a token-by-token transformers
    computation from transformers' tokenization (no special tokens) after it, through the API and the CLI. A tokenizer
    whose BOS is its eos (GPT-NeoX) keeps the eos prefix."""
    from transformers import AutoTokenizer

    path, ref = bos_model
    hf_tok = AutoTokenizer.from_pretrained(path)
    model, tok, prefix = ev.load_model(str(path))
    assert prefix == hf_tok.bos_token_id != hf_tok.eos_token_id
    assert ev.load_model(str(tiny[0]))[2] == AutoTokenizer.from_pretrained(tiny[0]).bos_token_id == EOT
    docs = SHORT + [long_doc]
    ids = [hf_tok(d, add_special_tokens=False).input_ids for d in docs]
    assert len(ids[-1]) > 3 * BLOCK
    nll = sum(reference_nll(ref, x, BLOCK, BLOCK, prefix=hf_tok.bos_token_id) for x in ids)
    r = ev.perplexity(model, tok, docs, batch_size=3, prefix_token_id=prefix)
    assert r["tokens"] == sum(map(len, ids)) and r["nll"] == pytest.approx(nll, rel=1e-6)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cli = ev.main(["--model", str(path), "--ppl_files", str(tmp_path / "docs.jsonl"), "--device", "cpu"])
    assert cli["nll"] == pytest.approx(nll, rel=1e-6) and cli["tokens"] == r["tokens"]


def write_task(tmp_path, scoring, records, prompt):
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    labels = {"pos": "gut", "neg": "schlecht", "neu": "neutral"} if scoring == "loglikelihood" else {"1": "Ja", "0": "Nein"}
    task = {"name": f"toy_{scoring}", "data": {"test": str(tmp_path / "data.jsonl"), "train": str(tmp_path / "data.jsonl")},
            "label_field": "y", "labels": labels, "prompt": prompt, "scoring": scoring}
    (tmp_path / "task.json").write_text(json.dumps(task, ensure_ascii=False))
    return str(tmp_path / "task.json"), labels


def by_hand_macro_f1(gold, pred):
    f1 = []
    for c in set(gold) | set(pred):
        tp = sum(g == p == c for g, p in zip(gold, pred))
        precision = tp / max(1, sum(p == c for p in pred))
        recall = tp / max(1, sum(g == c for g in gold))
        f1.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    return sum(f1) / len(f1)


def test_task_equals_by_hand_loglikelihood_argmax(tiny, tmp_path):
    path, ref, model, tok = tiny
    records = [{"satz": s, "y": y} for s, y in [
        ("Der Zug kam pünktlich.", "pos"), ("Wieder eine Stunde Verspätung!", "neg"), ("Ich fahre morgen.", "neu"),
        ("Sehr freundliches Personal.", "pos"), ("Klimaanlage kaputt, furchtbar.", "neg"), ("Der ICE hält in Köln.", "neu"),
        ("Alles bestens, danke.", "pos")]]
    task, labels = write_task(tmp_path, "loglikelihood", records, "{satz}\n\nBewertung:")
    gold, pred = [], []
    for r in records:
        ctx = tok.encode(r["satz"] + "\n\nBewertung:", add_special_tokens=False).ids
        scores = {y: sum(token_logprobs(ref, ctx, tok.encode(" " + v, add_special_tokens=False).ids))
                  for y, v in labels.items()}
        gold.append(r["y"])
        pred.append(max(scores, key=scores.get))
    result = ev.evaluate_task(ev.make_lm(model, tok, batch_size=4, prefix_token_id=EOT), task)
    assert result["n"] == len(records) and result["num_fewshot"] == 0
    assert result["pred_counts"] == {y: pred.count(y) for y in set(pred)}
    assert result["acc"] == pytest.approx(sum(g == p for g, p in zip(gold, pred)) / len(gold))
    assert result["macro_f1"] == pytest.approx(by_hand_macro_f1(gold, pred))

    # k-shot: solved training examples, a blank line after each, seeded and reproducible
    definition = ev.load_task(task)
    examples, requests = ev.task_requests(definition, ev.load_split(definition, ev.task_sources(definition), "test")[0],
                                          train=[{"satz": "Schön.", "label": "pos"}] * 2, num_fewshot=2, seed=1)
    assert requests[0][0] == ("Schön.\n\nBewertung: gut\n\n" * 2 + examples[0]["satz"] + "\n\nBewertung:", " gut")
    again = ev.evaluate_task(ev.make_lm(model, tok, prefix_token_id=EOT), task, num_fewshot=2, seed=3)
    assert again == ev.evaluate_task(ev.make_lm(model, tok, prefix_token_id=EOT, batch_size=1), task, num_fewshot=2,
                                     seed=3)


def test_rolling_task_equals_by_hand_sequence_loglikelihood(tiny, tmp_path):
    path, ref, model, tok = tiny
    records = [{"a": "Er kam spät", "b": "er war pünktlich", "y": 0}, {"a": "Sie lacht", "b": "sie ist froh", "y": 1},
               {"a": "Es regnet", "b": "die Straße ist naß", "y": 1}]
    task, labels = write_task(tmp_path, "rolling", records, "{a}, richtig? {label}, {b}")
    pred = []
    for r in records:
        scores = {y: sum(token_logprobs(ref, [EOT], tok.encode(f"{r['a']}, richtig? {v}, {r['b']}",
                                                             add_special_tokens=False).ids)) for y, v in labels.items()}
        pred.append(max(scores, key=scores.get))
    result = ev.evaluate_task(ev.make_lm(model, tok, batch_size=2, prefix_token_id=EOT), task)
    gold = [str(r["y"]) for r in records]
    assert result["acc"] == pytest.approx(sum(g == p for g, p in zip(gold, pred)) / 3)
    assert result["pred_counts"] == {y: pred.count(y) for y in set(pred)}


def test_germeval2018_reads_the_original_files(tiny, monkeypatch):
    path, ref, model, tok = tiny
    monkeypatch.setenv("EVAL_DATA_DIR", EVAL_DATA)
    task = ev.load_task("germeval2018_coarse")
    sources = ev.task_sources(task)
    assert sources["test"][0] == os.path.join(EVAL_DATA, "germeval2018", "germeval2018.test.txt")
    test, skipped = ev.load_split(task, sources, "test")
    train, _ = ev.load_split(task, sources, "train")
    assert (len(test), len(train), skipped) == (100, 100, 0)
    assert {e["label"] for e in test} == {"OFFENSE", "OTHER"} and "|LBR|" in "".join(e["text"] for e in test)
    monkeypatch.delenv("EVAL_DATA_DIR")  # the same files given as a directory
    r = ev.evaluate_task(ev.make_lm(model, tok, prefix_token_id=EOT), "germeval2018_coarse",
                         data=os.path.join(EVAL_DATA, "germeval2018"), limit=4, num_fewshot=1)
    assert r["n"] == 4 and 0 <= r["acc"] <= 1 and r["data"]["train"].endswith("germeval2018.training.txt")


def test_cli_end_to_end(tiny, tmp_path):
    """Perplexity files, GermEval 2018 from $EVAL_DATA_DIR and a task whose data is a hub dataset in an offline
    cache: one run, a JSON result and the table."""
    path, ref, model, tok = tiny
    (tmp_path / "a.txt").write_text(SHORT[1])
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": SHORT[0]}) + "\n")
    snap = tmp_path / "hub" / "datasets--tester--toy" / "snapshots" / ("0" * 40)
    os.makedirs(snap / "data")
    (snap / "data" / "test-00000.jsonl").write_text("".join(json.dumps({"s": s, "y": y}) + "\n" for s, y in
                                                            [("Ja, gern.", "1"), ("Nein, danke.", "0")]))
    os.makedirs(tmp_path / "hub" / "datasets--tester--toy" / "refs")
    (tmp_path / "hub" / "datasets--tester--toy" / "refs" / "main").write_text("0" * 40)
    (tmp_path / "toy.json").write_text(json.dumps({
        "name": "toy_hub", "data": {"test": "hf://datasets/tester/toy/data/test-*.jsonl"}, "label_field": "y",
        "labels": {"1": "ja", "0": "nein"}, "prompt": "{s} Antwort:", "scoring": "loglikelihood"}))
    out = tmp_path / "results.json"
    p = run_py(["eval.py", "--model", str(path), "--ppl_files", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                "--tasks", f"germeval2018_coarse,{tmp_path / 'toy.json'}", "--limit", "6", "--batch_size", "4",
                "--output", str(out)],
               env={"EVAL_DATA_DIR": EVAL_DATA, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    direct = ev.perplexity(model, tok, [SHORT[1], SHORT[0]], prefix_token_id=EOT)
    for key in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert r[key] == pytest.approx(direct[key], rel=1e-6)
    assert r["tasks"]["germeval2018_coarse"]["n"] == 6 and r["tasks"]["toy_hub"]["n"] == 2
    assert {"acc", "macro_f1", "n"} <= set(r["tasks"]["toy_hub"])
    assert "word_perplexity" in p.stdout and "germeval2018_coarse" in p.stdout and "toy_hub" in p.stdout
    print(p.stdout)


def test_bad_input(tiny, tmp_path, monkeypatch):
    path, ref, model, tok = tiny
    monkeypatch.setenv("EVAL_DATA_DIR", EVAL_DATA)  # GermEval 2018 offline
    with pytest.raises(UserError, match="unknown task 'gnad11'; known tasks: germeval2017, germeval2018_coarse, gnad10"):
        ev.main(["--model", str(path), "--tasks", "gnad11"])
    with pytest.raises(UserError, match="missing.txt"):
        ev.main(["--model", str(path), "--ppl_files", str(tmp_path / "missing.txt")])
    with pytest.raises(UserError, match="task data file not found"):
        ev.main(["--model", str(path), "--tasks", "germeval2018_coarse", "--task_data",
                 f"germeval2018_coarse={tmp_path / 'missing.tsv'}"])
    with pytest.raises(UserError, match="all empty"):
        ev.perplexity(model, tok, ["", "  \n"])
    assert ev.perplexity(model, tok, ["", SHORT[0]])["skipped_empty"] == 1
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(UserError, match="no text to score"):
        ev.main(["--model", str(path), "--ppl_files", str(tmp_path / "empty.txt")])

    bare = tmp_path / "no-tokenizer"
    ref.save_pretrained(bare)
    with pytest.raises(UserError, match="no tokenizer files"):
        ev.main(["--model", str(bare), "--tasks", "germeval2018_coarse"])

    (tmp_path / "t.jsonl").write_text('{"s": "x", "y": "maybe"}\n')
    bad = {"name": "t", "data": {"test": str(tmp_path / "t.jsonl")}, "label_field": "y", "labels": {"yes": "ja"},
           "prompt": "{s}", "scoring": "loglikelihood"}
    with pytest.raises(UserError, match="'maybe', which is not among the labels yes"):
        ev.evaluate_task(ev.make_lm(model, tok), bad)
    with pytest.raises(UserError, match="has no field 'text'"):
        ev.evaluate_task(ev.make_lm(model, tok), {**bad, "prompt": "{text}"})
    with pytest.raises(UserError, match="unknown keys promt"):
        ev.load_task({**bad, "promt": "{s}"})
    with pytest.raises(UserError, match="must contain {label} exactly when scoring is 'rolling'"):
        ev.load_task({**bad, "scoring": "rolling"})

    p = run_py(["eval.py", "--model", str(path), "--tasks", "nope"])  # the CLI: one line, exit code 1
    assert p.returncode == 1 and p.stderr.startswith("error: unknown task 'nope'") and "Traceback" not in p.stderr


def test_germeval2018_data_from_eval_data_dir_else_the_hub(tiny, tmp_path, monkeypatch, capsys):
    """The documented offline command: EVAL_DATA_DIR holding germeval2018/ (from any working directory); --task_data
    comes first; without EVAL_DATA_DIR, or with one that lacks the files, the hub dataset."""
    path, ref, model, tok = tiny
    monkeypatch.setenv("EVAL_DATA_DIR", EVAL_DATA)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ev, "hub_files", lambda url: pytest.fail(f"went to the hub for {url}"))
    task = ev.load_task("germeval2018_coarse")
    local = os.path.join(EVAL_DATA, "germeval2018")
    assert ev.task_sources(task)["test"][0] == os.path.join(local, "germeval2018.test.txt")
    r = ev.main(["--model", str(path), "--tasks", "germeval2018_coarse", "--limit", "3", "--num_fewshot", "1"])
    assert r["tasks"]["germeval2018_coarse"]["n"] == 3
    assert r["tasks"]["germeval2018_coarse"]["data"] == {"test": os.path.join(local, "germeval2018.test.txt"),
                                                         "train": os.path.join(local, "germeval2018.training.txt")}

    mine = tmp_path / "mine" / "germeval2018"
    mine.mkdir(parents=True)
    (mine / "germeval2018.test.txt").write_text("Ein Tweet\tOTHER\tOTHER\n")
    monkeypatch.setenv("EVAL_DATA_DIR", str(tmp_path / "mine"))
    assert ev.task_sources(task)["test"][0] == str(mine / "germeval2018.test.txt")
    assert ev.task_sources(task, {"test": "x.tsv"})["test"][0] == "x.tsv"
    monkeypatch.setenv("EVAL_DATA_DIR", str(tmp_path / "empty"))  # no copy there: the hub
    assert ev.task_sources(task)["test"][0].startswith("hf://datasets/")
    monkeypatch.delenv("EVAL_DATA_DIR")
    assert ev.task_sources(task)["test"][0].startswith("hf://datasets/")

    with pytest.raises(SystemExit):
        ev.main(["--help"])
    assert "$EVAL_DATA_DIR/<the task's local dir>" in " ".join(capsys.readouterr().out.split())


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model (or scoring anything) fails the test: bad input must be reported before that."""
    for name in ("load_model", "perplexity", "score_task"):
        monkeypatch.setattr(ev, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} ran before the input was checked"))


def test_bad_input_before_the_model_loads(tiny, tmp_path, monkeypatch, no_model):
    path = str(tiny[0])
    monkeypatch.setenv("EVAL_DATA_DIR", EVAL_DATA)
    run = ["--model", path, "--tasks", "germeval2018_coarse"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device 'cuda': no CUDA device available"):
        ev.main([*run, "--device", "cuda"])
    for device in ("gpu", "cuda:x", "meta"):
        with pytest.raises(UserError, match=f"--device '{device}': "):
            ev.main([*run, "--device", device])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="this machine has 1 CUDA device"):
        ev.main([*run, "--device", "cuda:1"])

    with pytest.raises(UserError, match="is a directory"):
        ev.main([*run, "--output", str(tmp_path)])
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=f"{tmp_path / 'file'} is a file"):
        ev.main([*run, "--output", str(tmp_path / "file" / "sub" / "results.json")])
    ev.check_output(str(tmp_path / "new" / "sub" / "results.json"))  # fine, and nothing created yet
    assert not (tmp_path / "new").exists()

    for flag, value in (("--num_fewshot", "-1"), ("--limit", "0"), ("--batch_size", "0"), ("--stride", "0")):
        with pytest.raises(UserError, match=f"{flag} {value}: must be at least"):
            ev.main([*run, flag, value])
    with pytest.raises(UserError, match="num_fewshot=-1 must be at least 0"):
        ev.prepare_task("germeval2018_coarse", num_fewshot=-1)

    # the second task's data is read (and found wanting) before the first is scored
    (tmp_path / "t.jsonl").write_text('{"s": "x", "y": "yes"}\n')
    good = {"name": "good", "data": {"test": str(tmp_path / "t.jsonl")}, "label_field": "y", "labels": {"yes": "ja"},
            "prompt": "{s}", "scoring": "loglikelihood"}
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "bad.json").write_text(json.dumps({**good, "name": "bad", "prompt": "{text}"}))
    (tmp_path / "gone.json").write_text(json.dumps({**good, "name": "gone", "data": {"test": str(tmp_path / "x.tsv")}}))
    tasks = ["--model", path, "--tasks"]
    with pytest.raises(UserError, match="has no field 'text'"):
        ev.main([*tasks, f"{tmp_path / 'good.json'},{tmp_path / 'bad.json'}"])
    with pytest.raises(UserError, match="task gone .test split.: .*x.tsv: task data file not found"):
        ev.main([*tasks, f"germeval2018_coarse,{tmp_path / 'gone.json'}"])
    with pytest.raises(UserError, match="no train split known"):
        ev.main([*tasks, f"germeval2018_coarse,{tmp_path / 'good.json'}", "--num_fewshot", "1"])
    with pytest.raises(UserError, match="names good more than once"):
        ev.main([*tasks, f"{tmp_path / 'good.json'},{tmp_path / 'good.json'}"])

    p = run_py(["eval.py", *run, "--device", "cuda"], env={"CUDA_VISIBLE_DEVICES": ""})  # the CLI: one line
    assert p.returncode == 1 and p.stderr.startswith("error: --device 'cuda': ") and "Traceback" not in p.stderr


def test_a_task_whose_labels_share_a_verbaliser_is_refused(tiny, tmp_path, no_model):
    """Two labels with one verbaliser score alike on every example, and the argmax picks the first: refused in one
    line naming the task file and the duplicate, before the model loads."""
    (tmp_path / "t.jsonl").write_text('{"s": "x", "y": "yes"}\n')
    task = {"name": "dup", "data": {"test": str(tmp_path / "t.jsonl")}, "label_field": "y",
            "labels": {"yes": "ja", "maybe": "vielleicht", "no": "ja"}, "prompt": "{s}", "scoring": "loglikelihood"}
    (tmp_path / "dup.json").write_text(json.dumps(task))
    refused = (f"{tmp_path / 'dup.json'}: labels 'yes' and 'no' share the verbaliser 'ja'; every example would be "
               "predicted as the first: give each label its own")
    with pytest.raises(UserError, match="^" + re.escape(refused) + "$"):
        ev.main(["--model", str(tiny[0]), "--tasks", str(tmp_path / "dup.json")])


def test_a_missing_model_is_reported_before_the_task_data(tmp_path, monkeypatch, no_model):
    """A typo in --model names the model, not the task's hub dataset that the task data check would fail on."""
    monkeypatch.delenv("EVAL_DATA_DIR", raising=False)
    monkeypatch.setattr(ev, "prepare_task", lambda *a, **k: pytest.fail("the task data was read first"))
    with pytest.raises(UserError, match=f"{tmp_path / 'typo'}: no such directory"):
        ev.main(["--model", str(tmp_path / "typo"), "--tasks", "germeval2018_coarse"])


def test_missing_relative_ppl_file(tiny, tmp_path, monkeypatch, no_model):
    """dir/missing.txt names a file (a data-file suffix), not a hub dataset 'dir/missing.txt'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match="dir/missing.txt: no such file"):
        ev.main(["--model", str(tiny[0]), "--ppl_files", "dir/missing.txt"])


def test_a_diverged_model_has_infinite_perplexity_written_as_null(tmp_path):
    from eval import perplexity_metrics
    from common import read_json, write_json

    m = perplexity_metrics(nll=1e6, tokens=1000, words=100, n_bytes=5000)
    assert m["word_perplexity"] == m["token_perplexity"] == float("inf") and m["bits_per_byte"] > 0
    write_json(tmp_path / "r.json", m)  # strict JSON: no Infinity token
    assert read_json(str(tmp_path / "r.json"))["word_perplexity"] is None
