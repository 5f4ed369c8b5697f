"""The commit is fenced by the shard's lease: an attempt whose lease was taken over publishes nothing.

Real files and real leases (`dispatch.leases`); the driver test runs two real `vidbatch run` processes
(local backend) on one output, the first paused with SIGSTOP mid-shard for longer than its lease, as a
hung filesystem or a swapped-out node pauses a driver on a cluster. (The Ray backend's fence is tested
in tests/test_ray_worker_faults.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, TINY, check_exactly_once, make_inputs, read_output
from vidbatch.core.faults import LeaseLost, is_lease_lost
from vidbatch.core.rows import DoneMarker, EditRow
from vidbatch.dispatch.leases import LeaseBook, read_lease
from vidbatch.io.output_shards import ShardOutput, marker_path, rows_path, shard_path

SETS = [*FAST, "video.max_frames=4", "inversion.cache=false", "metrics.clip_model=none"]


def filled(out: Path, stem: str, keys: list[str]) -> tuple[ShardOutput, DoneMarker]:
    """A shard output with `keys` written, not committed yet, and its marker."""
    output = ShardOutput(out, stem)
    for key in keys:
        output.add(key, {"e.mp4": key.encode() * 50, "json": b"{}"}, [EditRow.pending(key, "e", metric_names=[])])
    return output, DoneMarker.for_shard(shard=f"in/{stem}.tar", stem=stem, keys=output.keys, rows=output.rows,
                                        seconds=1.0, started_at="2026-01-01T00:00:00+00:00",
                                        finished_at="2026-01-01T00:00:01+00:00")


def wait_until(condition, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_commit_whose_lease_was_taken_over_publishes_nothing_and_the_takers_output_stands(tmp_path):
    out = tmp_path / "out"
    old = LeaseBook(out, "driver-a", ttl_s=0.2)
    assert old.claim("p0")
    output, marker = filled(out, "p0", ["a", "b"])              # driver a is mid-shard ...
    wait_until(lambda: not read_lease(out, "p0").live(), "the lease to expire")   # ... and stops renewing
    taker = LeaseBook(out, "driver-b", ttl_s=60)
    assert taker.claim("p0")                                     # b takes the shard over

    with pytest.raises(LeaseLost, match="driver driver-b holds it now") as lost:
        output.commit(marker, old.fence("p0"))
    output.abort()   # what process_shard does with any exception
    assert is_lease_lost(lost.value)
    for path in (shard_path(out, "p0"), rows_path(out, "p0"), marker_path(out, "p0")):
        assert not path.exists(), f"{path.name} published by the attempt that lost its lease"
    assert not list(out.rglob("*.tmp"))

    new_output, new_marker = filled(out, "p0", ["a", "b"])
    new_output.commit(new_marker, taker.fence("p0"))            # the holder's fence passes
    assert list(read_output(shard_path(out, "p0"))) == ["a", "b"]
    assert json.loads(marker_path(out, "p0").read_text())["samples"] == 2
    assert not list(out.rglob("*.tmp"))


def test_the_fence_names_the_attempt_that_holds_the_lease_now(tmp_path):
    """A driver that hands the shard to a new attempt (its worker was given up on) fences the old one."""
    out = tmp_path / "out"
    book = LeaseBook(out, "driver-a", ttl_s=60)
    assert book.claim("p0")
    first = book.fence("p0")
    first()                                     # attempt 1 holds it
    assert book.hand_out("p0", 1)               # attempt 2 is given the shard
    assert read_lease(out, "p0").attempt == 1
    with pytest.raises(LeaseLost, match="attempt 2 of this driver holds it now"):
        first()
    book.fence("p0")()
    book.release("p0")
    with pytest.raises(LeaseLost, match="released or broken"):
        first()


def test_a_killed_drivers_half_written_lease_goes_when_its_shard_is_claimed(tmp_path):
    """A driver SIGKILLed while writing a lease leaves `.pN.json.PID.*.tmp`: mid-renewal (p0: its lease is
    there, held by the dead process) or mid-claim (p2: no lease). The next driver to claim the shard removes
    it. Left alone: a temporary of a live process, a dead writer's just written (younger than
    `DEAD_WRITER_S`: on a shared folder it may be another host's write in flight), another shard's."""
    from vidbatch.core.atomic import temporary_path
    from vidbatch.dispatch.leases import DEAD_WRITER_S, lease_path

    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()   # its pid names a process that is gone
    holder = LeaseBook(out, "dead-driver", ttl_s=600)
    assert holder.claim("p0") and holder.claim("p1")
    for stem in ("p0", "p1"):   # both leases written by the dead process
        record = json.loads(lease_path(out, stem).read_text())
        lease_path(out, stem).write_text(json.dumps({**record, "pid": dead.pid}))
    old = time.time() - 10 * DEAD_WRITER_S
    left = {stem: lease_path(out, stem).with_name(f".{stem}.json.{dead.pid}.0123456789ab.tmp")
            for stem in ("p0", "p1", "p2")}
    young = lease_path(out, "p0").with_name(f".p0.json.{dead.pid}.ba9876543210.tmp")
    ours = temporary_path(lease_path(out, "p0"))   # this process's: alive
    for path in [*left.values(), ours]:
        path.write_text("{")
        os.utime(path, (old, old))
    young.write_text("{")
    book = LeaseBook(out, "next-driver", ttl_s=600)
    assert book.claim("p0") and book.claim("p2")
    assert not left["p0"].exists() and not left["p2"].exists()
    assert left["p1"].exists() and ours.exists() and young.exists()
    assert read_lease(out, "p0").owner == "next-driver" and read_lease(out, "p2").owner == "next-driver"


def test_old_temporaries_of_shards_without_a_live_lease_are_swept_from_every_output_folder(tmp_path):
    """What killed attempts and drivers leave in shards/, stats/, leases/ and failed/ goes once it is older
    than the lease time, unless its shard's lease is live (an attempt may still be writing it)."""
    from vidbatch.dispatch.leases import remove_stale_temporaries_by_age

    out = tmp_path / "out"
    LeaseBook(out, "driver", ttl_s=600).claim("p1")   # p1 is in flight
    old_stamp = time.time() - 300
    names = {"shards": ".{}.tar.9.a.tmp", "stats": ".{}.jsonl.9.b.tmp", "leases": ".{}.json.9.c.tmp",
             "failed": ".{}.json.9.d.tmp"}
    made = {}
    for folder, pattern in names.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        for stem in ("p0", "p1"):
            path = out / folder / pattern.format(stem)
            path.write_text("half")
            os.utime(path, (old_stamp, old_stamp))
            made[folder, stem] = path
    young = out / "leases" / ".p0.json.9.e.tmp"
    young.write_text("being written")
    assert remove_stale_temporaries_by_age(out, max_age_s=120) == 4
    assert [key for key, path in made.items() if path.exists()] == [(folder, "p1") for folder in names]
    assert young.exists()


