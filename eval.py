r"""
Score any checkpoint of this project (or any HF-format GPT-NeoX) comparably across tokenizers: perplexity per word
and per byte, and the study's German downstream tasks, offline once the data is local.

    python eval.py --model DIR_OR_HUB_ID [--revision REV] [--ppl_files FILE ...] [--tasks germeval2018_coarse,...] \
        [--task_data NAME[:train]=PATH ...] [--num_fewshot 0] [--limit N] [--batch_size 8] \
        [--device cpu|cuda] [--dtype float32|bfloat16] [--output results.json]
    python eval.py --list_tasks

Perplexity (the OpenGPTX `oscar_ppl` definitions, summed over all documents, never a mean of means):
    token_perplexity = exp(NLL / tokens)      word_perplexity = exp(NLL / whitespace words)
    byte_perplexity  = exp(NLL / UTF-8 bytes)  bits_per_byte  = NLL / (UTF-8 bytes * ln 2)
Each document is tokenized on its own (without special tokens) and preceded by one prefix token, so its first token is
scored too: the tokenizer's BOS token when it names one (Llama 2/3, Mistral: <|begin_of_text|>, <s>), else its
end-of-text token (Qwen; GPT-NeoX and GPT-2 name <|endoftext|> for both), as lm-evaluation-harness's prefix_token_id
chooses it and as data.py frames each training document for a tokenizer that adds BOS. Rolling windows of max_length
tokens (default: the model's max_position_embeddings) with a stride (default: max_length) score every token exactly
once: the first window scores the first max_length tokens, each later window ends `stride` tokens further on, reads
the max_length tokens before its end and scores only its last `stride` tokens, so every token after the first window
sees at least max_length - stride tokens of context. With the default stride this is lm-evaluation-harness's
`loglikelihood_rolling` (get_rolling_token_windows with context_len=1), so the numbers match `ogx_oscar_ppl_de`; a
smaller stride gives more context per token (Hugging Face's "strided perplexity") at max_length/stride times the
cost. Words are `len(text.split())`; the harness counts `len(re.split(r"\s+", text))`, which differs by one for a
document with leading or trailing whitespace. Empty documents are skipped (and counted). Where a tokenizer's BOS is
not its eos, the harness versions differ: the OpenGPTX branch (v0.3) prefixes eos; v0.4.3 to v0.4.9.1 do as eval.py
does; from v0.4.9.2 on the text is encoded with the tokenizer's special tokens, so for one that adds BOS the first
window reads BOS, BOS and also scores the second BOS, which eval.py does not. Input: anything data.py reads (.txt,
.jsonl/.parquet with --text_field, TEI .xml, directories, globs, hf://, URLs; a .txt file is one document unless
--txt_documents says otherwise).

Tasks are data, not code: tasks/NAME.json (or the path of any such file) gives the prompt template, the verbaliser of
each label, the data and the scoring rule (the format is described above TASK_KEYS below). `loglikelihood`: the
prediction is the label whose " " + verbaliser has the highest summed log-probability after the prompt (context and
continuation tokenized separately, as the harness does); `rolling`: the label whose filled-in template ({label}
replaced) has the highest whole-sequence log-probability (XNLI, PAWS-X). k-shot examples come from the train split,
drawn as the harness draws them (random.Random(seed) shuffles the test examples, --limit keeps the first N, then k
training examples are sampled per test example). Metrics: acc, macro_f1 (unweighted mean of per-label F1 over the
labels seen in gold or predictions) and n.

Where task data comes from, per split, first match wins: `--task_data NAME=FILE` (test split; `NAME:train=FILE` for
the train split) or `--task_data NAME=DIR` (a copy of the original files, named in the definition's `local` entry);
then $EVAL_DATA_DIR/<local dir>/<file> when that file exists (a copy of the original release, e.g.
EVAL_DATA_DIR=DIR with DIR/germeval2018/germeval2018.test.txt: GermEval 2018 offline); else
the definition's `data` source, usually a hub dataset (hf://datasets/ORG/NAME[@REV]/FILES, through the huggingface_hub
cache; HF_HUB_OFFLINE=1 reads only the cache). Parquet files need pyarrow. Every task's definition and data are read,
and every other input checked, before the model loads: a mistake in the last task costs seconds, not a scored run.

The same evaluation with the study's harness, for an exported checkpoint (an HF-format directory; the OpenGPTX tasks
live only on the legacy `master` branch, whose metrics need datasets<3):
    git clone -b master https://github.com/OpenGPTX/lm-evaluation-harness && cd lm-evaluation-harness
    pip install -e . "datasets<3"
    python main.py --model hf --model_args pretrained=/path/to/out/hf --no_tokenizer_check --device cuda:0 \
        --batch_size 8 --num_fewshot 0 --output_path results.json \
        --tasks ogx_oscar_ppl_de,ogx_germeval2017,ogx_germeval2018_coarse,ogx_gnad10,ogx_xnli_de,ogx_pawsx_de,ogx_xstance_de
"""

