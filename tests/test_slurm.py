"""The SLURM recipe, slurm/train.sbatch, against a real Slurm: munged, slurmctld and slurmd started on this machine
with a one-node configuration in a temporary directory. One-minute time limits cut a tiny run into several Slurm runs
of one job, each stopped with a checkpoint and requeued; the job must complete exactly as an uninterrupted run ends.

`make test-slurm` runs these tests (plain `make test` leaves them out: pytest.ini). They skip, saying why, where
Slurm is not installed or cannot start here; REQUIRE_SLURM=1 (CI) makes that a failure."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, metrics, stop_by_sigterm_while_reading, train_args, weights

import train

pytestmark = pytest.mark.slurm

SCRIPT = os.path.join(ROOT, "slurm", "train.sbatch")
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
STEPS = 2000  # 50-100 s of training for three processes on two cores: two Slurm runs or more


def unavailable(reason):
    (pytest.fail if os.environ.get("REQUIRE_SLURM") else pytest.skip)(reason)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=clptest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={root}/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1,bf_interval=1
# both jobs of the test at once: the node claims more CPUs than the machine has
SlurmdParameters=config_overrides
ReturnToService=2
NodeName={node} NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm of this machine's daemons. Yields a function that runs a Slurm command against it and returns
    its stdout; afterwards every job left is cancelled and the daemons are stopped, by their pids."""
    missing = [p for p in PROGRAMS if not shutil.which(p)]
    if missing:
        unavailable(f"Slurm is not installed (no {', '.join(missing)}): apt-get install slurmctld slurmd "
                    "slurm-client munge")
    if os.geteuid() != 0:
        unavailable("the Slurm daemons run as root here (SlurmUser=root), and this is not root")
    root = tmp_path_factory.mktemp("slurm")
    for d in ("state", "spool"):
        (root / d).mkdir()
    (root / "munge.key").write_bytes(os.urandom(1024))
    (root / "munge.key").chmod(0o400)
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, node=node, ctld_port=free_port(), d_port=free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}

    def run(*args, check=True):
        r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 or not check, f"{' '.join(args)}: {r.stderr}"
        return r.stdout

    daemons, logs = [], {name: open(root / f"{name}.out", "w") for name in ("munged", "slurmctld", "slurmd")}
    try:
        # --force: the key's directory is private to root, which munged would otherwise refuse
        daemons.append(subprocess.Popen(["munged", "--foreground", "--force", f"--key-file={root}/munge.key",
                                         f"--socket={root}/munge.socket", f"--pid-file={root}/munged.pid",
                                         f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed"],
                                        stdout=logs["munged"], stderr=subprocess.STDOUT))
        daemons.append(subprocess.Popen(["slurmctld", "-D", "-f", str(conf)], env=env, stdout=logs["slurmctld"],
                                        stderr=subprocess.STDOUT))
        daemons.append(subprocess.Popen(["slurmd", "-D", "-N", node, "-f", str(conf)], env=env,
                                        stdout=logs["slurmd"], stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while run("sinfo", "-h", "-o", "%t", check=False).strip() != "idle":
            dead = [p.args[0] for p in daemons if p.poll() is not None]
            if dead or time.time() > deadline:
                tails = {n: (root / f"{n}.out").read_text()[-600:] for n in logs}
                unavailable(f"Slurm did not start ({', '.join(dead) or 'no idle node in 60 s'} ended): {tails}")
            time.sleep(0.5)
        yield run
    finally:
        if daemons:
            jobs = run("squeue", "-h", "-o", "%i", check=False).split()
            if jobs:
                run("scancel", *jobs, check=False)
                deadline = time.time() + 60
                while run("squeue", "-h", "-o", "%i", check=False).split() and time.time() < deadline:
                    time.sleep(0.5)
        for p in reversed(daemons):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs.values():
            f.close()


def job(slurm, job_id):
    """scontrol's fields of a job: JobState, Restarts, ExitCode, ..."""
    return dict(re.findall(r"(\S+?)=(\S*)", slurm("scontrol", "show", "job", "-o", str(job_id))))


def submit(slurm, log, sbatch_args, argv, **env):
    exports = ",".join(["ALL", f"PYTHON={sys.executable}", *(f"{k}={v}" for k, v in env.items())])
    out = slurm("sbatch", "--parsable", "--chdir", ROOT, f"--output={log}", f"--export={exports}", *sbatch_args,
                SCRIPT, *argv)
    return int(out.strip().split(";")[0])


def last_step(out):
    """The last training step in metrics.jsonl now (0 before the first)."""
    try:
        lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines if '"dt_s"' in line and line.endswith("}")), default=0)


def wait_for_jobs(slurm, outs, timeout):
    """Until every job (job id -> out_dir) has ended; returns, per job, metrics.jsonl's last step sampled every half
    second: a resumed run drops the lines after its checkpoint, so a drop between samples is work lost at a stop."""
    samples = {j: [] for j in outs}
    deadline = time.time() + timeout
    while True:
        for j, out in outs.items():
            samples[j].append(last_step(out))
        if all(job(slurm, j)["JobState"] in ENDED for j in outs):
            return samples
        assert time.time() < deadline, f"jobs {list(outs)} still running after {timeout} s"
        time.sleep(0.5)


def log_lines(path):
    """The job's log (every Slurm run of it, appended), split at progress-bar carriage returns too."""
    return re.split(r"[\r\n]+", open(path, errors="replace").read())


def run_args():
    return [f"--max_iters={STEPS}", f"--eval_interval={10 * STEPS}"]  # checkpoints only when stopped and at the end


LAUNCHERS = {1: [sys.executable], 2: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      "--nproc_per_node=2"]}