def test_a_driver_paused_past_its_lease_publishes_nothing_for_the_shard_taken_over(tmp_path, clips):
    """Driver A commits p0, then is paused (SIGSTOP) in the middle of p1 for longer than its lease. Driver
    B takes p1 over and commits it. When A resumes and reaches p1's commit, its fence finds the lease
    gone: it publishes nothing, reports the lost lease (not a failed shard), and exits 0; B's output stands."""
    inputs, keys = make_inputs(tmp_path / "in", clips["pattern"], shards=2, videos=4)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vidbatch.cli", "run", str(TINY), "--input", inputs, "--output", str(out),
               *sum((["--set", s] for s in [*SETS, "runtime.lease_s=2"]), [])]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["OMP_NUM_THREADS"] = "1"
    a = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def a_is_mid_p1() -> bool:
            assert a.poll() is None, "driver A ended before it could be paused"
            return marker_path(out, "p0").exists() and any(
                p.stat().st_size > 0 for p in (out / "stats").glob(".p1.jsonl.*.tmp"))

        wait_until(a_is_mid_p1, "driver A to be in the middle of p1", timeout_s=300)
        a.send_signal(signal.SIGSTOP)
        assert not marker_path(out, "p1").exists(), "driver A finished p1 before it could be paused"
        a_temporaries = sorted(p.name for p in out.rglob(".p1.*.tmp"))
        assert a_temporaries
        p0_marker = marker_path(out, "p0").read_text()
        wait_until(lambda: not read_lease(out, "p1").live(), "driver A's lease on p1 to expire")

        b = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
        assert "1 shard(s) already done" in b.stdout
        taken = (marker_path(out, "p1").read_text(), shard_path(out, "p1").stat().st_ino,
                 rows_path(out, "p1").stat().st_ino)
    finally:
        a.send_signal(signal.SIGCONT)
    a_output, _ = a.communicate(timeout=300)
    assert a.returncode == 0, a_output[-3000:]

    log = (out / "run.log").read_text()
    assert f"lease of shard p1 (driver " in log and "expired; taken over" in log        # B took it over
    assert "shard p1: lease of shard p1 lost by attempt 1 of driver" in log              # A's fence caught it
    assert "shard p1 FAILED" not in log and not (out / "failed").exists()
    # A published nothing for p1: the files and the marker are B's, whole; A's temporaries are gone.
    assert (marker_path(out, "p1").read_text(), shard_path(out, "p1").stat().st_ino,
            rows_path(out, "p1").stat().st_ino) == taken
    assert not [p for p in out.rglob("*.tmp") if p.name in a_temporaries] and not list(out.rglob("*.tmp"))
    assert marker_path(out, "p0").read_text() == p0_marker      # A's healthy commit of p0 stands
    check_exactly_once(out, 2, keys)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"]["done"] == 2 and summary["shards"]["failed"] == 0
    assert not list((out / "leases").glob("*.json"))
