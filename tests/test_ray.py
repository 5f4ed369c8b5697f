"""The Ray backend against a real local Ray cluster with two CPU workers: dispatch, faults, resume.

One cluster (`ray.init(num_cpus=2)`) serves the module; the driver runs in this process (so a test sees
the driver's events and can kill a worker by pid at a chosen moment) or as a `vidbatch run` subprocess
(to kill the driver itself). Every test checks the output contract: each input sample exactly once,
complete shards with done markers, no temporary file left.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from conftest import FAST, TINY, check_exactly_once, make_inputs, read_output, video_sample, write_shard

ray = pytest.importorskip("ray")

from vidbatch.config.schema import load_config  # noqa: E402
from vidbatch.dispatch.ray_backend import WorkerPlan, plan_workers  # noqa: E402
from vidbatch.core.errors import ConfigError, ModelLoadError  # noqa: E402
from vidbatch.dispatch.progress import setup_logging  # noqa: E402
from vidbatch.api import run  # noqa: E402

# Two CPU workers; 4 frames a video keeps a shard at a few seconds on a slow CI machine. No inversion
# cache: a cache hit would make a shard too quick to be killed in the middle.
RAY_METRICS_PORT: list[int] = []  # the module cluster's Prometheus endpoint (set by the fixture)
RAY = [*FAST, "runtime.backend=ray", "runtime.workers=2", "video.max_frames=4", "inversion.cache=false"]


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs, shut down after the module; yields its address."""
    temp = tempfile.mkdtemp(prefix="vbray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # Metrics reported every second (Ray's default is 10 s) so a short test run reaches the exporter.
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp,
                       log_to_driver=False, _system_config={"metrics_report_interval_ms": 1000})
    RAY_METRICS_PORT.append(context.address_info["metrics_export_port"])
    yield context.address_info["address"]
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def run_here(inputs: str, out: Path, sets: list[str], events: list | None = None, on_event=None) -> tuple[int, str]:
    """Runs the job with this process as the driver; returns the exit code and the console text."""
    text = io.StringIO()
    console = Console(file=text, width=200)
    setup_logging(out / "run.log", console)

    def record(event: dict) -> None:
        if events is not None:
            events.append(event)
        if on_event is not None:
            on_event(event)

    code = run(load_config(TINY, sets), [inputs], out, console=console, on_event=record)
    return code, text.getvalue()


def last_status_line(out: Path) -> str:
    return [l for l in (out / "run.log").read_text().splitlines() if "progress: shards" in l][-1]


def test_plan_workers_one_per_gpu_or_the_configured_cpu_workers():
    runtime = load_config(None, ["runtime.device=auto"]).runtime
    assert plan_workers(runtime, cluster_gpus=4, shards=100) == WorkerPlan(count=4, use_gpu=True, cpus=1)
    assert plan_workers(runtime, cluster_gpus=4, shards=2).count == 2  # never more workers than shards
    assert plan_workers(runtime, cluster_gpus=0, shards=100) == WorkerPlan(count=1, use_gpu=False, cpus=1)
    cpu = load_config(None, ["runtime.workers=3", "runtime.cpus_per_worker=2", "runtime.device=cpu"]).runtime
    assert plan_workers(cpu, cluster_gpus=8, shards=100) == WorkerPlan(count=3, use_gpu=False, cpus=2)
    with pytest.raises(ConfigError, match="no GPU"):
        plan_workers(load_config(None, ["runtime.device=cuda"]).runtime, cluster_gpus=0, shards=5)


def test_ray_is_the_default_backend_and_tiny_stays_local():
    assert load_config(None).runtime.backend == "ray"
    assert load_config(TINY).runtime.backend == "local"


