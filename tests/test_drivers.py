"""Several drivers on one output: shards claimed through leases, one summary written by the last.

Real processes (`vidbatch run` subprocesses, local backend) share one output folder the way a second
submission and SLURM array tasks do; a lease left by a driver on another machine is a file written
the way that driver would have written it.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from conftest import FAST, TINY, check_exactly_once, make_inputs, run_cli
from vidbatch.config.schema import load_config
from vidbatch.core.rows import DoneMarker
from vidbatch.dispatch.leases import LeaseBook
from vidbatch.dispatch.plan import RunOutcome, RunPlan
from vidbatch.dispatch.work import SharedWork
from vidbatch.io.output_shards import ShardOutput
from vidbatch.report.finalize import finish_run

SETS = [*FAST, "video.max_frames=4", "inversion.cache=false", "metrics.clip_model=none"]


def _set_args() -> list[str]:
    return sum((["--set", s] for s in SETS), [])


def test_two_drivers_and_three_array_tasks_share_one_output(tmp_path, clips):
    inputs, keys = make_inputs(tmp_path / "in", clips["pattern"], shards=8, videos=1)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vidbatch.cli", "run", str(TINY), "--input", inputs, "--output", str(out),
               *_set_args()]
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base["OMP_NUM_THREADS"] = "1"
    envs = [base, base] + [{**base, "SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_MIN": "0",
                            "SLURM_ARRAY_TASK_COUNT": "3"} for i in range(3)]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for env in envs]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, text in zip(procs, outputs):
        assert proc.returncode == 0, text[-3000:]
    check_exactly_once(out, 8, keys)
    log = (out / "run.log").read_text()
    # Each shard processed once, by one of the five: no driver redid another's shard.
    assert sorted(re.findall(r"INFO shard (p\d) done", log)) == [f"p{i}" for i in range(8)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"]["done"] == 8 and summary["shards"]["failed"] == 0
    assert summary["samples"] == {"total": 8, "ok": 8, "failed": 0}
    assert any("vidbatch run:" in text for text in outputs)  # someone (the last to finish) wrote the summary
    assert not list((out / "leases").glob("*.json")) and not (out / "failed").exists()
    assert not list(out.rglob("*.tmp"))


def _lease(out: Path, stem: str, expires: float) -> None:
    """A lease as a driver on another machine writes it."""
    (out / "leases").mkdir(parents=True, exist_ok=True)
    (out / "leases" / f"{stem}.json").write_text(json.dumps(
        {"stem": stem, "owner": "node7-4242-abcdef12", "attempt": 0, "host": "node7", "pid": 4242,
         "expires": expires}))


def test_a_live_lease_is_left_alone_an_expired_one_taken_over_and_finalize_reports_both(tmp_path, clips):
    assert socket.gethostname() != "node7"
    inputs, keys = make_inputs(tmp_path / "in", clips["pattern"], shards=3, videos=1)
    out = tmp_path / "out"
    args = ["run", TINY, "--input", inputs, "--output", out, *_set_args()]
    _lease(out, "p1", time.time() + 600)   # another driver is at work on p1
    _lease(out, "p2", time.time() - 1)     # p2's driver stopped renewing: its lease expired
    assert run_cli(*args) == 0
    assert (out / "stats" / "p0.json").exists() and (out / "stats" / "p2.json").exists()
    assert not (out / "stats" / "p1.json").exists()
    assert not (out / "summary.json").exists()  # p1 is still in progress elsewhere: not the last driver
    assert "lease of shard p2 (driver node7-4242-abcdef12) expired; taken over" in (out / "run.log").read_text()
    assert json.loads((out / "leases" / "p1.json").read_text())["owner"] == "node7-4242-abcdef12"

    assert run_cli("finalize", out) == 1  # on demand: what is there now, p1 listed as not finished
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"]["done"] == 2 and summary["shards"]["failed"] == 1
    assert summary["shards"]["failed_shards"]["p1"].startswith("in progress: driver node7-4242-abcdef12")

    _lease(out, "p1", time.time() - 1)  # that driver died on its node
    assert run_cli(*args) == 0
    check_exactly_once(out, 3, keys)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"]["done"] == 3 and summary["shards"]["failed"] == 0
    assert not list((out / "leases").glob("*.json"))


def _done_marker(out: Path, stem: str, seconds: float) -> None:
    """A done shard that took `seconds`, committed the way a run commits it (empty: no samples)."""
    ShardOutput(out, stem).commit(DoneMarker.for_shard(shard=f"in/{stem}.tar", stem=stem, keys=[], rows=[],
                                                       seconds=seconds, started_at="2026-01-01T00:00:00+00:00",
                                                       finished_at="2026-01-01T00:01:40+00:00"))


def test_no_shard_is_started_that_would_end_after_the_deadline(tmp_path):
    out = tmp_path / "out"
    _done_marker(out, "p0", 100.0)  # the longest shard so far took 100 s
    plan = RunPlan(urls=[f"in/p{i}.tar" for i in range(3)], stems=["p0", "p1", "p2"], todo=[1, 2])
    work = SharedWork(plan, out, LeaseBook(out, "driver-a", 60), deadline=time.time() + 150)
    assert work.claim_next() == 1 and work.stopped is None  # 150 s left: one more fits
    work.deadline = time.time() + 50  # the first one ran; 50 s are left now
    assert work.claim_next() is None and not work.never_fits
    assert "the longest so far took 100s" in work.stopped
    assert not (out / "leases" / "p2.json").exists()  # not claimed: free for the next job
    # A job whose whole time is shorter than a shard can never do it: said so, not requeued forever.
    never = SharedWork(plan, out, LeaseBook(out, "driver-b", 60), deadline=time.time() + 50)
    assert never.claim_next() is None and never.never_fits and "raise its time limit" in never.stopped


def test_a_run_whose_time_cannot_fit_a_shard_exits_1_and_one_that_ran_out_exits_3(tmp_path, clips):
    inputs, _ = make_inputs(tmp_path / "in", clips["pattern"], shards=2, videos=1)
    out = tmp_path / "out"
    _done_marker(out, "p0", 100.0)
    args = ["run", TINY, "--input", inputs, "--output", out, *_set_args()]
    assert run_cli(*args, "--set", f"runtime.deadline={time.time() + 30:.0f}") == 1
    assert not (out / "stats" / "p1.json").exists() and not (out / "summary.json").exists()
    assert "more than this job's whole time" in (out / "run.log").read_text()
    outcome = RunOutcome(plan=RunPlan(urls=["a"], stems=["p1"], todo=[0]), failed={}, started=0.0,
                         stopped="not starting another shard")
    assert finish_run(load_config(TINY), out, outcome, Console(file=io.StringIO())) == 3
