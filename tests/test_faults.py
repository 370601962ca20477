"""Fault injection: kill -9 (also in the middle of a checkpoint write), SIGTERM under torchrun, non-finite losses and
a hung DDP peer; bad input across the CLIs. A run that dies must resume from its last complete checkpoint and end
exactly where an uninterrupted run ends; a mistake in a file must be one line naming the file, before any work."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, metrics, run_py, train_args, weights

import data
import train
from checkpoint import latest_sharded
from common import UserError
from model import GPTNeoX

RUN = "import sys; import train; from common import run_cli; run_cli(train.main, sys.argv[1:])"


def spawn(argv, prelude="", env=None):
    """train.py in a child process, optionally with fault-injection code run first."""
    return subprocess.Popen([sys.executable, "-c", prelude + "\n" + RUN, *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def wait_for_lines(out, n, proc, timeout=120):
    """Block until metrics.jsonl has n lines (or the process ended)."""
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(path) and sum(1 for _ in open(path)) >= n:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted run: 24 steps, the first 6 in the embedding phase, a checkpoint every 3 steps."""
    out = tmp_path_factory.mktemp("reference")
    argv = train_args(corpus, out, "--max_iters=24", "--eval_interval=3", "--embedding_tuning_frac=0.25")
    proc = spawn(argv)  # in a child like the runs it is compared with: the same threads, so the same float sums
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    return argv, out


def test_kill9_at_random_moments(reference, tmp_path):
    argv, ref_out = reference
    argv = [a.replace(str(ref_out), str(tmp_path)) for a in argv]
    rng = random.Random(0)
    kills, resumed_at = 0, []
    for attempt in range(12):
        ckpt = tmp_path / "ckpt.pt"
        start = torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else None  # never corrupt
        proc = spawn(argv + (["--init_from=resume"] if start is not None else []))
        done = sum(1 for _ in open(tmp_path / "metrics.jsonl")) if start is not None else 0
        if start is not None:
            resumed_at.append(start)
        if attempt < 4 and wait_for_lines(tmp_path, done + rng.randint(1, 6), proc):
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert proc.returncode == 0 and kills >= 3
    assert resumed_at and all(s % 3 == 0 for s in resumed_at)  # always at a complete checkpoint
    assert [m["step"] for m in metrics(tmp_path) if "lr" in m] == list(range(1, 25))  # every step logged once
    for name, tensor in weights(ref_out).items():
        assert torch.equal(weights(tmp_path)[name], tensor), name


def test_kill9_during_checkpoint_write(reference, tmp_path):
    """The second checkpoint write dies half-way: ckpt.pt still holds the first, complete one."""
    argv, ref_out = reference
    argv = [a.replace(str(ref_out), str(tmp_path)) for a in argv]
    die_in_second_save = (
        "import os, signal, torch\n"
        "real_save, calls = torch.save, []\n"
        "def dying_save(obj, f, *a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        f.write(b'half a checkpoint' * 1000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real_save(obj, f, *a, **k)\n"
        "torch.save = dying_save\n")
    proc = spawn(argv, prelude=die_in_second_save)
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    assert leftovers, "the killed write should have left its temp file"
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3
    proc = spawn(argv + ["--init_from=resume"])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    for name, tensor in weights(ref_out).items():
        assert torch.equal(weights(tmp_path)[name], tensor), name


def test_sigterm_under_torchrun_stops_every_rank_together(corpus, tmp_path):
    argv = train_args(corpus, tmp_path, "--max_iters=400", "--eval_interval=50", "--embedding_tuning_frac=0.1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *argv], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert wait_for_lines(tmp_path, 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "stopped by SIGTERM at step" in err
    stopped = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]
    assert stopped == metrics(tmp_path)[-1]["step"] < 400  # checkpointed at the step it stopped on
    r = run_py(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *argv,
                "--init_from=resume", "--max_iters=400"], env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 400 and summary["ddp_ranks_identical"] is True
    assert [m["step"] for m in metrics(tmp_path) if "lr" in m] == list(range(1, 401))


