"""
A training run's files in its out_dir: the checkpoint, the record that names it, and the claim a fresh run lays on
the directory. train.py decides what a checkpoint holds and how a run continues from one; this file writes it, finds
it and reads it back.

    ckpt.pt           one process or DDP: torch.save of the training state with the model's and the optimizer's
                      full state dicts under "model" and "optimizer"
    ckpt/step-N/      an FSDP run (parallelism='fsdp'): torch.distributed.checkpoint shards of the model and the
                      optimizer, and train_state.pt (the training state); ckpt/latest names the newest step
    checkpoint.json   the record: which of the two the run wrote last, and at which step (a run may change its
                      parallelism on resume, so both can be there)
    .lock             the process that runs in out_dir (its pid and host): an OS lock (flock) held for the run's
                      life, released by the kernel when the process ends, however it ends
    .replaced-run-*/  a run that override=True set aside until the new run's first checkpoint
"""

import errno
import fcntl
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common import UserError, atomic_dir, atomic_path, read_json, write_json

FULL = "ckpt.pt"
SHARDED = "ckpt"
RECORD = "checkpoint.json"
RUN_FILES = (FULL, "metrics.jsonl", "summary.json", "hf", "eval.json", "eval_only.json")  # and anything named ckpt*
RUN_RECORDS = (RECORD, "config.json")  # not a run by themselves, but a run's: they move with it
REPLACED = ".replaced-run-"  # a run that override=True moved aside, deleted at the new run's first checkpoint
LOCK = ".lock"


@dataclass
class Checkpoint:
    """A checkpoint read back: the training state (what train.py saved: step, config, rng, ...) and, from ckpt.pt,
    the full state dicts; a sharded checkpoint's model and optimizer are read later, into the built model
    (load_shards), each rank its own shards."""
    path: str  # ckpt.pt, or the sharded checkpoint's step directory
    sharded: bool
    training: dict
    model: dict = None
    optimizer: dict = None


# -----------------------------------------------------------------------------
# writing: the checkpoint, then the record that names it, then what it replaces


def save_checkpoint(out_dir, training, model, optimizer, sharded):
    """The checkpoint (ckpt.pt from rank 0, or every rank's shards), then the record naming it, then what it
    replaces: older sharded steps and a run that override=True set aside. A kill at any moment leaves the record
    naming a complete checkpoint. Every rank calls it, and waits for it."""
    distributed = dist.is_initialized()
    master = not distributed or dist.get_rank() == 0
    if sharded:
        name = os.path.join(SHARDED, save_shards(os.path.join(out_dir, SHARDED), training, model, optimizer))
    elif master:
        name = FULL
        save_full(os.path.join(out_dir, FULL), {**training, "model": model.state_dict(),
                                                 "optimizer": optimizer.state_dict()})
    if master:
        write_record(out_dir, name, training["step"])
        if sharded:
            for old in os.listdir(os.path.join(out_dir, SHARDED)):
                if old not in (os.path.basename(name), "latest"):
                    shutil.rmtree(os.path.join(out_dir, SHARDED, old), ignore_errors=True)
        drop_replaced_runs(out_dir)
    if distributed:
        dist.barrier()


def write_record(out_dir, name, step):
    """The record: the checkpoint the run wrote last (its path in out_dir) and its step. Written atomically after
    the checkpoint is complete, read first by a resume (latest_checkpoint)."""
    write_json(os.path.join(out_dir, RECORD), {"checkpoint": name, "step": step})


def save_full(path, state):
    """ckpt.pt, written atomically and fsynced."""
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # a full disk: OSError, or torch's writer's RuntimeError after it
        raise write_error(path, e) from None


def save_shards(path, training, model, optimizer):
    """torch.distributed.checkpoint: every rank writes its own shards of the model and the optimizer, rank 0 adds
    the training state (train_state.pt). All of it goes into path/step-N, built under a temporary name, and only
    then does path/latest (replaced atomically) name it; what a killed write left (.tmp-*) goes at the next save.
    Returns step-N."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # DCP's error, raised on every rank
    from torch.distributed.checkpoint.state_dict import get_state_dict

    distributed = dist.is_initialized()
    master = not distributed or dist.get_rank() == 0
    name = f"step-{training['step']:08d}"
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        with (atomic_dir(os.path.join(path, name)) if master else nullcontext()) as tmp, single_process_quiet():
            tmp = broadcast_object(tmp) if distributed else tmp
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
            if master:
                with open(os.path.join(tmp, "train_state.pt"), "wb") as f:
                    torch.save(training, f)
                    f.flush()
                    os.fsync(f.fileno())
        if master:
            with atomic_path(os.path.join(path, "latest")) as tmp, open(tmp, "w") as f:
                f.write(name + "\n")
    except (OSError, RuntimeError, CheckpointException) as e:
        raise write_error(path, e) from None
    return name


@contextmanager
def single_process_quiet():
    """torch.distributed.checkpoint in one process (parallelism='fsdp' without torchrun) warns on every save and load
    that it assumes one process, which is what the run said it does (one line at its start): that warning alone is
    silenced, here only."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized, "
                                    r"assuming the intent is to (save|load) in a single process")
        yield