@pytest.fixture(scope="module")
def runs(slurm, corpus, tmp_path_factory):
    """The tiny run, uninterrupted (one process, and two under torchrun: the references), then as one Slurm job each
    (one and two tasks on the node, gloo), both jobs at once. The references' timings set STOP_MARGIN: each Slurm run
    trains about a quarter of the run before it is asked to stop (at least 10 s before the time limit). The jobs may
    train faster than their references did (the references ran side by side), so fewer Slurm runs may be needed."""
    root = tmp_path_factory.mktemp("slurm-runs")
    refs, timing = {}, {}
    for n, launcher in LAUNCHERS.items():
        out = root / f"reference-{n}"
        refs[n] = subprocess.Popen([*launcher, "train.py", *train_args(corpus, out, *run_args())], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        timing[n] = time.time()
    for n, proc in refs.items():
        output = proc.communicate(timeout=900)[0]
        assert proc.returncode == 0, output[-3000:]
        timing[n] = time.time() - timing[n]
    jobs, margins = {}, {}
    for n in LAUNCHERS:
        summary = json.loads((root / f"reference-{n}" / "summary.json").read_text())
        train_s = sum(p["seconds"] for p in summary["phases"].values())
        startup_s = timing[n] - train_s  # start, evaluation and export
        margins[n] = int(min(max(60 - 1.5 * startup_s - train_s / 4, 10), 40))
        out, log = root / f"slurm-{n}", root / f"slurm-{n}.log"
        job_id = submit(slurm, log, ["--time=1", f"--ntasks-per-node={n}", "--cpus-per-task=1"],
                        train_args(corpus, out, *run_args()), STOP_MARGIN=margins[n])
        jobs[job_id] = (n, out, log)
    t0 = time.time()
    samples = wait_for_jobs(slurm, {j: out for j, (n, out, log) in jobs.items()}, timeout=1200)
    wall = time.time() - t0
    return {n: {"job": job(slurm, j), "out": out, "log": log, "reference": root / f"reference-{n}",
                "samples": samples[j], "margin": margins[n], "wall": wall} for j, (n, out, log) in jobs.items()}


@pytest.mark.parametrize("processes", [1, 2])
def test_time_limited_job_requeues_and_ends_as_the_uninterrupted_run(runs, processes):
    run = runs[processes]
    lines = log_lines(run["log"])
    starts = [line for line in lines if re.match(r"train\.sbatch: job \d+, run \d+", line)]
    continued = [int(m[1]) for line in lines if (m := re.search(r"continuing .* at step (\d+)$", line))]
    # Each Slurm run but the last ends with a stop: one in a step checkpoints that step, one outside the loop (loading,
    # the final evaluation or export) exits at once, one while Python still imports torch ends the process silently;
    # the next run continues from the last checkpoint on disk. The trainers' lines may share a line of the log with
    # another process's progress bar: searched, not matched.
    segments, segment = [], []
    for line in lines:
        if re.match(r"train\.sbatch: job \d+, run \d+", line) and segment:
            segments.append(segment)
            segment = []
        segment.append(line)
    segments.append(segment)
    stops = [m[1] or "outside" for seg in segments[:-1] for line in seg
             if (m := re.search(r"stopped by SIGTERM (?:at step (\d+): checkpoint|outside a training step)", line))]
    report = (f"{processes} process(es), STOP_MARGIN={run['margin']} s, {run['wall']:.0f} s: {len(starts)} Slurm runs,"
              f" stopped at {stops}, continued from {continued}")
    print(report)
    assert run["job"]["JobState"] == "COMPLETED" and run["job"]["ExitCode"] == "0:0", (run["job"], lines[-30:])
    assert len(starts) == len(segments) == int(run["job"]["Restarts"]) + 1 >= 2, report
    for seg, following in zip(segments, segments[1:]):
        assert "train.sbatch: stopped by SIGTERM: requeued, the next run continues" in seg, (report, seg[-20:])
        at_step = [int(m[1]) for line in seg if (m := re.search(r"stopped by SIGTERM at step (\d+): checkpoint", line))]
        resumed = [int(m[1]) for line in following if (m := re.search(r"continuing .* at step (\d+)$", line))]
        assert resumed[:1] == at_step[:1] or not at_step, (report, seg[-20:], following[:5])
    assert continued == sorted(continued), report
    assert "train.sbatch: the run is finished" in lines
    assert not [line for line in lines if line.startswith("train.sbatch: warning")]
    assert [m["step"] for m in metrics(run["out"]) if "lr" in m] == list(range(1, STEPS + 1))  # each step once
    drops = [a - b for a, b in zip(run["samples"], run["samples"][1:]) if b < a]
    assert all(drop <= 1 for drop in drops), drops  # work lost at a stop: at most the step under way
    reference, trained = weights(run["reference"]), weights(run["out"])
    assert reference.keys() == trained.keys()
    for name, tensor in trained.items():
        assert torch.equal(tensor, reference[name]), name


def test_bad_input_is_one_line_at_the_start_of_the_log(slurm, corpus, tmp_path, monkeypatch):
    """A job that cannot be requeued, a STOP_MARGIN shorter than a step plus a checkpoint (here 0 s, against the
    checkpoint of a run stopped by SIGTERM), and a STOP_MARGIN longer than the time limit."""
    argv = train_args(corpus, tmp_path / "run", "--max_iters=20", "--eval_interval=1000")
    stop_by_sigterm_while_reading(monkeypatch, 40, lambda: train.main(argv))
    assert last_step(tmp_path / "run") < 20 and (tmp_path / "run" / "ckpt.pt").exists()
    short = submit(slurm, tmp_path / "short.log", ["--time=1", "--no-requeue", "--cpus-per-task=1"], argv,
                   STOP_MARGIN=0)
    long = submit(slurm, tmp_path / "long.log", ["--time=1", "--cpus-per-task=1"],
                  train_args(corpus, tmp_path / "long"), STOP_MARGIN=60)
    wait_for_jobs(slurm, {short: tmp_path / "run", long: tmp_path / "long"}, timeout=300)
    assert job(slurm, short)["JobState"] == "COMPLETED"  # warned, not refused
    lines = log_lines(tmp_path / "short.log")
    assert lines[1].startswith("train.sbatch: warning: the job cannot be requeued (submitted without --requeue")
    assert lines[3].startswith("train.sbatch: warning: STOP_MARGIN=0 s is shorter than this run's recent steps (")
    assert " plus its last checkpoint (" in lines[3]
    assert job(slurm, long)["JobState"] == "FAILED" and not (tmp_path / "long").exists()
    assert log_lines(tmp_path / "long.log")[1] == ("train.sbatch: error: STOP_MARGIN=60 s leaves no time to train "
                                                   "before the time limit: lower it or raise --time")
