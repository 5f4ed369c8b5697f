"""The Ray backend against a real local Ray cluster with two CPU workers: dispatch, the driver, the cluster.

One cluster (`ray.init(num_cpus=2)`, tests/ray_support.py) serves the module; the driver runs in this process
or as a `vidbatch run` subprocess (to kill the driver itself, or the embedded cluster's node). Every run
checks the output contract: each input sample exactly once, complete shards with done markers, no
temporary file left. Faults of the workers are in tests/test_ray_worker_faults.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import TINY, check_exactly_once, make_inputs, read_output

ray = pytest.importorskip("ray")

from ray_support import RAY, last_status_line, ray_cluster, run_here  # noqa: E402,F401 (ray_cluster: a fixture)
from vidbatch.config.schema import load_config  # noqa: E402
from vidbatch.core.errors import ConfigError, ModelLoadError  # noqa: E402
from vidbatch.dispatch.ray_backend import WorkerPlan, plan_workers  # noqa: E402


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