import argparse
import csv
import glob
import gzip
import io
import json
import math
import os
import random
import string
import time
from collections import Counter
from dataclasses import dataclass
from itertools import islice

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from common import (UserError, check_device, exp, load_tokenizer, read_json, read_special_tokens, resolve_model_dir,
                    run_cli, torch_dtype, write_json)
from model import CausalLM

ROOT = os.path.dirname(os.path.abspath(__file__))
TASKS_DIR = os.path.join(ROOT, "tasks")

# -----------------------------------------------------------------------------
# the model and its tokenizer


def load_model(name_or_path, revision=None, device="cpu"):
    """(model, tokenizer, prefix_token_id) from an HF-format directory or hub id. The tokenizer files are required:
    text is scored with the tokenizer the model was trained with, never a guessed one. The prefix is the harness's
    (HFLM.prefix_token_id): the tokenizer's bos_token when it names one, else its eos_token (None: neither, and
    make_lm takes the model config's)."""
    path = resolve_model_dir(name_or_path, revision)
    has_json = os.path.isfile(os.path.join(path, "tokenizer.json"))
    has_bpe = all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt"))
    if not (has_json or has_bpe):
        raise UserError(f"{name_or_path}: the model has no tokenizer files (tokenizer.json, or vocab.json + "
                        "merges.txt); eval.py needs the model's own tokenizer to score text (model.save_tokenizer "
                        "writes them next to the weights)")
    tokenizer = load_tokenizer(path)
    model = CausalLM.from_pretrained(path, device=device).eval()
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise UserError(f"{name_or_path}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model embeds "
                        f"only {model.config.vocab_size}; the tokenizer files belong to another model")
    special = read_special_tokens(path)
    ids = [tokenizer.token_to_id(special[role]) for role in ("bos_token", "eos_token") if special.get(role)]
    return model, tokenizer, next((i for i in ids if i is not None), None)


@dataclass
class LM:
    """What scoring needs besides the model: the tokenizer, the token every document starts from, the window."""
    model: CausalLM
    tokenizer: object
    prefix_token_id: int
    max_length: int
    batch_size: int
    autocast_dtype: torch.dtype = None
    progress: bool = True

    def encode(self, texts):
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def bar(self, **kw):
        return tqdm(disable=None if self.progress else True, leave=False, dynamic_ncols=True, **kw)


def make_lm(model, tokenizer, max_length=None, batch_size=8, prefix_token_id=None, dtype=None, progress=True):
    block = model.config.block_size
    max_length = max_length or block
    if not 1 <= max_length <= block:
        raise UserError(f"max_length={max_length} must lie in [1, {block}] (the model's max_position_embeddings)")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be at least 1")
    autocast = None if dtype in (None, "float32") else torch_dtype(dtype)
    if prefix_token_id is None:  # without the tokenizer's files: the model config's bos, else its eos
        bos = getattr(model.config, "bos_token_id", None)
        prefix_token_id = model.config.eos_token_id if bos is None else bos
    return LM(model, tokenizer, prefix_token_id, max_length, batch_size, autocast, progress)


# -----------------------------------------------------------------------------
# scoring: summed log-probabilities of token windows, batched


SCORE_CHUNK = 1024  # positions whose logits exist at once: 0.5 GB of fp32 at a 128k vocabulary, not (T, V)


