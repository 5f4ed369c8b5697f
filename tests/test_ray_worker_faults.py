"""Faults of Ray workers, against a real local Ray cluster with two CPU workers: a worker killed mid-shard, a
shard that keeps raising, a bad GPU and a hung worker, a lost progress relay, a lease taken over mid-shard.

One cluster (`ray.init(num_cpus=2)`, tests/ray_support.py) serves the module; the driver runs in this
process, so a test sees the driver's events and can kill a worker by pid at a chosen moment. Every run checks
the output contract: each input sample exactly once, complete shards with done markers, no temporary file left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request

import psutil
import pytest

from conftest import check_exactly_once, make_inputs, video_sample, write_shard

ray = pytest.importorskip("ray")

from ray_support import RAY, RAY_METRICS_PORT, last_status_line, ray_cluster, run_here  # noqa: E402,F401 (a fixture)


def test_a_killed_worker_is_replaced_and_its_shard_redone(ray_cluster, tmp_path, clips):
    inputs, keys = make_inputs(tmp_path / "in", clips["pattern"], shards=3, videos=3)
    events: list[dict] = []
    killed: dict = {}

    def kill_mid_shard(event: dict) -> None:
        # The first video a worker reports: its shard has two more to go, so the worker dies mid-shard.
        if event["type"] == "video" and not killed:
            killed.update(pid=event["pid"], stem=event["stem"], worker=event["worker"])
            os.kill(event["pid"], signal.SIGKILL)

    code, text = run_here(inputs, tmp_path / "out", RAY, events, kill_mid_shard)
    assert code == 0, text
    assert killed
    replaced = [e for e in events if e["type"] == "worker_replaced"]
    assert [(e["worker"], e["pid"], e["by"]) for e in replaced] == [(killed["worker"], killed["pid"], "w3")]
    # The shard the dead worker had in flight (the last the driver gave it: events may lag, so not always the
    # one it reported from) is given out again, once, as a requeue: the worker failed, not the shard, so no
    # retry is spent.
    requeues = [e for e in events if e["type"] == "requeue"]
    assert len(requeues) == 1 and requeues[0]["attempt"] == 1 and "died" in requeues[0]["cause"]
    before = events[:events.index(requeues[0])]
    given = [e["stem"] for e in before if e["type"] == "dispatch" and e["worker"] == killed["worker"]]
    assert requeues[0]["stem"] == given[-1]
    assert not [e for e in events if e["type"] == "retry"]
    assert killed["pid"] not in [e["pid"] for e in events if e["type"] == "worker_ready" and e["worker"] == "w3"]
    check_exactly_once(tmp_path / "out", 3, keys)
    # The killed attempt's videos were taken back: the totals count every video once.
    assert "videos 9/9 (0 failed); 36 frames" in last_status_line(tmp_path / "out")
    assert f"shard {requeues[0]['stem']}: its worker failed" in (tmp_path / "out" / "run.log").read_text()


def test_a_shard_that_keeps_raising_fails_after_its_retries_and_a_rerun_finishes(ray_cluster, tmp_path, clips):
    write_shard(tmp_path / "in" / "p0.tar", [video_sample("s0v0", clips["pattern"])])
    (tmp_path / "in" / "p1.tar").write_bytes(b"this is not a tar file" * 100)
    inputs = str(tmp_path / "in" / "p{0..1}.tar")
    out = tmp_path / "out"
    events: list[dict] = []
    code, text = run_here(inputs, out, [*RAY, "runtime.max_shard_retries=1"], events)
    assert code == 1
    assert "rerun the same command to continue" in text and "shard p1 failed" in text
    assert [(e["stem"], e["attempt"]) for e in events if e["type"] == "retry"] == [("p1", 1)]
    assert [e["stem"] for e in events if e["type"] == "shard_failed"] == ["p1"]
    assert not [e for e in events if e["type"] == "worker_replaced"]  # an exception does not cost the worker
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"]["failed"] == 1 and "after 2 attempts" in summary["shards"]["failed_shards"]["p1"]
    assert not (out / "shards" / "p1.tar").exists() and not (out / "stats" / "p1.json").exists()
    done_p0 = (out / "stats" / "p0.json").read_text()

    write_shard(tmp_path / "in" / "p1.tar", [video_sample("s1v0", clips["cells"])])
    events.clear()
    code, text = run_here(inputs, out, RAY, events)
    assert code == 0, text
    assert [e["stem"] for e in events if e["type"] == "dispatch"] == ["p1"]  # only the unfinished shard
    assert (out / "stats" / "p0.json").read_text() == done_p0
    check_exactly_once(out, 2, ["s0v0", "s1v0"])


def test_a_bad_worker_and_a_hung_one_cannot_fail_the_run_while_a_healthy_worker_exists(
        ray_cluster, tmp_path, clips, monkeypatch):
    """w1 and its replacement w3 raise a simulated CUDA error at every shard (a bad GPU), w2 hangs (a wedged
    read). With no shard retries at all, every shard still finishes on the healthy w4: infrastructure
    failures retire workers and do not spend the shards' retries; w1's place is quarantined after two."""
    inputs, keys = make_inputs(tmp_path / "in", clips["pattern"], shards=4, videos=1)
    monkeypatch.setenv("VIDBATCH_TEST_FAIL_WORKERS", "w1,w3")
    monkeypatch.setenv("VIDBATCH_TEST_HANG_WORKERS", "w2")
    events: list[dict] = []
    sets = [*RAY, "runtime.max_shard_retries=0", "runtime.quarantine_after=2", "runtime.stall_timeout_s=10"]
    code, text = run_here(inputs, tmp_path / "out", sets, events)
    assert code == 0, text
    check_exactly_once(tmp_path / "out", 4, keys)
    replaced = {e["worker"]: e for e in events if e["type"] == "worker_replaced"}
    assert {w: e["by"] for w, e in replaced.items()} == {"w1": "w3", "w2": "w4"}
    assert "CUDA error" in replaced["w1"]["cause"] and "no progress for" in replaced["w2"]["cause"]
    quarantined = [e for e in events if e["type"] == "worker_quarantined"]
    assert [e["worker"] for e in quarantined] == ["w3"] and "CUDA error" in quarantined[0]["cause"]
    # w2 is warned about once, at half its timeout, before it is replaced. w4 is healthy but may be quiet for over
    # 5 s between two progress events on this loaded 2-core machine: a warning about it is the monitor doing its
    # job (it was seen in a CI run); its replacement would be the bug, and the replacements are checked above.
    stalled = [e["worker"] for e in events if e["type"] == "stall_warning"]
    assert stalled.count("w2") == 1 and set(stalled) <= {"w2", "w4"}, stalled
    assert not [e for e in events if e["type"] in ("retry", "shard_failed")]
    requeued = [e["stem"] for e in events if e["type"] == "requeue"]
    assert len(requeued) == 3  # w1's, w3's and w2's shard, each given out again for free
    done_by = {e["stem"]: e["worker"] for e in events if e["type"] == "shard_done"}
    assert sorted(done_by) == ["p0", "p1", "p2", "p3"] and set(done_by.values()) == {"w4"}
    log = (tmp_path / "out" / "run.log").read_text()
    assert "w3 (pid" in log and "quarantined after 2 infrastructure failure(s)" in log
    assert "videos 4/4 (0 failed); 16 frames" in last_status_line(tmp_path / "out")
    # Per-worker throughput and peak memory of the live worker in the status lines.
    assert re.search(r"\(w4 \d+\.\d\d frames/s \d+ MB\)", last_status_line(tmp_path / "out"))
    # The workers' ray.util.metrics reach Ray's Prometheus endpoint.
    done = 0.0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not done:
        text = urllib.request.urlopen(f"http://127.0.0.1:{RAY_METRICS_PORT[0]}/metrics", timeout=10).read().decode()
        done = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("ray_vidbatch_samples_done") and 'worker="w4"' in line)
        time.sleep(1)
    assert done >= 1, [l for l in text.splitlines() if "vidbatch" in l][:20]


def test_a_killed_progress_relay_is_reported_once_and_restarted(ray_cluster, tmp_path, clips):
    inputs, keys = make_inputs(tmp_path / "in", clips["pattern"], shards=3, videos=2)
    events: list[dict] = []
    killed: list[int] = []

    def kill_relay(event: dict) -> None:  # as soon as it first answered, before the workers are up
        if event["type"] == "relay_ready" and not killed:
            relay = psutil.Process(event["pid"])
            assert "EventRelay" in " ".join(relay.cmdline())
            relay.kill()
            killed.append(event["pid"])

    code, text = run_here(inputs, tmp_path / "out", [*RAY, "runtime.stall_timeout_s=60"], events, kill_relay)
    assert code == 0, text
    check_exactly_once(tmp_path / "out", 3, keys)
    log = (tmp_path / "out" / "run.log").read_text()
    assert log.count("progress relay lost") == 1 and "progress relay is back" in log
    assert len([e for e in events if e["type"] == "relay_lost"]) == 1
    assert f"its process {killed[0]} ended; restarted as" in log  # Ray brought it back, the driver noticed
    assert [e["pid"] for e in events if e["type"] == "relay_ready"][0] == killed[0]
    assert "videos 6/6 (0 failed); 24 frames" in last_status_line(tmp_path / "out")  # the markers fix the totals


def test_a_shard_taken_over_mid_shard_is_not_published_by_the_worker_nor_failed(ray_cluster, tmp_path, clips):
    """While a worker edits p0, another driver (on another machine) takes p0's lease over. The worker's
    commit fence finds the lease gone: nothing of p0 is published, its temporaries are removed, and the
    attempt is a lost lease (no retry, no failed shard, no replaced worker); p1 is committed normally. The
    run leaves p0 to its holder and does not finalise; when that driver dies, a rerun finishes p0."""
    inputs, keys = make_inputs(tmp_path / "in", clips["pattern"], shards=2, videos=3)
    out = tmp_path / "out"
    events: list[dict] = []
    taken: list[str] = []

    def take_over(event: dict) -> None:
        if event["type"] == "video" and event["stem"] == "p0" and not taken:
            (out / "leases" / "p0.json").write_text(json.dumps(
                {"stem": "p0", "owner": "node7-4242-abcdef12", "attempt": 0, "host": "node7", "pid": 4242,
                 "expires": time.time() + 600}))
            taken.append(event["worker"])

    code, text = run_here(inputs, out, RAY, events, take_over)
    assert code == 0, text
    assert taken
    lost = [e for e in events if e["type"] == "lease_lost"]
    assert [(e["stem"], e["worker"]) for e in lost] == [("p0", taken[0])]
    assert "driver node7-4242-abcdef12 holds it now" in lost[0]["cause"]
    assert not [e for e in events if e["type"] in ("retry", "requeue", "shard_failed", "worker_replaced")]
    assert [e["stem"] for e in events if e["type"] == "shard_done"] == ["p1"]
    assert not (out / "shards" / "p0.tar").exists() and not (out / "stats" / "p0.json").exists()
    assert not (out / "stats" / "p0.jsonl").exists() and not list(out.rglob("*.tmp"))
    assert not (out / "summary.json").exists() and "still being processed by other drivers" in text
    assert json.loads((out / "leases" / "p0.json").read_text())["owner"] == "node7-4242-abcdef12"

    (out / "leases" / "p0.json").write_text(json.dumps(   # that driver died: its lease expires
        {"stem": "p0", "owner": "node7-4242-abcdef12", "attempt": 0, "host": "node7", "pid": 4242,
         "expires": time.time() - 1}))
    code, text = run_here(inputs, out, RAY)
    assert code == 0, text
    check_exactly_once(out, 2, keys)