def test_nonfinite_loss(corpus, tmp_path, monkeypatch):
    forward, calls = GPTNeoX.forward, []

    def nan_on_ninth_training_call(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if targets is not None:
            calls.append(1)
            if len(calls) == 9:  # step 5's first micro-batch (2 per step)
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPTNeoX, "forward", nan_on_ninth_training_call)
    with pytest.raises(UserError, match=r"non-finite training loss \(nan\) at step 5; the last good checkpoint"):
        train.main(train_args(corpus, tmp_path / "stop", "--max_iters=10", "--eval_interval=2"))
    assert torch.load(tmp_path / "stop" / "ckpt.pt", weights_only=True)["step"] == 4
    calls.clear()
    train.main(train_args(corpus, tmp_path / "skip", "--max_iters=10", "--eval_interval=2", "--max_nonfinite_steps=1"))
    skipped = [m["step"] for m in metrics(tmp_path / "skip") if m.get("skipped")]
    assert skipped == [5] and metrics(tmp_path / "skip")[-1]["step"] == 10


def test_hung_ddp_peer_ends_the_others_within_the_timeout(corpus, tmp_path):
    """Two ranks started by hand (as a scheduler may), one frozen by SIGSTOP: the other exits with a one-line error
    after ddp_timeout_s instead of hanging."""
    argv = train_args(corpus, tmp_path, "--max_iters=100000", "--eval_interval=100000", "--ddp_timeout_s=5")
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 400)}
    ranks = [spawn(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    try:
        assert wait_for_lines(tmp_path, 3, ranks[0])
        ranks[1].send_signal(signal.SIGSTOP)
        t0 = time.time()
        _, err = ranks[0].communicate(timeout=120)
        assert ranks[0].returncode == 1 and time.time() - t0 < 60
        assert "a DDP peer died or stopped answering" in err and "Traceback" not in err, err[-2000:]
    finally:
        for p in ranks:
            p.kill()
            p.wait()


def test_only_a_collectives_failure_reads_as_a_lost_peer(tmp_path):
    """The one-line "peer died" error is for what a lost peer raises in a distributed run: torch's DistError (NCCL,
    the store) and gloo's plain RuntimeError; torch's own local failures (out of memory) keep their traceback, and
    outside a process group nothing is a peer's."""
    import torch.distributed as dist

    gloo_error = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    assert not train.peer_failed(gloo_error)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert train.peer_failed(gloo_error) and train.peer_failed(dist.DistBackendError("NCCL watchdog timeout"))
        assert not train.peer_failed(torch.OutOfMemoryError("CUDA out of memory"))
    finally:
        dist.destroy_process_group()


def one_line_error(r, *needles):
    """A user error: exit code 1, one line 'error: ...' naming what is wrong, no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def test_bad_input_across_the_clis(corpus, tmp_path, eltec_tokenizers):
    import shutil

    from conftest import hf_neox

    # a model directory whose safetensors file is cut short (a download that died)
    truncated = tmp_path / "truncated"
    shutil.copytree(corpus / "init", truncated)
    weights_file = truncated / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:5000])
    one_line_error(run_py(["eval.py", "--model", str(truncated), "--ppl_files", str(german_text_file(tmp_path))]),
                   str(weights_file), "cannot read safetensors")
    one_line_error(run_py(["train.py", *train_args(corpus, tmp_path / "t1"), f"--init_from={truncated}"]),
                   str(weights_file))
    hf_neox().save_pretrained(tmp_path / "helper")
    r = run_py(["clp.py", "apply_clp", "--source_model_name_or_path", str(truncated), "--helper_model_name_or_path",
                str(tmp_path / "helper"), "--helper_tokenizer_name_or_path", str(eltec_tokenizers["deu"]),
                "--target_model_path", str(tmp_path / "target")])
    one_line_error(r, "model.safetensors")
    assert not (tmp_path / "target").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]

    # token files and meta.json that do not fit together
    data_dir = tmp_path / "data"
    shutil.copytree(corpus / "data", data_dir)
    with open(data_dir / "train.bin", "ab") as f:
        f.write(b"\0")  # one byte more: not a whole number of uint16 tokens
    one_line_error(run_py(["train.py", *train_args(corpus, tmp_path / "t2"), f"--data_dir={data_dir}"]),
                   str(data_dir / "train.bin"), "not a whole number")
    meta = json.loads((corpus / "data" / "meta.json").read_text())
    shutil.copyfile(corpus / "data" / "train.bin", data_dir / "train.bin")
    (data_dir / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "tokenizer_sha256"}))
    one_line_error(run_py(["train.py", *train_args(corpus, tmp_path / "t3"), f"--data_dir={data_dir}"]),
                   str(data_dir / "meta.json"), "tokenizer_sha256")

    # an invalid tokenizer.json, and a directory where that file is expected
    bad_tok = tmp_path / "bad-tokenizer.json"
    bad_tok.write_text('{"model": {"type": "BPE", "vocab": 42}}')
    r = run_py(["data.py", "--dataset_name", str(german_text_file(tmp_path)), "--tokenizer", str(bad_tok),
                "--output_dir", str(tmp_path / "out-data"), "--subsample_size_mb", "0.01"])
    one_line_error(r, str(bad_tok), "not a valid tokenizer.json")
    assert not (tmp_path / "out-data").exists()
    (tmp_path / "tokdir" / "tokenizer.json").mkdir(parents=True)
    r = run_py(["data.py", "--dataset_name", str(german_text_file(tmp_path)), "--tokenizer",
                str(tmp_path / "tokdir" / "tokenizer.json"), "--output_dir", str(tmp_path / "out-data"),
                "--subsample_size_mb", "0.01"])
    one_line_error(r, "tokenizer.json", "is a directory")

    # a config file with a syntax error, and a directory given as the config file
    (tmp_path / "bad_config.py").write_text("learning_rate = 3e-4\nbatch_size = (8\n")
    one_line_error(run_py(["train.py", str(tmp_path / "bad_config.py")]), "bad_config.py", "syntax error")
    one_line_error(run_py(["train.py", str(tmp_path)]), str(tmp_path), "is a directory")
    # with DEBUG=1 the traceback is there for whoever debugs
    r = run_py(["train.py", str(tmp_path / "bad_config.py")], env={"DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def german_text_file(tmp_path):
    """A small German text file (20k characters of a vendored ELTeC slice)."""
    from conftest import eltec_texts

    path = tmp_path / "novel.txt"
    if not path.exists():
        path.write_text(eltec_texts("deu", limit_chars=20_000)[0])
    return path


def data_copy(corpus, tmp_path):
    import shutil

    shutil.copytree(corpus / "data", tmp_path / "data")
    return tmp_path / "data"


def test_token_id_beyond_the_vocabulary(corpus, tmp_path):
    """A token file with an id the model has no embedding row for: one line naming the file and the id, at the
    first batch that holds it (no index error mid-run)."""
    import numpy as np

    data_dir = data_copy(corpus, tmp_path)
    for split in ("train", "val"):
        clean = (data_dir / f"{split}.bin").read_bytes()
        tokens = np.memmap(data_dir / f"{split}.bin", dtype=np.uint16, mode="r+")
        tokens[::50] = 65535  # in every block
        tokens.flush()
        del tokens
        with pytest.raises(UserError, match=f"{data_dir / f'{split}.bin'}: token id 65535, but the model has "):
            train.main(train_args(corpus, tmp_path / split, f"--data_dir={data_dir}", "--max_iters=2",
                                  f"--eval_at_start={split == 'val'}"))
        (data_dir / f"{split}.bin").write_bytes(clean)


def test_meta_json_field_of_the_wrong_type(corpus, tmp_path):
    data_dir = data_copy(corpus, tmp_path)
    meta = json.loads((data_dir / "meta.json").read_text())
    for key, value in (("vocab_size", str(meta["vocab_size"])), ("eos_token_id", 1.5), ("tokenizer_sha256", 7)):
        (data_dir / "meta.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(UserError, match=f"{data_dir / 'meta.json'}: {key} is {value!r}, expected"):
            train.main(train_args(corpus, tmp_path / "out", f"--data_dir={data_dir}", "--max_iters=2"))


def test_missing_tokenizer_fails_at_the_start_and_the_export_is_atomic(corpus, tmp_path, monkeypatch):
    """A tokenizer the export will need must load before training (scratch: meta.json's tokenizer_file; resume: the
    checkpoint's tokenizer_dir); an export that fails leaves no half-written hf/ and keeps the previous one."""
    data_dir = data_copy(corpus, tmp_path)
    meta = json.loads((data_dir / "meta.json").read_text())
    (data_dir / "meta.json").write_text(json.dumps({**meta, "tokenizer_file": str(tmp_path / "moved")}))
    with pytest.raises(UserError, match=f"meta.json: tokenizer_file: {tmp_path / 'moved'}: no tokenizer found"):
        train.main(train_args(corpus, tmp_path / "scratch", f"--data_dir={data_dir}", "--init_from=scratch",
                              "--n_layer=1", "--n_head=2", "--n_embd=32", "--max_iters=2"))
    assert not (tmp_path / "scratch" / "ckpt.pt").exists()

    out = tmp_path / "run"
    run_args = train_args(corpus, out, "--max_iters=2", "--eval_interval=2")
    train.main(run_args)
    exported = (out / "hf" / "model.safetensors").read_bytes()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "tokenizer_dir": str(tmp_path / "moved")}, out / "ckpt.pt")
    with pytest.raises(UserError, match=f"ckpt.pt: tokenizer_dir: {tmp_path / 'moved'}: no tokenizer found"):
        train.main([*run_args, "--init_from=resume", "--max_iters=4"])
    torch.save(ckpt, out / "ckpt.pt")

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train, "save_tokenizer", disk_full)
    with pytest.raises(UserError, match="No space left"):  # one line, late as it is
        train.main([*run_args, "--init_from=resume", "--max_iters=4"])
    assert (out / "hf" / "model.safetensors").read_bytes() == exported  # the previous export, whole
    assert sorted(os.listdir(out / "hf")) == ["config.json", "model.safetensors", "special_tokens_map.json",
                                               "tokenizer.json", "tokenizer_config.json"]
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_skipped_steps_still_evaluate_and_checkpoint(corpus, tmp_path, monkeypatch):
    """A skipped non-finite step skips only the update: at an eval boundary and as the last step it still
    evaluates and checkpoints, the final evaluation happens, and the count of skips survives a resume."""
    forward, calls, bad = GPTNeoX.forward, [], {3, 7}  # the first micro-batches of steps 2 and 4

    def nan_loss(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if targets is not None:
            calls.append(1)
            if len(calls) in bad:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPTNeoX, "forward", nan_loss)
    run_args = train_args(corpus, tmp_path, "--max_iters=4", "--eval_interval=2", "--max_nonfinite_steps=2")
    train.main(run_args)
    log = metrics(tmp_path)
    assert [m["step"] for m in log if m.get("skipped")] == [2, 4]
    assert [m["step"] for m in log if m.get("val_loss") is not None] == [2, 4]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_val_loss"] == log[-2]["val_loss"] and summary["final_val_full_loss"] is not None
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["nonfinite_steps"] == 2
    calls.clear()
    bad.clear()
    bad.add(1)  # the resumed run's first step: a third skip is one too many
    with pytest.raises(UserError, match=r"non-finite training loss \(nan\) at step 5"):
        train.main([*run_args, "--init_from=resume", "--max_iters=6"])


