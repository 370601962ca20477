"""Run directories: one run per out_dir (an OS lock that names its holder and dies with it), inputs that are never
outputs (train.py, clp.py), an override that can be undone until the new run's first checkpoint, eval_only that
leaves the run alone, a full disk in one line, and a one-process FSDP run that says what it does."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, hf_neox, metrics, run_py, train_args

import data
import train
from checkpoint import LOCK, RECORD, check_apart, launch_id, lock_out_dir, release_out_dirs, wait_for_rank0
from clp import apply_clp
from common import UserError, save_tokenizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def one_line(r):
    """The error line of a CLI that failed (exit code 1, no traceback)."""
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# -----------------------------------------------------------------------------
# one run per out_dir


def test_two_runs_started_at_once_into_one_out_dir(corpus, tmp_path):
    """Two train.py processes started together (seeds 1 and 2): one runs to its end, the other stops at once naming
    the holder's pid and host; every file of the directory is the first run's."""
    out = tmp_path / "run"
    procs = {seed: subprocess.Popen([sys.executable, "train.py", *train_args(corpus, out, "--max_iters=40",
                                                                         "--eval_interval=20", f"--seed={seed}")],
                                    cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for seed in (1, 2)}
    results = {seed: (p.wait(timeout=300), *p.communicate()) for seed, p in procs.items()}
    winner = [seed for seed, (rc, _, _) in results.items() if rc == 0]
    assert len(winner) == 1, {seed: (rc, err[-2000:]) for seed, (rc, _, err) in results.items()}
    winner, loser = winner[0], 3 - winner[0]
    rc, _, err = results[loser]
    assert rc == 1 and err.strip().splitlines() == [
        f"error: out_dir={str(out)!r} is in use by pid {procs[winner].pid} on {socket.gethostname()} (its {LOCK}): "
        "one run per directory; wait for that run to end or stop it, or choose another out_dir"], err

    assert sorted(os.listdir(out)) == [LOCK, RECORD, "ckpt.pt", "config.json", "hf", "metrics.jsonl", "summary.json"]
    assert json.loads((out / "config.json").read_text())["seed"] == winner
    assert torch.load(out / "ckpt.pt", weights_only=True)["config"]["seed"] == winner
    assert [m["step"] for m in metrics(out)] == list(range(1, 41)) + [40]
    assert json.loads((out / "summary.json").read_text())["steps"] == 40


def test_the_lock_dies_with_its_process(tmp_path):
    """A process killed with -9 while it holds out_dir leaves no stale lock: the next run takes the directory."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from checkpoint import lock_out_dir; "
                               "lock_out_dir(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(tmp_path)],
                              cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"is in use by pid {holder.pid} on {socket.gethostname()}"):
        lock_out_dir(str(tmp_path))
    holder.kill()
    holder.wait()
    try:
        lock_out_dir(str(tmp_path))
        assert (tmp_path / LOCK).read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    finally:
        release_out_dirs()


def test_a_holder_that_has_not_yet_named_itself_is_waited_for(tmp_path):
    """A run that has just taken the lock writes its name a moment later: the refused run reads it then, rather than
    saying 'another process' (two runs started at the same instant)."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, socket, sys, time; "
                               "f = open(os.path.join(sys.argv[1], sys.argv[2]), 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(0.5); "
                               "f.write(f'pid {os.getpid()} on {socket.gethostname()}\\n'); f.flush(); time.sleep(600)",
                               str(tmp_path), LOCK], cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"is in use by pid {holder.pid} on {socket.gethostname()}"):
            lock_out_dir(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()


def test_a_rank_that_waits_for_rank_0_in_vain_says_so(tmp_path, monkeypatch, capsys):
    """A rank other than 0 whose rank 0 never takes out_dir (not on a file system the nodes share) says so itself:
    rank 0 cannot, and the others leave a failure before training without a word."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(UserError):
        wait_for_rank0(str(tmp_path), 0.2)
    assert capsys.readouterr().err == (f"error: rank 3: {tmp_path / LOCK}: rank 0 did not take out_dir within 0.2 s "
                                       "(ddp_timeout_s; is out_dir on a file system every node shares?)\n")