@torch.no_grad()
def score_windows(lm, windows, bar=None):
    """For each window (tokens, n): the summed log p(token | the tokens before it in the window) over its last n
    tokens; a window holds at most max_length + 1 tokens (the model reads all but the last). Longest first, one
    forward per batch, padded on the right (causal attention: padding never reaches a scored position); the head
    applied to the scored positions only, SCORE_CHUNK at a time (a 32k-token window's full logits at a 150k
    vocabulary would be 20 GB)."""
    device = next(lm.model.parameters()).device
    autocast = torch.autocast(device.type, dtype=lm.autocast_dtype, enabled=lm.autocast_dtype is not None)
    head = lm.model.output_embeddings()
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    sums = [0.0] * len(windows)
    for start in range(0, len(order), lm.batch_size):
        batch = order[start:start + lm.batch_size]
        idx = torch.zeros((len(batch), len(windows[batch[0]][0]) - 1), dtype=torch.long)
        for row, i in enumerate(batch):
            tokens = windows[i][0]
            idx[row, :len(tokens) - 1] = torch.tensor(tokens[:-1])
        with autocast:
            hidden = lm.model.hidden_states(idx.to(device))
        rows = []
        for row, i in enumerate(batch):
            tokens, n = windows[i]
            T = len(tokens) - 1
            targets = torch.tensor(tokens[T - n + 1:], device=device)
            total = torch.zeros((), dtype=torch.float64, device=device)
            for lo in range(0, n, SCORE_CHUNK):  # the scored positions' logits, a chunk at a time
                with autocast:
                    logits = head(hidden[row, T - n + lo:T - n + lo + SCORE_CHUNK])
                logp = F.log_softmax(logits.float(), dim=-1)
                total += logp.gather(-1, targets[lo:lo + SCORE_CHUNK, None]).double().sum()
            rows.append(total)
        for i, s in zip(batch, torch.stack(rows).tolist()):
            sums[i] = s
        if bar is not None:
            bar.update(sum(windows[i][1] for i in batch))
    return sums


def rolling_windows(tokens, prefix_token_id, max_length, stride=None):
    """Windows (tokens, n_scored) that score every token of a document once (module docstring): the first scores
    tokens[0:max_length] after the prefix token, each later one ends `stride` tokens further on and scores only
    the tokens it adds. stride=max_length is lm-evaluation-harness's loglikelihood_rolling."""
    stride = stride or max_length
    if not 1 <= stride <= max_length:
        raise UserError(f"stride={stride} must lie in [1, max_length={max_length}]")
    seq = [prefix_token_id] + list(tokens)
    end = min(max_length, len(tokens))
    windows = [(seq[:end + 1], end)] if tokens else []
    while end < len(tokens):
        new_end = min(end + stride, len(tokens))
        windows.append((seq[new_end - max_length:new_end + 1], new_end - end))
        end = new_end
    return windows


def perplexity_metrics(nll, tokens, words, n_bytes):
    return {"token_perplexity": exp(nll / tokens), "word_perplexity": exp(nll / words) if words else None,
            "byte_perplexity": exp(nll / n_bytes), "bits_per_byte": nll / (n_bytes * math.log(2))}


def perplexity(model, tokenizer, documents, max_length=None, stride=None, batch_size=8, prefix_token_id=None,
               dtype=None, progress=True, chunk_documents=256):
    """Token, word and byte perplexity and bits per byte of `documents` (an iterable of strings), summed over all
    of them. Streams: documents are tokenized and scored `chunk_documents` at a time."""
    lm = make_lm(model, tokenizer, max_length, batch_size, prefix_token_id, dtype, progress)
    stride = stride or lm.max_length
    documents = iter([documents] if isinstance(documents, str) else documents)
    c = Counter()
    with lm.bar(desc="perplexity", unit="tok") as bar:
        while chunk := list(islice(documents, chunk_documents)):
            texts = [t for t in chunk if t.strip()]
            c["skipped_empty"] += len(chunk) - len(texts)
            windows = []
            for ids in lm.encode(texts):
                windows += rolling_windows(ids, lm.prefix_token_id, lm.max_length, stride)
                c["tokens"] += len(ids)
            c["nll"] -= sum(score_windows(lm, windows, bar))
            c["documents"] += len(texts)
            c["words"] += sum(len(t.split()) for t in texts)
            c["bytes"] += sum(len(t.encode("utf-8")) for t in texts)
    if not c["documents"]:
        raise UserError(f"no text to score: {c['skipped_empty']} documents, all empty" if c["skipped_empty"] else
                        "no text to score: no documents (empty files?)")
    return {**perplexity_metrics(c["nll"], c["tokens"], c["words"], c["bytes"]), "nll": c["nll"],
            **{k: c[k] for k in ("documents", "skipped_empty", "tokens", "words", "bytes")},
            "max_length": lm.max_length, "stride": stride}


