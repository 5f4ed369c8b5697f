"""The sbatch scripts in slurm/ on a real single-node SLURM (Debian's slurmctld, slurmd and munge).

tests/slurm_support/start_local_slurm.sh installs the packages if missing and starts the daemons (root
only, skipped otherwise; four fake GPUs, so --gpus-per-task is exercised). An array job of two tasks
(no Ray) and a one-node Ray job are submitted at once and run side by side; once task 0 and the Ray job
have each finished a shard they get USR1, the signal SLURM sends before a time limit, and requeue
themselves. Each test checks its job's state and restart count, that the restart skipped the finished
shards, and the output contract: every input sample exactly once, done markers, no temporary file,
no process left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, REPO, TINY, check_exactly_once, make_inputs

SUPPORT = Path(__file__).resolve().parent / "slurm_support"
VIDBATCH = Path(sys.executable).parent / "vidbatch"
# A CPU run: `tiny` says device cpu; the fake GPUs only exercise the scripts' GPU requests.
SETS = [*FAST, "video.max_frames=4", "inversion.cache=false"]
DEADLINE_S = 300


def sh(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, timeout=120, check=check)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running local SLURM cluster; yields the environment to submit with."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM tests need root: they install and start munged, slurmctld and slurmd")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it (Debian/Ubuntu only)")
    if not VIDBATCH.exists():
        pytest.skip(f"{VIDBATCH} not found: install vidbatch into the test environment (make test does)")
    env = {**os.environ, "SLURM_LOCAL_GPUS": "4", "SLURM_LOCAL_CPUS": "8", "VIDBATCH": str(VIDBATCH)}
    env.pop("RAY_ADDRESS", None)
    was_up = shutil.which("scontrol") is not None and \
        subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout.count("is UP") > 0
    started = subprocess.run(["bash", str(SUPPORT / "start_local_slurm.sh")], env=env, capture_output=True,
                             text=True, timeout=900)
    if started.returncode != 0:
        pytest.skip("a local SLURM could not be started (is Debian's package registry reachable?):\n"
                    + started.stderr[-1500:])
    conf = re.search(r"SLURM_CONF=(\S+)", started.stderr)
    if conf:
        env["SLURM_CONF"] = conf.group(1)
    yield env
    if not was_up:
        subprocess.run(["bash", str(SUPPORT / "stop_local_slurm.sh")], env=env, capture_output=True, timeout=120)


def job_field(job: str, name: str, env: dict) -> str:
    """A field of `scontrol show job` (kept for 300 s after the job ends)."""
    text = sh("scontrol", "show", "job", job, env=env).stdout
    match = re.search(rf"\b{name}=(\S+)", text)
    assert match, f"no {name} in: {text}"
    return match.group(1)


def wait_gone(job: str, env: dict, deadline: float) -> None:
    while sh("squeue", "-h", "-j", job, env=env, check=False).stdout.strip():
        assert time.monotonic() < deadline, f"job {job} still queued: " + sh("squeue", env=env).stdout
        time.sleep(0.5)


def skipped_on_restart(log: str) -> int:
    """How many shards the restarted run found done (its "N shard(s) already done" line)."""
    found = re.findall(r"(\d+) shard\(s\) already done", log)
    assert len(found) == 1, log[-3000:]
    return int(found[0])


def no_process_mentions(text: str) -> bool:
    """No live process is left whose command line holds `text` (SLURM must have ended the whole job)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):  # not a process, or it ended meanwhile
            continue
        if text in cmdline and state != "Z":
            return False
    return True


def signal_after_first_shard(jobs: dict[str, list[Path]], env: dict, deadline: float) -> dict[str, dict[str, str]]:
    """Sends each job USR1 (what SLURM sends before its time limit) as soon as one of its shards is done.

    `jobs` maps a job id to the done markers of its shards; returns, per job, the markers that existed
    when it was signalled (name -> text).
    """
    done: dict[str, dict[str, str]] = {}
    while len(done) < len(jobs):
        for job, markers in jobs.items():
            if job not in done and any(m.exists() for m in markers):
                done[job] = {m.name: m.read_text() for m in markers if m.exists()}
                sh("scancel", "--batch", "--signal=USR1", job, env=env)
        assert time.monotonic() < deadline, "no shard finished: " + sh("squeue", env=env).stdout
        time.sleep(0.1)
    return done