def test_a_ready_lock_left_by_a_killed_launch_is_not_taken_for_rank_0s(tmp_path, monkeypatch):
    """Launches can share a name (torchrun's static rendezvous: run id 'none'): the 'ready' a killed launch's rank 0
    left in the lock file counts only while the process it names lives (on this host), so another rank waits for
    the new rank 0."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    job = launch_id()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK).write_text(f"pid {gone.pid} on {socket.gethostname()}; ready for {job}\n")
    with pytest.raises(UserError):
        wait_for_rank0(str(tmp_path), 0.3)
    (tmp_path / LOCK).write_text(f"pid {os.getpid()} on {socket.gethostname()}; ready for {job}\n")
    wait_for_rank0(str(tmp_path), 0.3)


def test_under_torchrun_rank_0_holds_the_lock_and_every_rank_stops(corpus, tmp_path):
    """Two processes under torchrun into a directory another process holds: rank 0 names the holder in one line;
    rank 1, waiting in Python for rank 0 to take the directory, ends at the launcher's SIGTERM (not after its 30 s
    grace and a SIGKILL); nothing is written."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from checkpoint import lock_out_dir; "
                               "lock_out_dir(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(tmp_path)],
                              cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "held"
    try:
        r = run_py(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                    *train_args(corpus, tmp_path, "--max_iters=2")], env={"OMP_NUM_THREADS": "1"}, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: out_dir={str(tmp_path)!r} is in use by pid {holder.pid} on {socket.gethostname()} "
                      f"(its {LOCK}): one run per directory; wait for that run to end or stop it, or choose another "
                      "out_dir"], r.stderr[-3000:]
    assert "SIGKILL" not in r.stderr, r.stderr[-3000:]
    assert os.listdir(tmp_path) == [LOCK]


AGREE = """
import sys
import torch.distributed as dist
from checkpoint import Checkpoint, check_ranks_agree
from common import UserError

dist.init_process_group("gloo")
for rank1_step in (6, 4):  # rank 1 reads what rank 0 read, then an older checkpoint
    step = rank1_step if dist.get_rank() == 1 else 6
    try:
        check_ranks_agree(Checkpoint("out/ckpt.pt", False, {"step": step}))
        print("agreed")
    except UserError as e:
        print(f"error: {e}")
dist.destroy_process_group()
"""


def test_the_ranks_resume_from_rank_0s_checkpoint_or_stop_together():
    """Two gloo processes: when every rank read rank 0's checkpoint the resume goes on; when one read another (out_dir
    changed while they started), every rank stops, with the same line naming both."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", AGREE], cwd=ROOT, env={**env, "RANK": str(rank)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    expected = ["agreed", "error: init_from=resume: rank 0 read out/ckpt.pt (step 6), rank 1 read out/ckpt.pt (step "
                "4): out_dir changed while the ranks started (a run still writing it?); start again once it has ended"]
    assert [out.splitlines() for out, _ in outs] == [expected, expected]


# -----------------------------------------------------------------------------
# inputs are never outputs


def test_out_dir_is_never_the_initial_model_or_the_data(corpus, tmp_path):
    """out_dir equal to, inside or containing init_from or data_dir: refused before anything is written (the initial
    model's config.json stays its own); a hub id is no local directory and does not count."""
    import shutil

    init, data_dir = tmp_path / "init", tmp_path / "data"
    shutil.copytree(corpus / "init", init)
    shutil.copytree(corpus / "data", data_dir)
    config = (init / "config.json").read_bytes()
    base = ["--max_iters=2", f"--data_dir={data_dir}", f"--init_from={init}"]
    for out, how, key in ((init, "is", "init_from"), (init / "run", "lies inside", "init_from"),
                          (tmp_path, "contains", "init_from"), (data_dir, "is", "data_dir"),
                          (data_dir / "run", "lies inside", "data_dir")):
        with pytest.raises(UserError, match=rf"out_dir='{out}' {how} {key}='.*': a run writes its files there"):
            train.main(train_args(corpus, out, *base, "--override=True"))
    assert (init / "config.json").read_bytes() == config
    assert sorted(os.listdir(init)) == sorted(os.listdir(corpus / "init"))
    assert not (init / "run").exists() and not (data_dir / "run").exists()
    check_apart(str(tmp_path / "org"), {"init_from": "org/model"})  # a hub id is no directory of the run's


def test_clp_target_is_never_an_input(tmp_path, eltec_tokenizers):
    """clp.py's target equal to, containing or inside the source, the helper or the target tokenizer's folder:
    refused in one line, with or without --override, and nothing is deleted."""
    models = tmp_path / "models"
    source, helper, tok = models / "source", models / "helper", tmp_path / "tok"
    hf_neox(vocab_size=1030).save_pretrained(source)
    save_tokenizer(str(eltec_tokenizers["eng"]), str(source))
    hf_neox(vocab_size=1210).save_pretrained(helper)
    save_tokenizer(str(eltec_tokenizers["deu"]), str(helper))
    save_tokenizer(str(eltec_tokenizers["deu"]), str(tok))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    cases = [(source, {}, "is", "source_model_name_or_path"), (models, {}, "contains", "source_model_name_or_path"),
             (helper / "target", {}, "lies inside", "helper_model_name_or_path"),
             (tok, {"method": "fvt", "target_tokenizer": str(tok / "tokenizer.json")}, "is", "target_tokenizer")]
    for target, kw, how, flag in cases:
        for override in (False, True):
            helper_arg = None if kw else str(helper)
            with pytest.raises(UserError, match=rf"--target_model_path {target} {how} the folder of --{flag} "):
                apply_clp(str(source), helper_arg, str(target), override=override, **kw)
    r = run_py(["clp.py", "apply_clp", "--source_model_name_or_path", str(source), "--helper_model_name_or_path",
                str(helper), "--target_model_path", str(source), "--override"])
    assert "is the folder of --source_model_name_or_path" in one_line(r)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.rglob(".*")]
    # beside a tokenizer file, in its folder: the file is untouched, so the target may go there
    apply_clp(str(source), None, str(tok / "target"), method="fvt", target_tokenizer=str(tok / "tokenizer.json"))
    assert (tok / "target" / "config.json").exists() and (tok / "tokenizer.json").read_bytes() == before[
        tok / "tokenizer.json"]