# -----------------------------------------------------------------------------
# task definitions (tasks/*.json)
#
# A definition is one JSON object; a user adds a task by writing one (into tasks/, or anywhere and passing its path):
#   name, description, reference, harness_task, notes   what it is and where the prompt comes from
#   data    {"test": SOURCE, "train": SOURCE, "columns": [...]}: the default data, usually a hub dataset
#           (hf://datasets/ORG/NAME[@REV]/FILE-OR-GLOB), or a local path/glob; TSV (.tsv/.txt), CSV, JSONL/.json,
#           parquet, .gz for the text formats; header-less TSV/CSV name their fields with "columns"
#   local   {"dir": ..., "test": FILE, "train": FILE, "columns": [...]}: the file names of a local copy of the
#           original files, found under --task_data NAME=DIR or $EVAL_DATA_DIR/<dir>
#   filter  {"test": {field: value}, "train": {...}}: keep only the records whose fields have these values
#   label_field, labels   the field holding the gold label; label value (as a string) -> verbaliser
#   prompt  a str.format template over the record's fields ({text}, {premise}, ...; {label} for rolling scoring)
#   scoring "loglikelihood" (" " + verbaliser after the prompt) or "rolling" (the whole filled-in prompt)

TASK_KEYS = {"name", "description", "reference", "harness_task", "data", "local", "filter", "label_field", "labels",
             "prompt", "scoring", "notes"}
DATA_KEYS = {"test", "train", "format", "columns", "dir"}
SCORING = ("loglikelihood", "rolling")


def known_tasks():
    return sorted(f[:-len(".json")] for f in os.listdir(TASKS_DIR) if f.endswith(".json"))


def load_task(task):
    """A checked task definition from a known name (tasks/NAME.json), the path of a .json file, or a dict."""
    if isinstance(task, dict):
        definition, source = task, f"task {task.get('name', '?')!r}"
    elif task.endswith(".json") or os.sep in task:
        definition, source = read_json(task), task
    elif task in known_tasks():
        source = os.path.join(TASKS_DIR, task + ".json")
        definition = read_json(source)
    else:
        raise UserError(f"unknown task {task!r}; known tasks: {', '.join(known_tasks())} (or the path of a task "
                        "definition .json)")
    check_task(definition, source)
    return definition


def prompt_fields(template, source="prompt"):
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise UserError(f"{source}: prompt is not a valid template ({e}; write literal braces as {{{{ }}}})") from None


def check_task(t, source):
    """Every key known, every required key present, the template consistent with the scoring rule."""
    def fail(msg):
        raise UserError(f"{source}: {msg}")
    if not isinstance(t, dict):
        fail("a task definition is a JSON object")
    if unknown := sorted(set(t) - TASK_KEYS):
        fail(f"unknown keys {', '.join(unknown)} (known: {', '.join(sorted(TASK_KEYS))})")
    for key in ("name", "prompt", "labels", "label_field", "scoring", "data"):
        if key not in t:
            fail(f"missing key {key!r}")
    if t["scoring"] not in SCORING:
        fail(f"scoring {t['scoring']!r}, expected one of {', '.join(SCORING)}")
    if not isinstance(t["labels"], dict) or not t["labels"] or not all(
            isinstance(v, str) and v for v in t["labels"].values()):
        fail("labels must map each label value to a non-empty verbaliser string")
    first = {}
    for label, verbaliser in t["labels"].items():  # one verbaliser for two labels: argmax always picks the first
        if verbaliser in first:
            fail(f"labels {first[verbaliser]!r} and {label!r} share the verbaliser {verbaliser!r}; every example "
                 "would be predicted as the first: give each label its own")
        first[verbaliser] = label
    fields = prompt_fields(t["prompt"], source)
    if ("label" in fields) != (t["scoring"] == "rolling"):
        fail("the prompt must contain {label} exactly when scoring is 'rolling' (the verbaliser goes into the "
             "sequence); 'loglikelihood' appends ' ' + verbaliser after the prompt")
    for key in ("data", "local"):
        if key in t:
            if not isinstance(t[key], dict) or "test" not in t[key]:
                fail(f"{key!r} must be an object with at least a 'test' source")
            if unknown := sorted(set(t[key]) - DATA_KEYS):
                fail(f"unknown keys in {key!r}: {', '.join(unknown)} (known: {', '.join(sorted(DATA_KEYS))})")