def write_error(path, e):
    """One line for a checkpoint that could not be written (its temp file is gone; the previous one is whole)."""
    while e.__context__ is not None and not isinstance(e, OSError):  # the cause under torch's RuntimeError
        e = e.__context__
    cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
    kept = "the previous checkpoint is kept" if has_checkpoint(os.path.dirname(path)) else \
        "there is no earlier checkpoint"
    return UserError(f"{path}: cannot write the checkpoint ({cause}); {kept}")


def broadcast_object(obj):
    """Rank 0's value of a small picklable object, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -----------------------------------------------------------------------------
# reading: the checkpoint the record names


def check_ranks_agree(checkpoint):
    """Every rank of a resumed run read the checkpoint rank 0 read: rank 0's is the one, and a rank that read another
    stops the run on every rank, in one line. Each rank reads the record itself, before the process group exists,
    but only once rank 0 holds out_dir (wait_for_rank0), so they agree; ranks started without a launcher's id do
    not wait, and a run that was still writing out_dir could make them differ."""
    mine = (checkpoint.path, checkpoint.training["step"])
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    other = next((rank for rank, seen in enumerate(ranks) if seen != ranks[0]), None)
    if other is not None:
        raise UserError(f"init_from=resume: rank 0 read {ranks[0][0]} (step {ranks[0][1]}), rank {other} read "
                        f"{ranks[other][0]} (step {ranks[other][1]}): out_dir changed while the ranks started (a "
                        "run still writing it?); start again once it has ended")


def load_checkpoint(out_dir):
    """The checkpoint the run wrote last (latest_checkpoint): its training state, and ckpt.pt's state dicts,
    memory-mapped (the processes share one copy of the file in the page cache)."""
    path = latest_checkpoint(out_dir)
    if path is None:
        raise UserError(f"init_from='resume': no checkpoint at {os.path.join(out_dir, FULL)} or "
                        f"{os.path.join(out_dir, SHARDED)}")
    sharded = os.path.isdir(path)
    file = os.path.join(path, "train_state.pt") if sharded else path
    try:
        training = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{file}: cannot read the checkpoint ({str(e).splitlines()[0]})") from None
    if sharded:
        return Checkpoint(path, True, training)
    return Checkpoint(path, False, training, training.pop("model"), training.pop("optimizer"))


def latest_checkpoint(out_dir):
    """The path of the checkpoint a resume continues from, or None: the one the record names. A run written before
    the record existed has none; then whichever of ckpt.pt and ckpt/ is there, and both is an error (nothing says
    which is newer)."""
    record = os.path.join(out_dir, RECORD)
    if os.path.isfile(record):
        name = read_json(record).get("checkpoint")
        path = os.path.join(out_dir, name) if isinstance(name, str) else None
        if path is None or not (os.path.isfile(path) or os.path.isfile(os.path.join(path, "train_state.pt"))):
            raise UserError(f"{record}: names the checkpoint {name!r}, which is not there (deleted or moved?)")
        return path
    found = [path for path in (os.path.join(out_dir, FULL), latest_sharded(os.path.join(out_dir, SHARDED)))
             if path and os.path.exists(path)]
    if len(found) > 1:
        raise UserError(f"{out_dir} holds both {FULL} and a sharded checkpoint ({found[1]}), and no {RECORD} that "
                        "says which the run wrote last: move the older one out of out_dir, then resume")
    return found[0] if found else None


def has_checkpoint(out_dir):
    return any(os.path.exists(os.path.join(out_dir, name)) for name in (RECORD, FULL)) or \
        latest_sharded(os.path.join(out_dir, SHARDED)) is not None


def latest_sharded(path):
    """The directory of the newest complete sharded checkpoint under `path` (as path/latest names it), or None."""
    try:
        with open(os.path.join(path, "latest")) as f:
            latest = os.path.join(path, f.read().strip())
    except OSError:
        return None
    return latest if os.path.isfile(os.path.join(latest, "train_state.pt")) else None


def load_shards(path, model, optimizer):
    """Model and optimizer from a sharded checkpoint directory, on any number of processes (DCP reshards). The
    optimizer must have exactly the trainable parameters it had when saved: only those have state in the
    checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with single_process_quiet():
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# -----------------------------------------------------------------------------
# the out_dir: writable, never taken from another run by accident