# -----------------------------------------------------------------------------
# override that can be undone; eval_only that reads


def stop_in_first_step(monkeypatch):
    """The next run stops in its first step, before any checkpoint (two SIGINTs: the second one stops at once)."""
    batch = data.Blocks.batch

    def sigint_twice(self, pos, batch_size):
        if self.shuffle_seed is not None:
            monkeypatch.setattr(data.Blocks, "batch", batch)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return batch(self, pos, batch_size)

    monkeypatch.setattr(data.Blocks, "batch", sigint_twice)


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != LOCK}


def test_override_is_undone_until_the_new_runs_first_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    """A finished run (with eval.py's eval.json beside it); two override runs killed before their first checkpoint:
    the old run stays whole in one .replaced-run-* folder, config.json included; the next start brings it back,
    naming the folder, and a resume finds it finished. eval_only needs no override, leaves the run's files as they
    were and writes eval_only.json (the final whole-set loss of the run, again); an override run that reaches its
    first checkpoint takes the place of every file of the old run, eval files included."""
    out = tmp_path / "run"
    run_args = train_args(corpus, out, "--max_iters=2", "--eval_interval=2")
    train.main([*run_args, "--seed=1"])
    (out / "eval.json").write_text('{"acc": 0.5}\n')
    old = files_of(out)
    assert {"config.json", RECORD, "ckpt.pt", "metrics.jsonl", "summary.json", "eval.json"} < set(old)

    aside = []
    for attempt in range(2):
        stop_in_first_step(monkeypatch)
        with pytest.raises(SystemExit):
            train.main([*run_args, "--seed=2", "--override=True", "--eval_at_start=True"])
        printed = capsys.readouterr().out
        assert (f"restored the run in {out} from {out / aside[0]}" in printed) if aside else "restored" not in printed
        aside = [f for f in os.listdir(out) if f.startswith(".replaced-run-")]
        assert len(aside) == 1 and files_of(out / aside[0]) == old  # whole, config.json included
        assert json.loads((out / "config.json").read_text())["seed"] == 2  # the stopped run's

    with pytest.raises(UserError, match=r"holds a run \(ckpt.pt, eval.json, hf, metrics.jsonl, summary.json\)"):
        train.main([*run_args, "--seed=3"])
    assert f"restored the run in {out} from {out / aside[0]}: the override=True run" in capsys.readouterr().out
    assert files_of(out) == old
    train.main([*run_args, "--init_from=resume"])
    assert "nothing to do" in capsys.readouterr().out

    train.main([*run_args, "--init_from=resume", "--eval_only=True"])
    assert files_of(out).items() > old.items()  # every file of the run as it was
    assert set(files_of(out)) - set(old) == {"eval_only.json"}
    evaluated = json.loads((out / "eval_only.json").read_text())
    final = [m for m in metrics(out) if "val_full_loss" in m][0]
    assert (evaluated["step"], evaluated["init_from"]) == (2, "resume")
    assert evaluated["val_full_loss"] == pytest.approx(final["val_full_loss"], abs=1e-6)
    train.main([*run_args, "--eval_only=True"])  # the initial model, into a directory holding a run: no override
    assert json.loads((out / "eval_only.json").read_text())["init_from"] == str(corpus / "init")

    train.main([*run_args, "--seed=4", "--override=True"])
    assert sorted(os.listdir(out)) == [LOCK, RECORD, "ckpt.pt", "config.json", "hf", "metrics.jsonl", "summary.json"]
    assert json.loads((out / "config.json").read_text())["seed"] == 4