# -----------------------------------------------------------------------------
# task data: where each split comes from, and its records


def task_sources(task, override=None):
    """{split: (source, columns)} for the test and (when known) train split; see the module docstring for the
    order. `override`: {"test": PATH, "train": PATH} or {"dir": DIR}. `columns` name the fields of header-less
    TSV/CSV copies of the original files (the definition's `local` entry)."""
    override, local = dict(override or {}), task.get("local")
    base = override.pop("dir", None)
    if base is not None and not local:
        raise UserError(f"{task['name']}: a data directory needs the file names of a 'local' entry, which this "
                        f"definition lacks; give the files: --task_data {task['name']}=TEST_FILE "
                        f"[--task_data {task['name']}:train=TRAIN_FILE]")
    root = os.environ.get("EVAL_DATA_DIR")
    if base is None and local and root:
        candidate = os.path.join(root, local.get("dir", ""))
        if os.path.isfile(os.path.join(candidate, local["test"])):
            base = candidate
    columns = (local or {}).get("columns")
    sources = {}
    for split in ("test", "train"):
        if split in override:
            sources[split] = (override[split], columns)
        elif base is not None:
            if split in local:
                sources[split] = (os.path.join(base, local[split]), columns)
        elif split in task["data"]:
            sources[split] = (task["data"][split], task["data"].get("columns"))
    return sources


def hub_files(url):
    """Local paths of hf://datasets/ORG/NAME[@REVISION]/PATH-OR-GLOB, fetched into (or read from) the
    huggingface_hub cache by data.py's source layer (one hf:// grammar, one download path for both tools)."""
    _, fetchers = data.open_source(url, suffixes=tuple(FORMATS) + tuple(f"{s}.gz" for s in FORMATS if s != ".parquet"))
    return [fetch() for fetch in fetchers]


FORMATS = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def file_format(path):
    stem = path[:-len(".gz")] if path.endswith(".gz") else path
    ext = os.path.splitext(stem)[1].lower()
    if ext not in FORMATS:
        raise UserError(f"{path}: unknown task data format {ext or '(no extension)'!r} "
                        f"(known: {', '.join(sorted(FORMATS))}, optionally .gz)")
    return FORMATS[ext]


def read_delimited(path, f, delimiter, columns):
    """TSV is split on tabs as is (tweets contain quote marks); CSV follows the csv module's quoting rules."""
    rows = (line.rstrip("\r\n").split("\t") for line in f) if delimiter == "\t" else csv.reader(f)
    header = columns
    for lineno, row in enumerate(rows, 1):
        if not any(row):
            continue
        if header is None:
            header = row
            continue
        if len(row) != len(header):
            raise UserError(f"{path}:{lineno}: {len(row)} fields, expected {len(header)} ({', '.join(header)})")
        yield dict(zip(header, row))


def read_records(source, columns=None):
    """The records (dicts) of a task data source: a file or glob (TSV/.txt, CSV, JSONL/.json, parquet, .gz for the
    text formats) or an hf:// dataset path. Header-less TSV/CSV need `columns`."""
    files = hub_files(source) if source.startswith("hf://") else sorted(glob.glob(os.path.expanduser(source)))
    if not files:
        raise UserError(f"{source}: task data file not found")
    records = []
    for path in files:
        kind = file_format(path)
        if kind == "parquet":
            records += data.import_pyarrow(path).read_table(path).to_pylist()
            continue
        try:
            with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8", newline="") as f:
                if kind == "jsonl":
                    text = f.read()
                    try:
                        rows = json.loads(text) if text.lstrip().startswith("[") else [
                            json.loads(line) for line in io.StringIO(text) if line.strip()]
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}: not JSON lines ({e})") from None
                    records += rows
                else:
                    records += read_delimited(path, f, "\t" if kind == "tsv" else ",", columns)
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e})") from None
    return records, files