def test_every_sample_exactly_once_with_two_workers(ray_cluster, tmp_path, clips, monkeypatch):
    _, keys = make_inputs(tmp_path / "in", clips["pattern"], shards=4, videos=2)
    events: list[dict] = []
    monkeypatch.chdir(tmp_path)  # relative paths: the workers resolve them as the driver does
    code, text = run_here("in/p{0..3}.tar", Path("out"), RAY, events)
    assert code == 0, text
    check_exactly_once(tmp_path / "out", 4, keys)
    ready = [e for e in events if e["type"] == "worker_ready"]
    assert len(ready) == 2 and {e["device"] for e in ready} == {"cpu"} and len({e["pid"] for e in ready}) == 2
    dispatched = [e["stem"] for e in events if e["type"] == "dispatch"]
    assert sorted(dispatched) == ["p0", "p1", "p2", "p3"]  # each shard given out once: no retry, no split
    assert not [e for e in events if e["type"] in ("retry", "worker_replaced", "shard_failed")]
    videos = [e for e in events if e["type"] == "video"]
    assert sorted((e["stem"], e["frames"]) for e in videos) == sorted((f"p{i}", 4) for i in range(4) for _ in range(2))
    assert "videos 8/8 (0 failed); 32 frames" in last_status_line(tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["shards"]["done"] == 4 and summary["samples"] == {"total": 8, "ok": 8, "failed": 0}


def test_work_items_of_one_shard_are_dispatched_apart(ray_cluster, tmp_path, clips, monkeypatch):
    """runtime.samples_per_task=1: one shard of 3 samples is 3 work items, dispatched apart, each sample
    edited once into its item's output shard."""
    _, keys = make_inputs(tmp_path / "in", clips["pattern"], shards=1, videos=3)
    events: list[dict] = []
    monkeypatch.chdir(tmp_path)
    code, text = run_here("in/p0.tar", Path("out"), [*RAY, "runtime.samples_per_task=1"], events)
    assert code == 0, text
    stems = ["p0-00000", "p0-00001", "p0-00002"]
    assert sorted(e["stem"] for e in events if e["type"] == "dispatch") == stems
    assert [list(read_output(tmp_path / "out" / "shards" / f"{s}.tar")) for s in stems] == [[k] for k in keys]


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


def test_a_model_error_in_the_workers_is_a_user_error_not_retried(ray_cluster, tmp_path, clips):
    # A folder that exists passes the driver's check; that it is no diffusers folder is found in the workers.
    inputs, _ = make_inputs(tmp_path / "in", clips["pattern"], shards=1, videos=1)
    (tmp_path / "nomodel").mkdir()
    with pytest.raises(ModelLoadError, match="nomodel") as raised:
        run_here(inputs, tmp_path / "out", [*RAY, f"model.id={tmp_path / 'nomodel'}"])
    assert "model_index.json" in str(raised.value) and "Traceback" not in str(raised.value)
    assert not (tmp_path / "out" / "shards").exists() or not list((tmp_path / "out" / "shards").iterdir())


def test_a_killed_driver_leaves_finished_shards_and_a_rerun_completes_the_rest(ray_cluster, tmp_path, clips):
    inputs, keys = make_inputs(tmp_path / "in", clips["pattern"], shards=4, videos=2)
    out = tmp_path / "out"
    sets = sum((["--set", s] for s in RAY), [])
    command = [sys.executable, "-m", "vidbatch.cli", "run", str(TINY), "--input", inputs, "--output", str(out), *sets]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # First run joins this module's cluster by address; SIGKILL it once a shard is done.
    driver = subprocess.Popen([*command, "--set", f"runtime.ray_address={ray_cluster}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(out.glob("stats/p*.json")) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(out.glob("stats/p*.json")), "no shard finished"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # Ray ends the dead driver's workers: the cluster's two CPUs come free again.
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2
    done_before = {p.name: p.read_text() for p in out.glob("stats/p*.json")}
    assert len(done_before) < 4, "the driver finished before it could be killed"
    for tar in out.glob("shards/*.tar"):  # every visible shard is complete: done marker present
        assert (out / "stats" / f"{tar.stem}.json").exists()

    # The rerun is the plain default: no address, so an embedded local cluster of its own.
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert f"{len(done_before)} shard(s) already done" in rerun.stdout
    for name, text in done_before.items():
        assert (out / "stats" / name).read_text() == text
    check_exactly_once(out, 4, keys)
    assert "embedded local Ray cluster" in (out / "run.log").read_text()


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
    assert [e["worker"] for e in events if e["type"] == "stall_warning"] == ["w2"]
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


def test_a_lost_ray_node_ends_the_run_within_a_minute_as_an_infrastructure_failure(tmp_path, clips):
    """The embedded cluster's raylet is killed mid-run (its node is gone, workers with it): the driver says
    so and exits 1 (rerun to resume) quickly, instead of waiting out the worker start timeout. The workers
    hang (test hook), so the run is surely in flight when the node goes."""
    inputs, _ = make_inputs(tmp_path / "in", clips["pattern"], shards=3, videos=2)
    out = tmp_path / "out"
    sets = sum((["--set", s] for s in [*RAY, "runtime.stall_timeout_s=600"]), [])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["VIDBATCH_TEST_HANG_WORKERS"] = "w1,w2"
    driver = subprocess.Popen([sys.executable, "-m", "vidbatch.cli", "run", str(TINY), "--input", inputs,
                               "--output", str(out), *sets], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while driver.poll() is None and time.monotonic() < deadline:
        if (out / "run.log").exists() and " started on w" in (out / "run.log").read_text():
            break
        time.sleep(0.2)
    raylets = [p for p in psutil.Process(driver.pid).children(recursive=True) if p.name() == "raylet"]
    assert len(raylets) == 1, "no embedded raylet found"
    raylets[0].kill()
    killed = time.monotonic()
    output, _ = driver.communicate(timeout=180)
    took = time.monotonic() - killed
    assert driver.returncode == 1, output[-3000:]
    assert "the Ray cluster was lost: rerun to resume" in output
    assert took < 60, f"the driver took {took:.0f}s to notice"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"]["failed"] == 3 and summary["shards"]["done"] == 0
    assert "config error" not in output


def test_node_check_waits_for_named_nodes_and_names_the_missing_ones(ray_cluster):
    """What the SLURM Ray script runs before the driver: every node of the allocation must have joined."""
    here = socket.gethostname()
    command = [sys.executable, "-m", "vidbatch.tools.ray_nodes", "--address", ray_cluster, "--timeout", "3"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    joined = subprocess.run([*command, here], env=env, capture_output=True, text=True, timeout=120)
    assert joined.returncode == 0 and f"all 1 Ray node(s) joined: {here}" in joined.stdout, joined.stderr[-2000:]
    missing = subprocess.run([*command, here, "node-that-never-came"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 1
    assert "Ray nodes missing after 3s: node-that-never-came (of 2)" in missing.stderr


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
