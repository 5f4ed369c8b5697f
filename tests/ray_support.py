"""What the Ray test modules share: one real local Ray cluster per module, and the job run in this process
as the driver (so a test sees the driver's events and can kill a worker by pid at a chosen moment)."""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import pytest
import ray
from rich.console import Console

from conftest import FAST, TINY
from vidbatch.api import run
from vidbatch.config.schema import load_config
from vidbatch.dispatch.progress import setup_logging

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
    RAY_METRICS_PORT[:] = [context.address_info["metrics_export_port"]]
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