def task_examples(task, split, records, source):
    """The records a split keeps (the definition's filter; rows with an empty prompt field skipped), each checked
    for the prompt fields and a label the verbalisers know. Returns (examples, n_skipped)."""
    fields = [f for f in prompt_fields(task["prompt"]) if f != "label"]
    wanted = {k: str(v) for k, v in (task.get("filter") or {}).get(split, {}).items()}
    examples, skipped = [], 0
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"{source}: record {i} is not an object")
        missing = [f for f in fields + [task["label_field"]] + list(wanted) if f not in rec]
        if missing:
            raise UserError(f"{source}: record {i} has no field {', '.join(map(repr, missing))} (fields: "
                            f"{', '.join(rec)}); check the definition's prompt, label_field and columns")
        if any(str(rec[k]) != v for k, v in wanted.items()):
            continue
        if any(rec[f] is None or str(rec[f]) == "" for f in fields):
            skipped += 1
            continue
        label = str(rec[task["label_field"]])
        if label not in task["labels"]:
            raise UserError(f"{source}: record {i} has {task['label_field']}={label!r}, which is not among the "
                            f"labels {', '.join(task['labels'])} of task {task['name']}")
        examples.append({**{f: str(rec[f]) for f in fields}, "label": label})
    return examples, skipped


def load_split(task, sources, split):
    if split not in sources:
        raise UserError(f"{task['name']}: no {split} split known (few-shot examples come from the train split); "
                        f"give one with --task_data {task['name']}:{split}=FILE")
    source, columns = sources[split]
    try:
        records, files = read_records(source, columns)
    except UserError as e:
        raise UserError(f"task {task['name']} ({split} split): {e}") from None
    examples, skipped = task_examples(task, split, records, source)
    if not examples:
        raise UserError(f"{source}: no {split} examples for task {task['name']} ({len(records)} records read)")
    return examples, skipped


# -----------------------------------------------------------------------------
# task scoring


def render(task, example, label=None):
    """The prompt filled in with an example's fields (and, for rolling scoring, a label's verbaliser)."""
    fields = {k: v for k, v in example.items() if k != "label"}
    if label is not None:
        fields["label"] = task["labels"][label]
    return task["prompt"].format(**fields)


def task_requests(task, examples, train=None, num_fewshot=0, seed=42, limit=None):
    """(examples kept, requests): per example one request per label, in the definition's label order: (context,
    continuation) for loglikelihood, (full string, None) for rolling. k-shot contexts prepend k solved training
    examples, each followed by a blank line; examples and shots are drawn as lm-evaluation-harness v0.3 does."""
    rng = random.Random(seed)
    examples = list(examples)
    rng.shuffle(examples)
    examples = examples[:limit] if limit else examples
    if num_fewshot and (train is None or len(train) < num_fewshot):
        raise UserError(f"{task['name']}: {num_fewshot}-shot needs {num_fewshot} training examples, "
                        f"found {0 if train is None else len(train)}")
    requests = []
    for ex in examples:
        shots = rng.sample(train, num_fewshot) if num_fewshot else []
        if task["scoring"] == "loglikelihood":
            prefix = "".join(render(task, s) + " " + task["labels"][s["label"]] + "\n\n" for s in shots)
            requests.append([(prefix + render(task, ex), " " + v) for v in task["labels"].values()])
        else:
            prefix = "".join(render(task, s, s["label"]) + "\n\n" for s in shots)
            requests.append([(prefix + render(task, ex, label), None) for label in task["labels"]])
    return examples, requests


def macro_f1(gold, pred):
    """Unweighted mean F1 over the labels present in gold or predictions (sklearn's average='macro')."""
    scores = []
    for c in sorted(set(gold) | set(pred)):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


@dataclass
class PreparedTask:
    """A task ready to score: its checked definition, where its data came from, the examples kept and their
    requests. Everything but the model's scores, so that the CLI prepares every task before the model loads."""
    task: dict
    sources: dict
    examples: list
    requests: list
    skipped: int
    num_fewshot: int


def prepare_task(task, data=None, num_fewshot=0, limit=None, seed=42):
    """A PreparedTask from a task (a name, a definition path or dict). `data` overrides where the data comes from:
    a test file, a directory with the original files, or {"test": ..., "train": ..., "dir": ...}."""
    if num_fewshot < 0:
        raise UserError(f"num_fewshot={num_fewshot} must be at least 0")
    if limit is not None and limit < 1:
        raise UserError(f"limit={limit} must be at least 1")
    task = load_task(task)
    if isinstance(data, str):
        data = {"dir": data} if os.path.isdir(data) else {"test": data}
    sources = task_sources(task, data)
    test, skipped = load_split(task, sources, "test")
    train = load_split(task, sources, "train")[0] if num_fewshot else None
    examples, requests = task_requests(task, test, train, num_fewshot, seed, limit)
    return PreparedTask(task, sources, examples, requests, skipped, num_fewshot)