def run_files(out_dir):
    """What in out_dir shows that a run is there."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(f for f in os.listdir(out_dir) if f in RUN_FILES or f.startswith(SHARDED))


def check_out_dir(out_dir):
    """out_dir must be a directory this process can write, found out before the model and the data load (not at the
    first checkpoint, an hour in)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir={out_dir!r} is a file, expected a directory (or a path to create one at)")
    if not os.path.exists(out_dir):
        _created.add(os.path.realpath(out_dir))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"out_dir={out_dir!r}: cannot create it ({e.strerror})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"out_dir={out_dir!r}: not writable")


def check_apart(out_dir, inputs):
    """A run's inputs are never its outputs: out_dir may not be, lie inside or contain a directory it reads (the
    initial model, the data; `inputs` maps their keys to paths, and only local directories count: a hub id is
    not one). The initial model's config.json would be the run's, its files moved by override=True."""
    out = os.path.realpath(out_dir)
    for key, path in inputs.items():
        if not (path and os.path.isdir(path)):
            continue
        other = os.path.realpath(path)
        if os.path.commonpath([out, other]) in (out, other):
            how = "is" if out == other else "lies inside" if os.path.commonpath([out, other]) == other else "contains"
            raise UserError(f"out_dir={out_dir!r} {how} {key}={path!r}: a run writes its files there (config.json, "
                            "the checkpoint, hf/); choose an out_dir of its own")


_held = {}  # out_dir's real path -> the open lock file: the lock lasts while it is open
_created = set()  # the out_dirs this process created (check_out_dir): a run refused before writing leaves none


def lock_out_dir(out_dir):
    """One run per out_dir: an exclusive flock on out_dir/.lock, held until release_out_dirs (or the process's end:
    the kernel drops it, so a kill -9 leaves no stale lock). A directory held by another process is refused at once,
    naming it (pid and host, written into the lock file). A file system without flock: said, and the run goes on."""
    key = os.path.realpath(out_dir)
    if key in _held:
        return
    path = os.path.join(out_dir, LOCK)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            holder = read_holder(f)
            f.close()
            raise UserError(f"out_dir={out_dir!r} is in use by {holder or 'another process'} (its {LOCK}): one run "
                            "per directory; wait for that run to end or stop it, or choose another out_dir") from None
        f.close()
        print(f"warning: {path}: cannot lock it ({e.strerror}): nothing stops a second run into {out_dir}")
    _held[key] = f
    say_holder(f)


def read_holder(f, wait_s=2.0):
    """Who holds the lock, as its holder wrote it. A holder that has just taken the lock writes its name a moment
    later (and rewrites it once ready), so an empty file is read again for up to wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        f.seek(0)
        holder = holder_name(f.read())
        if holder or time.monotonic() > deadline:
            return holder
        time.sleep(0.02)


def holder_name(text):
    """'pid N on HOST' of the lock file's text (say_holder's)."""
    return text.split(";")[0].strip()


def say_holder(f, ready=False):
    """The lock file's text: who holds it, and once ready (rank 0 has settled out_dir) the launch it belongs to."""
    if f.closed:
        return
    f.seek(0)
    f.truncate()
    job = launch_id()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}" + (f"; ready for {job}" if ready and job else "") + "\n")
    f.flush()