# -----------------------------------------------------------------------------
# a full disk; one-process FSDP


@pytest.mark.parametrize("failure", ["SafetensorError", "ENOSPC"])
def test_a_full_disk_during_the_export_is_one_line_and_the_checkpoint_stays(corpus, tmp_path, monkeypatch, failure):
    """The hf/ export fails (safetensors raises its own SafetensorError, not an OSError; or an OSError): one line
    naming the file, no hf/ and no summary.json (the run is not complete), the checkpoint whole; a resume exports."""
    import safetensors.torch
    from safetensors import SafetensorError

    def disk_full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No "
                              "space left on device\" })") if failure == "SafetensorError" else \
            OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    out = tmp_path / "run"
    run_args = train_args(corpus, out, "--max_iters=2", "--eval_interval=2")
    with pytest.raises(UserError) as e:
        train.main(run_args)
    file = out / "hf" / "model.safetensors" if failure == "SafetensorError" else out / "hf"
    assert str(e.value).startswith(f"{file}: cannot write it (") and "\n" not in str(e.value)
    assert str(e.value).endswith(f"the checkpoint {out / 'ckpt.pt'} is kept: free space, then --init_from=resume "
                                 "exports it")
    assert sorted(os.listdir(out)) == [LOCK, RECORD, "ckpt.pt", "config.json", "metrics.jsonl"]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    monkeypatch.undo()
    train.main([*run_args, "--init_from=resume"])
    assert (out / "hf" / "model.safetensors").exists() and json.loads((out / "summary.json").read_text())["steps"] == 2


def test_a_full_disk_during_data_py_is_one_line(corpus, tmp_path):
    """data.py under a file-size limit (ulimit -f: the write fails as on a full disk, numpy's without an errno):
    one line naming the token file, exit 1, and no output directory or temporary files."""
    import resource

    text = tmp_path / "text.txt"
    text.write_text((corpus / "texts" / "0.txt").read_text() * 4)

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    r = subprocess.run([sys.executable, "data.py", "--dataset_name", str(text), "--tokenizer",
                        str(corpus / "init"), "--output_dir", str(tmp_path / "data"), "--subsample_size_mb", "0.2",
                        "--txt_documents", "blank_line"], cwd=ROOT, text=True, capture_output=True,
                       preexec_fn=small_files, env=ENV)
    line = one_line(r)
    assert line.startswith(f"error: {tmp_path / 'data' / 'train.bin'}: cannot write it (") and \
        line.endswith(f"; {tmp_path / 'data'} is as it was"), line
    assert sorted(os.listdir(tmp_path)) == ["text.txt"]


def test_one_process_fsdp_says_it_runs_unsharded_without_torchs_warnings(corpus, tmp_path, capsys):
    """parallelism='fsdp' without torchrun: one line says the model runs unsharded, summary.json records it, and
    the sharded checkpoint's save and resume raise no warning (pytest would show torch's)."""
    import warnings

    run_args = train_args(corpus, tmp_path, "--max_iters=2", "--eval_interval=2", "--parallelism=fsdp",
                          "--export_hf=False")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train.main([*run_args, "--max_iters=1", "--eval_interval=1"])
        train.main([*run_args, "--init_from=resume"])
    assert capsys.readouterr().out.count("parallelism='fsdp' in one process (not under torchrun): the model runs "
                                         "unsharded") == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["parallelism"], summary["sharded"], summary["world_size"]) == ("none", False, 1)