def score_task(lm, prepared):
    """acc, macro_f1 and n (and the counts behind them) of a PreparedTask."""
    task, examples, requests = prepared.task, prepared.examples, prepared.requests
    windows, owner = [], []  # every request becomes one or more windows; owner maps a window to its request
    flat, k = [r for per_example in requests for r in per_example], len(task["labels"])
    if task["scoring"] == "loglikelihood":  # one context per example, tokenized once, continuations apart
        continuations = lm.encode(" " + v for v in task["labels"].values())
        for e, ctx in enumerate(lm.encode(per_example[0][0] for per_example in requests)):
            for j, cont in enumerate(continuations):
                whole = ((ctx or [lm.prefix_token_id]) + cont)[-(lm.max_length + 1):]
                windows.append((whole, min(len(cont), len(whole) - 1)))
                owner.append(e * k + j)
    else:
        for i, ids in enumerate(lm.encode(s for s, _ in flat)):
            for w in rolling_windows(ids, lm.prefix_token_id, lm.max_length):
                windows.append(w)
                owner.append(i)
    scores = [0.0] * len(flat)
    with lm.bar(desc=task["name"], unit="tok", total=sum(n for _, n in windows)) as bar:
        for i, s in zip(owner, score_windows(lm, windows, bar)):
            scores[i] += s

    labels = list(task["labels"])
    pred = [labels[max(range(k), key=lambda j: scores[e * k + j])] for e in range(len(examples))]
    gold = [ex["label"] for ex in examples]
    return {"acc": sum(g == p for g, p in zip(gold, pred)) / len(gold), "macro_f1": macro_f1(gold, pred),
            "n": len(gold), "num_fewshot": prepared.num_fewshot, "scoring": task["scoring"],
            "skipped": prepared.skipped, "gold_counts": dict(Counter(gold)), "pred_counts": dict(Counter(pred)),
            "data": {split: src for split, (src, _) in prepared.sources.items()
                     if split == "test" or prepared.num_fewshot}}


def evaluate_task(lm, task, data=None, num_fewshot=0, limit=None, seed=42):
    """acc, macro_f1 and n of one task (a name, a definition path or dict) scored by `lm` (make_lm: the model, its
    tokenizer and the window); `data` as for prepare_task."""
    return score_task(lm, prepare_task(task, data, num_fewshot, limit, seed))


# -----------------------------------------------------------------------------
# the command line


def parse_task_data(items, names):
    """--task_data NAME=PATH / NAME:SPLIT=PATH -> {name: {"test"|"train"|"dir": PATH}}."""
    out = {}
    for item in items or []:
        key, sep, path = item.partition("=")
        name, _, split = key.partition(":")
        if not sep or not path or split not in ("", "test", "train"):
            raise UserError(f"--task_data {item!r}: expected NAME=PATH or NAME:train=PATH")
        if name not in names:
            raise UserError(f"--task_data {item!r}: task {name!r} is not among --tasks ({', '.join(names)})")
        kind = split or ("dir" if os.path.isdir(path) else "test")
        out.setdefault(name, {})[kind] = path
    return out


def check_output(path):
    """The result file must be writable where it is named: found out after scoring, the error would lose the run.
    Creates nothing (write_json makes the missing directories at the end)."""
    if os.path.isdir(path):
        raise UserError(f"--output {path}: is a directory; name the JSON result file, e.g. {path}/results.json")
    parent = existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--output {path}: cannot create the directory {parent}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output {path}: {existing} is not writable")