def test_signal_outside_the_loop_or_a_second_one_stops_at_once(corpus, tmp_path, monkeypatch, capsys):
    """An eval_only run (no training step to finish) stops at the signal; in a training step a second signal
    stops at once, without waiting for the step boundary. Exit code 128 + signal, one line."""
    batch = data.Blocks.batch

    def sigterm_in_validation(self, pos, batch_size):
        if self.shuffle_seed is None:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch(self, pos, batch_size)

    monkeypatch.setattr(data.Blocks, "batch", sigterm_in_validation)
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(corpus, tmp_path / "eval", "--eval_only=True"))
    assert stop.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("stopped by SIGTERM outside a training step"), err

    def sigint_twice(self, pos, batch_size):
        if self.shuffle_seed is not None and pos == 2 * 8:  # in step 3
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return batch(self, pos, batch_size)

    monkeypatch.setattr(data.Blocks, "batch", sigint_twice)
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(corpus, tmp_path / "twice", "--max_iters=12", "--eval_interval=100"))
    assert stop.value.code == 128 + signal.SIGINT
    assert [m["step"] for m in metrics(tmp_path / "twice")] == [1, 2] and not (tmp_path / "twice" / "ckpt.pt").exists()


def test_metrics_are_strict_json_and_a_cut_line_is_dropped(corpus, tmp_path, monkeypatch):
    """NaN and infinity are written as null (JSON has neither); a resume drops a last line cut short by a kill."""
    forward = GPTNeoX.forward

    def nan_logits(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        return (logits * float("nan"), loss) if targets is None else (logits, loss)

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON output"))

    run_args = train_args(corpus, tmp_path, "--max_iters=2", "--eval_interval=1")
    with monkeypatch.context() as m:
        m.setattr(GPTNeoX, "forward", nan_logits)
        train.main(run_args)
    log = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["val_loss"] is None and log[0]["val_ppl"] is None and log[-1]["val_full_loss"] is None
    summary = strict((tmp_path / "summary.json").read_text())
    assert summary["best_val_loss"] is None and summary["final_val_loss"] is None

    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "phase": "fu')  # killed while writing
    train.main([*run_args, "--init_from=resume", "--max_iters=3"])
    assert [strict(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 3]


def test_disk_full_during_a_checkpoint_is_one_line_and_the_previous_checkpoint_loads(corpus, tmp_path):
    """A file-size limit (ulimit -f) below the checkpoint's size: the write fails mid-file; the run ends with one
    line naming the checkpoint and the cause, and the previous checkpoint (step 2) is whole."""
    import resource

    run_args = train_args(corpus, tmp_path, "--max_iters=2", "--eval_interval=2", "--export_hf=False")
    train.main(run_args)
    size = (tmp_path / "ckpt.pt").stat().st_size

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    r = subprocess.run([sys.executable, "train.py", *run_args, "--init_from=resume", "--max_iters=4"], cwd=ROOT,
                       text=True, capture_output=True, preexec_fn=small_files, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = one_line_error(r, str(tmp_path / "ckpt.pt"), "cannot write the checkpoint", "File too large",
                          "the previous checkpoint is kept")
    assert line.startswith("error: ") and r.stderr.count("error: ") == 1
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_bad_token_mid_run_checkpoints_the_last_good_step(corpus, tmp_path):
    """A token id beyond the vocabulary at step 3 (and only there): the run stops with the id and the file named,
    after checkpointing step 2, so no progress is lost."""
    import numpy as np

    data_dir = data_copy(corpus, tmp_path)
    train_file = data_dir / "train.bin"
    blocks = data.Blocks(str(train_file), "uint16", 32, 42)
    bad_block = int(blocks.block_ids(16, 4)[0])  # step 3's first block (8 blocks a step)
    tokens = np.memmap(train_file, dtype=np.uint16, mode="r+")
    tokens[bad_block * 32 + 5] = 65535
    tokens.flush()
    del tokens
    with pytest.raises(UserError, match=r"train.bin: token id 65535.*stopped before step 3: the checkpoint .*ckpt.pt "
                                        r"holds step 2"):
        train.main(train_args(corpus, tmp_path / "out", f"--data_dir={data_dir}", "--max_iters=6",
                              "--eval_interval=100"))
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert (ckpt["step"], ckpt["pos"]) == (2, 16)


def test_an_error_before_training_is_printed_once_under_torchrun(corpus, tmp_path):
    r = run_py(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                *train_args(corpus, tmp_path, "--max_iters=-1")], env={"OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and r.stderr.count("error: max_iters=-1, expected") == 1, r.stderr[-3000:]


def test_disk_full_during_a_sharded_checkpoint_keeps_the_previous_one(corpus, tmp_path):
    """The same under parallelism='fsdp' (its torch.distributed.checkpoint directory, out_dir/ckpt): one line naming
    the checkpoint and the cause, and `latest` still names the complete step-2 checkpoint."""
    import resource

    run_args = train_args(corpus, tmp_path, "--max_iters=2", "--eval_interval=2", "--export_hf=False",
                          "--parallelism=fsdp")
    train.main(run_args)
    size = max(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file())

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    r = subprocess.run([sys.executable, "train.py", *run_args, "--init_from=resume", "--max_iters=4"], cwd=ROOT,
                       text=True, capture_output=True, preexec_fn=small_files, env={**os.environ, "OMP_NUM_THREADS": "1"})
    one_line_error(r, str(tmp_path / "ckpt"), "cannot write the checkpoint", "the previous checkpoint is kept")
    assert latest_sharded(str(tmp_path / "ckpt")).endswith("step-00000002")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["latest", "step-00000002"]