@pytest.fixture(scope="module")
def jobs(slurm, tmp_path_factory, clips):
    """Submits an array job and a Ray job (they run side by side); once task 0 of the array and the
    Ray job have each finished a shard, both get the signal that makes them requeue themselves."""
    root = tmp_path_factory.mktemp("slurm")
    array_inputs, array_keys = make_inputs(root / "array-in", clips["pattern"], shards=6, videos=1)
    ray_inputs, ray_keys = make_inputs(root / "ray-in", clips["pattern"], shards=4, videos=2)
    sets = sum((["--set", s] for s in SETS), [])
    for name in ("array-out", "ray-out"):  # sbatch does not create the folder of its -o file
        (root / name).mkdir()
    common = ["sbatch", "--parsable", "--time=00:15:00", "--chdir", str(root)]
    array_id = sh(*common, "--array=0-1", "--cpus-per-task=1", "--gpus-per-task=1",
                  "-o", root / "array-out" / "slurm-%A_%a.out", REPO / "slurm" / "vidbatch-array.sbatch",
                  TINY, array_inputs, root / "array-out", *sets, env=slurm).stdout.strip()
    ray_id = sh(*common, "--nodes=1", "--cpus-per-task=2", "--gpus-per-task=2",
                "-o", root / "ray-out" / "slurm-%j.out", REPO / "slurm" / "vidbatch-ray.sbatch",
                TINY, ray_inputs, root / "ray-out", *sets, "--set", "runtime.workers=2", env=slurm).stdout.strip()
    try:
        # Task 0 of the array takes p0, p2, p4 (task 1: p1, p3, p5); the Ray job all four of its shards.
        array_stats, ray_stats = root / "array-out" / "stats", root / "ray-out" / "stats"
        first = signal_after_first_shard({f"{array_id}_0": [array_stats / f"p{i}.json" for i in (0, 2, 4)],
                                          ray_id: [ray_stats / f"p{i}.json" for i in range(4)]},
                                         slurm, time.monotonic() + DEADLINE_S)
        yield {"root": root, "array": (array_id, array_keys, first[f"{array_id}_0"]),
               "ray": (ray_id, ray_keys, first[ray_id])}
    finally:
        sh("scancel", array_id, ray_id, env=slurm, check=False)


def test_array_tasks_split_the_shards_and_a_requeued_task_resumes(slurm, jobs):
    job, keys, done_before = jobs["array"]
    out = jobs["root"] / "array-out"
    wait_gone(job, slurm, time.monotonic() + DEADLINE_S)
    log0 = (out / f"slurm-{job}_0.out").read_text()
    assert job_field(f"{job}_0", "JobState", slurm) == "COMPLETED", log0[-3000:]
    assert job_field(f"{job}_0", "Restarts", slurm) == "1"
    assert job_field(f"{job}_1", "JobState", slurm) == "COMPLETED"
    assert job_field(f"{job}_1", "Restarts", slurm) == "0"
    assert "requeueing task" in log0 and "restart 1" in log0
    assert skipped_on_restart(log0) >= len(done_before)  # more may have finished before the signal landed
    assert "CUDA_VISIBLE_DEVICES=none" not in log0  # --gpus-per-task gave the task a GPU
    for name, text in done_before.items():  # finished shards were not redone
        assert (out / "stats" / name).read_text() == text
    check_exactly_once(out, 6, keys)
    assert no_process_mentions(str(out)), "a vidbatch process of the requeued task outlived it"


def test_ray_job_builds_its_cluster_again_after_a_requeue_and_resumes(slurm, jobs):
    job, keys, done_before = jobs["ray"]
    out = jobs["root"] / "ray-out"
    wait_gone(job, slurm, time.monotonic() + DEADLINE_S)
    log = (out / f"slurm-{job}.out").read_text()
    assert job_field(job, "JobState", slurm) == "COMPLETED", log[-3000:]
    assert job_field(job, "ExitCode", slurm) == "0:0"
    assert job_field(job, "Restarts", slurm) == "1"
    assert log.count("Ray head up") == 2 and "running on the Ray cluster at" in log
    assert "requeueing job" in log, log[-3000:]
    assert skipped_on_restart(log) >= len(done_before)  # more may have finished before the driver stopped
    assert re.search(r"Ray node \S+ on \S+: CUDA_VISIBLE_DEVICES=\d", log)
    run_log = (out / "run.log").read_text()
    assert "worker w1 ready" in run_log and "worker w2 ready" in run_log
    for name, text in done_before.items():
        assert (out / "stats" / name).read_text() == text
    check_exactly_once(out, 4, keys)
    assert no_process_mentions(f"/ray-{job}/"), "Ray processes of the job outlived it"


def test_sigterm_ends_a_run_in_the_middle_of_a_shard_without_partial_output(tmp_path, clips):
    """What SLURM sends on requeue, preemption and scancel (no SLURM needed): the shard in progress is
    dropped at once, never finished and committed later; finished shards stay done."""
    inputs, _ = make_inputs(tmp_path / "in", clips["pattern"], shards=3, videos=1)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vidbatch.cli", "run", str(TINY), "--input", inputs, "--output", str(out),
               *sum((["--set", s] for s in SETS), [])]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + DEADLINE_S
    while not (out / "stats" / "p0.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (out / "stats" / "p0.json").exists(), "the first shard never finished"
    process.terminate()
    # 143: SystemExit inside a shard; -15: the default action between shards. Not 0: the run did not go on.
    assert process.wait(timeout=120) in (143, -15)
    assert not (out / "stats" / "p2.json").exists()
    for tar in out.glob("shards/*.tar"):
        assert (out / "stats" / f"{tar.stem}.json").exists()
    assert not list(out.rglob("*.tmp"))