def format_table(results):
    lines = []
    if "token_perplexity" in results:
        lines.append(f"perplexity: {results['documents']:,} documents, {results['tokens']:,} tokens, "
                     f"{results['words']:,} words, {results['bytes']:,} bytes (window {results['max_length']}, "
                     f"stride {results['stride']})")
        for key in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
            value = results[key]
            lines.append(f"  {key:<18} {'n/a' if value is None else format(value, ',.4f'):>18}")
    if results.get("tasks"):
        lines.append(f"{'task':<22} {'n':>6} {'shots':>5} {'acc':>7} {'macro_f1':>9}")
        for name, r in results["tasks"].items():
            lines.append(f"{name:<22} {r['n']:>6} {r['num_fewshot']:>5} {r['acc']:>7.4f} {r['macro_f1']:>9.4f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF-format model directory or hub id (with its tokenizer files)")
    p.add_argument("--revision", default=None, help="hub revision, e.g. step143000")
    p.add_argument("--ppl_files", nargs="+", action="extend", default=[], help="text to score: files, dirs, globs, hf://, URLs")
    p.add_argument("--text_field", default="text", help="the text field of .jsonl/.parquet perplexity files")
    p.add_argument("--txt_documents", default="file", choices=data.TXT_DOCUMENTS,
                   help="a .txt perplexity file is one document, one per line, or one per blank-line block")
    p.add_argument("--tasks", default="", help="comma-separated task names or definition .json paths")
    p.add_argument("--task_data", nargs="+", action="extend", default=[], metavar="NAME[:train]=PATH",
                   help="a local copy of a task's data: a test file, NAME:train=FILE, or a directory of the "
                        "original files. Without it local data is looked for in $EVAL_DATA_DIR/<the task's "
                        "local dir>, else the task's hub dataset is read")
    p.add_argument("--num_fewshot", type=int, default=0)
    p.add_argument("--seed", type=int, default=42, help="shuffles test examples and draws few-shot examples")
    p.add_argument("--limit", type=int, default=None, help="at most N documents and N examples per task")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--max_length", type=int, default=None, help="window length (default: max_position_embeddings)")
    p.add_argument("--stride", type=int, default=None, help="perplexity window stride (default: max_length)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="bfloat16/float16: autocast over float32 weights")
    p.add_argument("--output", default=None, help="JSON result file (written atomically)")
    p.add_argument("--list_tasks", action="store_true", help="list the known tasks and exit")
    args = p.parse_args(argv)

    if args.list_tasks:
        for name in known_tasks():
            print(f"{name:<22} {load_task(name).get('description', '')}")
        return None
    # every input is checked, and every task's data read, before the model loads and anything is scored
    if not args.model:
        raise UserError("--model is required (an HF-format directory or hub id)")
    resolve_model_dir(args.model, args.revision)  # first: a typo in --model is not reported as missing task data
    check_device(args.device)
    for flag, low in (("num_fewshot", 0), ("limit", 1), ("batch_size", 1), ("max_length", 1), ("stride", 1)):
        if getattr(args, flag) is not None and getattr(args, flag) < low:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least {low}")
    if args.output:
        check_output(args.output)
    tasks = [load_task(t.strip()) for t in args.tasks.split(",") if t.strip()]
    names = [t["name"] for t in tasks]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise UserError(f"--tasks names {', '.join(twice)} more than once (results are keyed by task name)")
    if not args.ppl_files and not tasks:
        raise UserError(f"nothing to evaluate: give --ppl_files and/or --tasks (known: {', '.join(known_tasks())})")
    task_data = parse_task_data(args.task_data, names)
    docs = data.iter_documents(args.ppl_files, text_field=args.text_field, txt_documents=args.txt_documents) \
        if args.ppl_files else None  # lists (and checks) every source now, reads them later
    prepared = [prepare_task(task, task_data.get(name), args.num_fewshot, args.limit, args.seed)
                for name, task in zip(names, tasks)]
    t0 = time.time()
    model, tokenizer, prefix = load_model(args.model, args.revision, args.device)
    common = dict(max_length=args.max_length, batch_size=args.batch_size, prefix_token_id=prefix, dtype=args.dtype)

    results = {"model": args.model, "revision": args.revision, "device": args.device, "dtype": args.dtype}
    if docs is not None:
        results.update(perplexity(model, tokenizer, islice(docs, args.limit), stride=args.stride, **common),
                       ppl_files=args.ppl_files)
    lm = make_lm(model, tokenizer, **common)
    results["tasks"] = {name: score_task(lm, task) for name, task in zip(names, prepared)}
    results["seconds"] = round(time.time() - t0, 2)
    print(format_table(results))
    if args.output:
        write_json(args.output, results)
        print(f"results: {args.output}")
    return results


if __name__ == "__main__":
    run_cli(main)