def launch_id():
    """What names this launch on each of its ranks: torchrun's run id and restart, or Slurm's job, step and
    restart; None when started otherwise."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        return (f"torchrun {env['TORCHELASTIC_RUN_ID']}.{env.get('TORCHELASTIC_RESTART_COUNT', 0)} "
                f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}")
    if "SLURM_JOB_ID" in env:
        return f"slurm {env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID')}.{env.get('SLURM_RESTART_COUNT', 0)}"
    return None


def out_dir_ready(out_dir):
    """Rank 0 has settled out_dir (locked it, brought back a set-aside run): its lock file says so, for the other
    ranks (wait_for_rank0)."""
    f = _held.get(os.path.realpath(out_dir))
    if f is not None:
        say_holder(f, ready=True)


def wait_for_rank0(out_dir, timeout_s):
    """A rank other than 0 reads out_dir only once rank 0 holds it and has settled it: its lock file names this
    launch. The wait is in Python, so the launcher's SIGTERM ends it at once when rank 0 fails (a directory another
    run holds). Without a launch id (started by hand), no wait."""
    job = launch_id()
    if job is None:
        return
    path, deadline = os.path.join(out_dir, LOCK), time.time() + timeout_s
    while time.time() < deadline:
        try:
            with open(path) as f:
                text = f.read()
            if f"; ready for {job}" in text and not holder_died(text):
                return
        except OSError:
            pass
        time.sleep(0.05)
    message = (f"{path}: rank 0 did not take out_dir within {timeout_s} s (ddp_timeout_s; is out_dir on a file "
               "system every node shares?)")
    print(f"error: rank {os.environ.get('RANK')}: {message}", file=sys.stderr, flush=True)  # rank 0 cannot say it
    raise UserError(message)


def holder_died(text):
    """Whether the lock file's text was left by a process of this host that is gone (killed before it released the
    lock). Launches can share a name (torchrun's static rendezvous: run id 'none'; a reused --rdzv-id), so an old
    'ready' is told from this launch's rank 0 by its pid."""
    words = holder_name(text).split()  # pid N on HOST
    if len(words) != 4 or words[2] != "on" or words[3] != socket.gethostname():
        return False
    try:
        os.kill(int(words[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        pass
    return False


def release_out_dirs():
    """The locks this process holds (lock_out_dir), released: the run ended. An out_dir this process created and
    wrote nothing into (a run refused at its start) is removed with its lock file."""
    while _held:
        out_dir, f = _held.popitem()
        if not f.closed:
            f.seek(0)
            f.truncate()
            f.close()
        if out_dir in _created and os.listdir(out_dir) == [LOCK]:
            os.remove(os.path.join(out_dir, LOCK))
            os.rmdir(out_dir)
        _created.discard(out_dir)


def replaced_runs(out_dir):
    return sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.startswith(REPLACED))


def restore_replaced_run(out_dir):
    """A run that override=True set aside is deleted at the new run's first checkpoint; found at a start, the new
    run stopped before that. If out_dir has a checkpoint, the new run wrote it and was stopped before deleting the
    old run: it goes now. Otherwise the old run comes back into its place (what the stopped run logged before its
    first checkpoint, which nothing can resume, goes), and the message names the folder it came from. Called by
    rank 0 under the out_dir lock, before anything reads the run."""
    aside = replaced_runs(out_dir)
    if not aside:
        return
    if has_checkpoint(out_dir):
        drop_replaced_runs(out_dir)
        return
    if len(aside) > 1:
        raise UserError(f"out_dir={out_dir!r} holds {len(aside)} runs that override=True set aside and no "
                        f"checkpoint: {', '.join(aside)}; move back into out_dir the files of the one to keep and "
                        "delete the others")
    for f in run_files(out_dir) + [f for f in RUN_RECORDS if os.path.exists(os.path.join(out_dir, f))]:
        path = os.path.join(out_dir, f)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for f in os.listdir(aside[0]):
        os.replace(os.path.join(aside[0], f), os.path.join(out_dir, f))
    os.rmdir(aside[0])
    print(f"restored the run in {out_dir} from {aside[0]}: the override=True run that set it aside stopped before "
          "its first checkpoint")


def claim_out_dir(out_dir, override, master):
    """A fresh run never overwrites a run by accident: without override it stops here if out_dir holds one; with
    it, rank 0 moves the old run's files (its record and config.json with them) aside into out_dir/.replaced-run-*,
    deleted only once the new run has its first checkpoint (until then, the next start brings them back:
    restore_replaced_run)."""
    found = run_files(out_dir)
    if not found:
        return
    if not override:
        raise UserError(f"out_dir={out_dir!r} holds a run ({', '.join(found)}): continue it with "
                        "--init_from=resume, choose another out_dir, or pass --override=True to replace it")
    if not master:
        return
    aside = tempfile.mkdtemp(dir=out_dir, prefix=REPLACED)
    for f in found + [f for f in RUN_RECORDS if os.path.exists(os.path.join(out_dir, f))]:
        os.replace(os.path.join(out_dir, f), os.path.join(aside, f))
    print(f"override=True: the run in {out_dir} moved to {aside} until this run's first checkpoint (a start before "
          "then brings it back)")


def drop_replaced_runs(out_dir):
    """The run that override=True replaced, now that the new one has a checkpoint."""
    for path in replaced_runs(out_dir):
        shutil.rmtree(path, ignore_errors=True)


def remove_temp_files(out_dir):
    """What writes killed half-way left in out_dir (.tmp-*: atomic_path's and atomic_dir's temp names)."""
    for f in os.listdir(out_dir):
        if f.startswith(".tmp-"):
            tmp = os.path.join(out_dir, f)
            shutil.rmtree(tmp) if os.path.isdir(tmp) else os.remove(tmp)
