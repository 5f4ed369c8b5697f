"""The worker side of the Ray backend: the `ShardWorker` actor, its event relay and its metrics.

A `ShardWorker` loads the model once and runs `batch.shard.process_shard` shard after shard. It sends
the driver events through the `EventRelay` mailbox actor (it never draws progress itself): `start` when
a shard starts, `video` per finished video (frames, seconds, peak memory), `beat` while the UNet makes
progress (at most every `BEAT_S`, the driver's liveness signal), and its log records. It also counts
samples and seconds per frame as `ray.util.metrics` metrics, which Ray exports to its dashboard and
Prometheus endpoint (`vidbatch_samples_done`, `vidbatch_samples_failed`, `vidbatch_frames_done`,
`vidbatch_seconds_per_frame`).

Test-only fault hooks, read from the environment of the worker (the driver forwards every
`VIDBATCH_TEST_*` variable); unset, as in every real run, they do nothing:
- `VIDBATCH_TEST_FAIL_WORKERS=w1,w3`: these workers raise a simulated CUDA error at every shard (a bad GPU);
- `VIDBATCH_TEST_HANG_WORKERS=w2`: these workers hang at every shard without progress (a wedged read).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from vidbatch.batch.module import VideoEditModule, peak_memory_mb
from vidbatch.batch.shard import process_shard
from vidbatch.config.schema import Config
from vidbatch.core.errors import ConfigError
from vidbatch.core.rows import DoneMarker
from vidbatch.dispatch.leases import lease_fence
from vidbatch.dispatch.logs import demote_third_party_logs
from vidbatch.io.input_shards import SampleRange

# Seconds between two liveness beats of a busy worker (beats are throttled, not timed).
BEAT_S = 2.0
TEST_FAIL_ENV = "VIDBATCH_TEST_FAIL_WORKERS"
TEST_HANG_ENV = "VIDBATCH_TEST_HANG_WORKERS"
# Seconds per frame: buckets of the histogram (a tiny model on a CPU to SD on a slow GPU).
SECONDS_PER_FRAME_BUCKETS = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]


class EventRelay:
    """A mailbox actor: workers `push` events without waiting, the driver `drain`s them every poll."""

    def __init__(self) -> None:
        self._events: list[dict] = []

    def push(self, event: dict) -> None:
        self._events.append(event)

    def drain(self) -> tuple[int, list[dict]]:
        """(this relay's pid, the events since the last drain): a new pid means Ray restarted the relay."""
        events, self._events = self._events, []
        return os.getpid(), events


class _RelayLogHandler(logging.Handler):
    """Sends a worker's `vidbatch` log records to the driver, which writes them to run.log."""

    def __init__(self, send: Callable[[dict], None]):
        super().__init__(level=logging.DEBUG)
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self.send({"type": "log", "level": record.levelno, "message": message})
        except Exception:  # logging must never break a shard
            self.handleError(record)


class _WorkerMetrics:
    """The worker's `ray.util.metrics`: samples done and failed, frames, seconds per frame."""

    def __init__(self, worker: str):
        from ray.util.metrics import Counter, Histogram

        tags = ("worker",)
        self.done = Counter("vidbatch_samples_done", description="videos edited (every edit ok)", tag_keys=tags)
        self.failed = Counter("vidbatch_samples_failed", description="videos with a failed edit", tag_keys=tags)
        self.frames = Counter("vidbatch_frames_done", description="edited frames", tag_keys=tags)
        self.seconds_per_frame = Histogram("vidbatch_seconds_per_frame", description="wall seconds per edited frame",
                                           boundaries=SECONDS_PER_FRAME_BUCKETS, tag_keys=tags)
        for metric in (self.done, self.failed, self.frames, self.seconds_per_frame):
            metric.set_default_tags({"worker": worker})

    def video(self, frames: int, ok: bool, seconds: float) -> None:
        (self.done if ok else self.failed).inc()
        if frames:
            self.frames.inc(frames)
            self.seconds_per_frame.observe(seconds / frames)


class _ShardEvents:
    """The `VideoSink` a worker hands to `process_shard`: one event per finished video, and the current
    video's step at most once a second (progress inside a long video)."""

    STEP_EVERY_S = 1.0

    def __init__(self, worker: "ShardWorker", stem: str, attempt: int):
        self.worker, self.stem, self.attempt = worker, stem, attempt
        self._last = time.monotonic()
        self._last_step = 0.0

    def video_step(self, key: str, stage: str, done: int, total: int) -> None:
        self.worker.beat()   # every model step: this worker makes progress
        now = time.monotonic()
        if now - self._last_step >= self.STEP_EVERY_S or done == total:
            self._last_step = now
            self.worker.send({"type": "step", "key": key, "stage": stage, "done": done, "total": total})

    def video_done(self, frames: int, ok: bool) -> None:
        now = time.monotonic()
        seconds, self._last = now - self._last, now
        memory = peak_memory_mb(self.worker.module.target_device)
        self.worker.metrics.video(frames, ok, seconds)
        self.worker.send({"type": "video", "stem": self.stem, "attempt": self.attempt, "frames": frames, "ok": ok,
                          "seconds": round(seconds, 3), "memory_mb": round(memory, 1)})


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _named_in(variable: str, name: str) -> bool:
    """Test-only hooks: is this worker's name in the comma-separated `variable`?"""
    return name in os.environ.get(variable, "").split(",")


class ShardWorker:
    """A Ray actor holding one loaded `VideoEditModule`; `process` runs one shard and returns its marker."""

    def __init__(self, config: Config, out_dir: str, relay: Any, name: str, use_gpu: bool, threads: int,
                 driver_cwd: str):
        # Relative paths (inputs, pipe: commands, models, LoRAs, caches) mean what they mean to the driver
        # wherever its folder exists here too; elsewhere (a `ray job` working_dir copy) the worker's own.
        if Path(driver_cwd).is_dir():
            os.chdir(driver_cwd)
        self.config = config
        self.out_dir = Path(out_dir)
        self.relay = relay
        self.name = name
        self.device = "cuda" if use_gpu else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        self.module: VideoEditModule | None = None
        self.metrics = _WorkerMetrics(name)
        self._last_beat = 0.0
        if not use_gpu:
            import torch

            torch.set_num_threads(threads)
        logger = logging.getLogger("vidbatch")
        logger.handlers[:] = [_RelayLogHandler(self.send)]
        logger.setLevel(logging.DEBUG)
        demote_third_party_logs()  # Lightning's banners, transformers' warnings: to run.log only, at DEBUG
        logger.propagate = False

    def send(self, event: dict) -> None:
        event.update(worker=self.name, pid=os.getpid())
        try:
            self.relay.push.remote(event)
        except Exception:  # progress is best effort: the outputs and markers are the truth
            pass

    def beat(self) -> None:
        """Called after every model step (through `_ShardEvents.video_step`): tells the driver this worker
        makes progress, every BEAT_S at most."""
        now = time.monotonic()
        if now - self._last_beat >= BEAT_S:
            self._last_beat = now
            self.send({"type": "beat"})

    def setup(self, config_sha: str) -> dict:
        """Checks that the output folder is the driver's (shared filesystem) and loads the model once."""
        import ray

        saved = self.out_dir / "config.yaml"
        if not saved.is_file() or file_sha256(saved) != config_sha:
            raise ConfigError(f"the output folder {self.out_dir} is not the driver's on node {socket.gethostname()} "
                              "(its config.yaml is missing or differs): with several nodes the output folder must "
                              "be on a filesystem every node shares")
        # Lightning's per-trainer banners ("GPU available: ...") would reach the driver once per shard per
        # worker; it sets its logger's level when imported, so this comes after the import.
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        self.module = VideoEditModule(self.config, device=self.device)
        context = ray.get_runtime_context()
        gpus = context.get_accelerator_ids().get("GPU", [])
        return {"worker": self.name, "pid": os.getpid(), "node": socket.gethostname(),
                "node_id": context.get_node_id(), "gpus": [str(g) for g in gpus],
                "device": str(self.module.target_device)}

    def process(self, url: str, stem: str, attempt: int, retry_failed: bool = False,
                lease_owner: str | None = None, sample_range: SampleRange | None = None) -> DoneMarker:
        """Runs one shard (one work item: `sample_range` of the shard, None for all of it); with `lease_owner`
        (the driver's run id) its commit is fenced by the shard's lease: published only if the lease still
        names that driver and this `attempt` (`lease_fence`)."""
        self._last_beat = time.monotonic()
        self.send({"type": "start", "stem": stem, "attempt": attempt})
        if _named_in(TEST_FAIL_ENV, self.name):
            raise RuntimeError(f"CUDA error: an illegal memory access was encountered "
                                      f"(simulated for worker {self.name} by {TEST_FAIL_ENV})")
        if _named_in(TEST_HANG_ENV, self.name):
            threading.Event().wait()  # no progress, ever: the driver's stall timeout must end this worker
        fence = lease_fence(self.out_dir, stem, lease_owner, attempt) if lease_owner is not None else None
        return process_shard(self.module, url, stem, self.out_dir, _ShardEvents(self, stem, attempt), retry_failed,
                             fence, sample_range)
