"""The Ray backend on a real two-node Ray cluster, both nodes on this host (`ray.cluster_utils.Cluster`:
a head and a second raylet, each a separate Ray node with its own processes and resources).

Each node offers one CPU and a worker takes one, so the two workers must land on different nodes. The
driver runs in this process. The tests run in file order: the last one kills the second node.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from conftest import FAST, TINY, check_exactly_once, make_inputs

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from vidbatch.api import run  # noqa: E402
from vidbatch.config.schema import load_config  # noqa: E402
from vidbatch.dispatch.progress import setup_logging  # noqa: E402

RAY = [*FAST, "runtime.backend=ray", "runtime.workers=2", "runtime.cpus_per_worker=1", "video.max_frames=4",
       "inversion.cache=false", "metrics.clip_model=none"]
HEAD, SECOND = "vb-head", "vb-node2"


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and a second node, one CPU each, named HEAD and SECOND; yields (cluster, {name: node id})."""
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, include_dashboard=False, node_name=HEAD))
    try:
        second = cluster.add_node(num_cpus=1, node_name=SECOND)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        ids = {n["NodeName"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert set(ids) == {HEAD, SECOND}
        yield cluster, second, ids
    finally:
        ray.shutdown()
        cluster.shutdown()


def run_here(inputs: str, out: Path, events: list, on_event=None) -> tuple[int, str]:
    text = io.StringIO()
    console = Console(file=text, width=200)
    setup_logging(out / "run.log", console)

    def record(event: dict) -> None:
        events.append(event)
        if on_event is not None:
            on_event(event)

    code = run(load_config(TINY, RAY), [inputs], out, console=console, on_event=record)
    return code, text.getvalue()


def node_check(address: str, *names: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "vidbatch.tools.ray_nodes", "--address", address, "--timeout", "3",
                           *names], env=env, capture_output=True, text=True, timeout=120)


def test_workers_run_shards_on_both_nodes(two_nodes, tmp_path, clips):
    _, _, ids = two_nodes
    inputs, keys = make_inputs(tmp_path / "in", clips["pattern"], shards=4, videos=2)
    events: list[dict] = []
    code, text = run_here(inputs, tmp_path / "out", events)
    assert code == 0, text
    check_exactly_once(tmp_path / "out", 4, keys)
    node_of = {e["worker"]: e["node_id"] for e in events if e["type"] == "worker_ready"}
    assert sorted(node_of.values()) == sorted(ids.values())   # one worker on each node
    done_on = {e["stem"]: node_of[e["worker"]] for e in events if e["type"] == "shard_done"}
    assert sorted(done_on) == ["p0", "p1", "p2", "p3"]
    assert set(done_on.values()) == set(ids.values()), done_on   # shards ran on both nodes
    assert not [e for e in events if e["type"] in ("retry", "requeue", "worker_replaced", "lease_lost")]


def test_node_check_counts_the_nodes_of_one_host_and_names_the_missing_one(two_nodes):
    cluster, _, _ = two_nodes
    both = node_check(cluster.address, HEAD, SECOND)
    assert both.returncode == 0 and f"all 2 Ray node(s) joined: {HEAD}, {SECOND}" in both.stdout, both.stderr[-2000:]
    host = ray.nodes()[0]["NodeManagerHostname"]
    assert node_check(cluster.address, host, host).returncode == 0    # two nodes on this host
    three = node_check(cluster.address, host, host, host)              # a third was expected: missing
    assert three.returncode == 1 and f"Ray nodes missing after 3s: {host} (of 3)" in three.stderr
    missing = node_check(cluster.address, HEAD, SECOND, "vb-node3")
    assert missing.returncode == 1 and "Ray nodes missing after 3s: vb-node3 (of 3)" in missing.stderr


def test_a_node_killed_mid_run_costs_its_worker_not_the_shards(two_nodes, tmp_path, clips):
    """The second node is killed (raylet and all) while its worker edits a shard: the run finishes on the
    head's worker, exit 0, every sample once; the lost node is its worker's failure (replaced, the shard
    requeued for free), not the shard's. The node check then names the lost node."""
    cluster, second, ids = two_nodes
    inputs, keys = make_inputs(tmp_path / "in", clips["pattern"], shards=3, videos=3)
    events: list[dict] = []
    killed: list[str] = []
    node_of: dict[str, str] = {}

    def kill_second_node(event: dict) -> None:
        if event["type"] == "worker_ready":
            node_of[event["worker"]] = event["node_id"]
        if event["type"] == "video" and node_of.get(event["worker"]) == ids[SECOND] and not killed:
            killed.append(event["worker"])
            cluster.remove_node(second, allow_graceful=False)

    code, text = run_here(inputs, tmp_path / "out", events, kill_second_node)
    assert code == 0, text
    assert killed, "the second node's worker never reported a video"
    check_exactly_once(tmp_path / "out", 3, keys)
    replaced = [e for e in events if e["type"] == "worker_replaced"]
    assert [e["worker"] for e in replaced] == killed and "died" in replaced[0]["cause"]
    requeued = [e for e in events if e["type"] == "requeue"]
    assert len(requeued) == 1 and "died" in requeued[0]["cause"]
    assert not [e for e in events if e["type"] in ("retry", "shard_failed", "relay_lost")]
    done_on = {node_of[e["worker"]] for e in events if e["type"] == "shard_done"}
    assert ids[HEAD] in done_on
    assert requeued[0]["stem"] in {e["stem"] for e in events if e["type"] == "shard_done"
                                   and node_of[e["worker"]] == ids[HEAD]}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["shards"]["done"] == 3 and summary["shards"]["failed"] == 0

    # The GCS marks a killed node dead only after its health checks fail: on a loaded machine that can
    # take longer than the run itself, so wait for it (a minute at most) before asking the node check.
    deadline = time.monotonic() + 60
    while any(n["NodeID"] == ids[SECOND] and n["Alive"] for n in ray.nodes()) and time.monotonic() < deadline:
        time.sleep(1)
    lost = node_check(cluster.address, HEAD, SECOND)
    assert lost.returncode == 1 and f"Ray nodes missing after 3s: {SECOND} (of 2)" in lost.stderr
