"""checkpoint.py: the record that names a run's latest checkpoint decides what a resume reads, whatever the files'
times; a run directory written before the record existed resumes from its one checkpoint, and refuses when both
formats are there."""

import json
import os
import time

import pytest
from conftest import metrics, train_args

import train
from checkpoint import RECORD, latest_checkpoint
from common import UserError


def test_the_record_decides_which_checkpoint_resumes_not_file_times(corpus, tmp_path, capsys):
    """A sharded run (parallelism='fsdp') to step 2, resumed as DDP (ckpt.pt) to step 4; the old sharded checkpoint
    then touched (a copy or a backup that does not keep times): the next resume continues from step 4."""
    out = tmp_path / "run"
    run_args = train_args(corpus, out, "--eval_interval=2", "--export_hf=False")
    train.main([*run_args, "--max_iters=2", "--parallelism=fsdp"])
    assert json.loads((out / RECORD).read_text()) == {"checkpoint": "ckpt/step-00000002", "step": 2}
    train.main([*run_args, "--init_from=resume", "--max_iters=4", "--parallelism=ddp"])
    assert json.loads((out / RECORD).read_text()) == {"checkpoint": "ckpt.pt", "step": 4}
    assert sorted(os.listdir(out / "ckpt")) == ["latest", "step-00000002"]  # the other format's, left alone

    future = time.time() + 3600
    for path in (out / "ckpt" / "step-00000002" / "train_state.pt", out / "ckpt" / "latest"):
        os.utime(path, (future, future))
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines() if "val_full_loss" not in line]
    capsys.readouterr()
    train.main([*run_args, "--init_from=resume", "--max_iters=6"])
    assert f"{out / 'ckpt.pt'} (from " in capsys.readouterr().out  # the run's model: from ckpt.pt
    assert (out / "metrics.jsonl").read_text().splitlines()[:len(steps)] == steps  # steps 3 and 4 not taken again
    assert [m["step"] for m in metrics(out) if "lr" in m] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / RECORD).read_text()) == {"checkpoint": "ckpt.pt", "step": 6}


def test_a_run_from_before_the_record(corpus, tmp_path):
    """Without a record (a run directory written before it existed): the one checkpoint there resumes; ckpt.pt and
    a sharded checkpoint side by side are refused in one line, as is a record naming a checkpoint that is gone."""
    out = tmp_path / "run"
    run_args = train_args(corpus, out, "--eval_interval=2", "--export_hf=False")
    train.main([*run_args, "--max_iters=2", "--parallelism=fsdp"])
    (out / RECORD).unlink()
    assert latest_checkpoint(str(out)) == str(out / "ckpt" / "step-00000002")
    train.main([*run_args, "--init_from=resume", "--max_iters=4", "--parallelism=ddp"])
    assert json.loads((out / RECORD).read_text())["checkpoint"] == "ckpt.pt"

    (out / RECORD).unlink()
    with pytest.raises(UserError, match=r"holds both ckpt.pt and a sharded checkpoint .*step-00000002\), and no "
                                        r"checkpoint.json that says which the run wrote last"):
        train.main([*run_args, "--init_from=resume", "--max_iters=6"])
    (out / RECORD).write_text(json.dumps({"checkpoint": "ckpt/step-00000004", "step": 4}))
    with pytest.raises(UserError, match=r"checkpoint.json: names the checkpoint 'ckpt/step-00000004', which is not "
                                        "there"):
        train.main([*run_args, "--init_from=resume", "--max_iters=6"])
    (out / RECORD).unlink()
    os.remove(out / "ckpt.pt")
    train.main([*run_args, "--init_from=resume", "--max_iters=6", "--parallelism=fsdp"])  # from step 2 again
    assert [m["step"] for m in metrics(out) if "lr" in m] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / RECORD).read_text()) == {"checkpoint": "ckpt/step-00000006", "step": 6}
