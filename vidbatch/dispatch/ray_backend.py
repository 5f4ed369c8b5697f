"""The `ray` backend: one long-lived worker per GPU, shards handed out one at a time, lost work redone.

The driver (the `vidbatch run` process) joins a Ray cluster (`runtime.ray_address`, `$RAY_ADDRESS`) or
starts an embedded local one, then starts `ShardWorker` actors: one per GPU (`num_gpus=1`), or
`runtime.workers` CPU workers. Each loads the model once and runs `batch.shard.process_shard` (the
Lightning predict loop) shard after shard.

Dispatch is dynamic: the driver keeps exactly one shard in flight per ready worker and gives the next
shard to whichever worker finishes first, so fast and slow GPUs (or short and long shards) even out.

Faults: a worker whose process dies (killed, out of memory, node lost) surfaces as a `RayActorError`
on its shard's future; the driver starts a replacement actor and gives the shard out again. An
exception inside a shard is retried the same way (the worker is kept). A shard that failed
`runtime.max_shard_retries` + 1 attempts is reported failed and the run exits 1; a rerun continues.

Exactly once: every attempt writes its own temporaries and the output of a shard becomes visible only
by renames of complete files, the done marker last (shard_io.py). A retried shard rewrites its output
from scratch; an attempt the driver gave up on (a worker that is not quite dead yet) can only ever
rename a complete, equivalent shard. Two attempts racing: the later one's `remove_stale_temporaries`
may delete the earlier one's temporaries; the earlier attempt then fails at its rename and nobody
waits for it; no data is lost, and if it was the live attempt it is simply retried.

Progress: workers send per-video events (and their log records) to a small `EventRelay` actor; the
driver drains it every poll and draws with `RunProgress`. Workers never draw. The counts of an attempt
that is redone are taken back, and a finished shard's counts are set from its done marker, so the
totals are exact whatever is killed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console

from vidbatch.config.schema import Config, RuntimeConfig
from vidbatch.core.rows import DoneMarker
from vidbatch.core.errors import ConfigError, VidbatchError
from vidbatch.batch.module import VideoEditModule
from vidbatch.batch.shard import process_shard
from vidbatch.core.signals import STOP_SIGNALS
from vidbatch.dispatch.estimate import known_video_total
from vidbatch.dispatch.logs import demote_third_party_logs, logs_set_up
from vidbatch.dispatch.plan import RunOutcome, prepare_run
from vidbatch.dispatch.progress import RunProgress

log = logging.getLogger("vidbatch")

# Seconds between polls of the futures and the event relay (bounds how late progress is drawn).
POLL_S = 0.25
# Environment a worker needs to find models offline like the driver does; forwarded when set.
FORWARDED_ENV = ("VIDBATCH_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers to start and what each reserves on the Ray cluster."""

    count: int
    use_gpu: bool
    cpus: int

    def describe(self) -> str:
        kind = "GPU" if self.use_gpu else "CPU"
        return f"{self.count} {kind} worker(s), each {'1 GPU and ' if self.use_gpu else ''}{self.cpus} CPU(s)"


def plan_workers(runtime: RuntimeConfig, cluster_gpus: float, shards: int) -> WorkerPlan:
    """Decides the workers from the config and the cluster: one per GPU, else `runtime.workers` CPU ones.

    Never more workers than shards to do: a worker that would get nothing would only load the model.
    """
    device = runtime.device
    if device == "auto":
        use_gpu = cluster_gpus >= 1
    elif device == "cpu":
        use_gpu = False
    elif device == "cuda" or device.startswith("cuda:"):
        use_gpu = True
    else:
        raise ConfigError(f"config key 'runtime.device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if use_gpu:
        count = runtime.workers or int(cluster_gpus)
        if count < 1:
            raise ConfigError("runtime.device is 'cuda' but the Ray cluster has no GPU; use runtime.device=cpu, or "
                              "set runtime.workers to the number of GPU workers to wait for (autoscaling clusters)")
    else:
        count = runtime.workers or 1
    return WorkerPlan(count=max(1, min(count, shards)), use_gpu=use_gpu, cpus=runtime.cpus_per_worker)


# ---------------------------------------------------------------------------------------------
# Worker side


class EventRelay:
    """A mailbox actor: workers `push` events without waiting, the driver `drain`s them every poll."""

    def __init__(self) -> None:
        self._events: list[dict] = []

    def push(self, event: dict) -> None:
        self._events.append(event)

    def drain(self) -> list[dict]:
        events, self._events = self._events, []
        return events


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


class _ShardEvents:
    """The `VideoSink` a worker hands to `process_shard`: one event per finished video, and the current
    video's step at most once a second."""

    STEP_EVERY_S = 1.0

    def __init__(self, send: Callable[[dict], None], stem: str, attempt: int):
        self.send, self.stem, self.attempt = send, stem, attempt
        self._last_step = 0.0

    def video_done(self, frames: int, ok: bool) -> None:
        self.send({"type": "video", "stem": self.stem, "attempt": self.attempt, "frames": frames, "ok": ok})

    def video_step(self, key: str, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last_step >= self.STEP_EVERY_S or done == total:
            self._last_step = now
            self.send({"type": "step", "key": key, "stage": stage, "done": done, "total": total})


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
        self.module = None
        if not use_gpu:
            import torch

            torch.set_num_threads(threads)
        logger = logging.getLogger("vidbatch")
        logger.handlers[:] = [_RelayLogHandler(self._send)]
        logger.setLevel(logging.DEBUG)
        demote_third_party_logs()  # Lightning's banners, transformers' warnings: to run.log only, at DEBUG
        logger.propagate = False

    def _send(self, event: dict) -> None:
        event.update(worker=self.name, pid=os.getpid())
        try:
            self.relay.push.remote(event)
        except Exception:  # progress is best effort: the outputs and markers are the truth
            pass

    def setup(self, config_sha: str) -> dict:
        """Checks that the output folder is the driver's (shared filesystem) and loads the model once."""
        saved = self.out_dir / "config.yaml"
        if not saved.is_file() or _sha256(saved) != config_sha:
            raise ConfigError(f"the output folder {self.out_dir} is not the driver's on node {socket.gethostname()} "
                              "(its config.yaml is missing or differs): with several nodes the output folder must "
                              "be on a filesystem every node shares")
        # Lightning's per-trainer banners ("GPU available: ...") would reach the driver once per shard per
        # worker; it sets its logger's level when imported, so this comes after the import.
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        self.module = VideoEditModule(self.config, device=self.device)
        return {"worker": self.name, "pid": os.getpid(), "node": socket.gethostname(),
                "device": str(self.module.target_device)}

    def process(self, url: str, stem: str, attempt: int) -> DoneMarker:
        self._send({"type": "start", "stem": stem, "attempt": attempt})
        return process_shard(self.module, url, stem, self.out_dir, _ShardEvents(self._send, stem, attempt))


# ---------------------------------------------------------------------------------------------
# Driver side


@dataclass
class _Slot:
    """One worker as the driver sees it."""

    name: str
    handle: Any
    ref: Any = None            # the future in flight: setup() while starting, process() while busy
    state: str = "starting"    # starting -> idle <-> busy; a dead worker's slot gets a new actor
    pid: int | None = None
    shard: int | None = None   # plan index of the shard in flight


@dataclass
class _ShardState:
    """Driver-side bookkeeping of one shard: its attempt and what that attempt reported."""

    attempt: int = 0
    videos: int = 0
    failed: int = 0
    frames: int = 0
    closed: bool = False       # done or failed for good: late events are ignored
    causes: list[str] = field(default_factory=list)


def _cause(exc: BaseException) -> str:
    """A one-line cause for a failed attempt (the worker-side exception, not Ray's wrapper)."""
    inner = getattr(exc, "cause", None)
    if isinstance(inner, BaseException):
        exc = inner
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _user_error(exc: BaseException) -> VidbatchError | None:
    """The VidbatchError (model, config) a worker's setup raised, unwrapped from Ray's exceptions."""
    for candidate in (getattr(exc, "cause", None), exc):  # the cause first: Ray's wrapper text is a traceback
        if isinstance(candidate, VidbatchError):
            return candidate
    return None


class Dispatcher:
    """The driver loop: starts workers, hands out shards one at a time, replaces dead workers, retries."""

    def __init__(self, config: Config, urls: Sequence[str], stems: Sequence[str], todo: Sequence[int],
                 out_dir: Path, workers: WorkerPlan, progress: RunProgress,
                 on_event: Callable[[dict], None] | None = None):
        import ray

        self.ray = ray
        self.config = config
        self.runtime = config.runtime
        self.urls, self.stems = list(urls), list(stems)
        self.out_dir = out_dir
        self.workers = workers
        self.progress = progress
        self.on_event = on_event
        self.queue: deque[int] = deque(todo)
        self.shards = {i: _ShardState() for i in todo}
        self.failed: dict[str, str] = {}
        self.slots: list[_Slot] = []
        self.started = 0
        self.start_failures = 0
        self.index_of = {stem: i for i, stem in enumerate(self.stems)}
        self.config_sha = _sha256(out_dir / "config.yaml")  # written by prepare_run; workers compare theirs
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        self.threads = workers.cpus if config.runtime.threads == "auto" else int(config.runtime.threads)
        if not workers.use_gpu:  # read by OpenMP when the worker's torch starts, before set_num_threads
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        self.actor_options = dict(num_cpus=workers.cpus, num_gpus=1 if workers.use_gpu else 0, max_restarts=0,
                                  max_concurrency=1, runtime_env={"env_vars": env} if env else None)
        self.relay = ray.remote(EventRelay).options(num_cpus=0, max_restarts=-1).remote()
        self.actor_class = ray.remote(ShardWorker)

    # -- workers

    def _start_worker(self) -> _Slot:
        self.started += 1
        name = f"w{self.started}"
        handle = self.actor_class.options(**self.actor_options).remote(
            self.config, str(self.out_dir), self.relay, name, self.workers.use_gpu, self.threads, os.getcwd())
        return _Slot(name=name, handle=handle, ref=handle.setup.remote(self.config_sha))

    def _replace(self, slot: _Slot, why: str) -> None:
        """Kills what is left of `slot`'s actor and starts a new one in its place."""
        try:
            self.ray.kill(slot.handle, no_restart=True)
        except Exception:  # already gone
            pass
        fresh = self._start_worker()
        log.warning("worker %s (pid %s) lost: %s; started %s in its place", slot.name, slot.pid, why, fresh.name)
        self._emit({"type": "worker_replaced", "worker": slot.name, "pid": slot.pid, "by": fresh.name, "cause": why})
        self.slots[self.slots.index(slot)] = fresh

    def _ready_count(self) -> int:
        return sum(s.state != "starting" for s in self.slots)

    # -- events

    def _emit(self, event: dict) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _drain_events(self) -> None:
        try:
            events = self.ray.get(self.relay.drain.remote(), timeout=30)
        except Exception as exc:  # a lost relay loses progress lines only; Ray restarts it
            log.warning("progress relay unavailable (%s); progress may lag", _cause(exc))
            return
        for event in events:
            self._on_worker_event(event)

    def _on_worker_event(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "log":
            log.log(event["level"], "[%s] %s", event["worker"], event["message"])
        elif kind == "start":
            log.info("shard %s attempt %d started on %s (pid %s)", event["stem"], event["attempt"] + 1,
                     event["worker"], event["pid"])
        elif kind == "video":
            state = self.shards.get(self.index_of.get(event["stem"], -1))
            if state is not None and not state.closed and state.attempt == event["attempt"]:
                state.videos += 1
                state.failed += 0 if event["ok"] else 1
                state.frames += event["frames"]
                self.progress.video_done(event["frames"], event["ok"])
        elif kind == "step":
            self.progress.video_step(event["key"], event["stage"], event["done"], event["total"])
        self._emit(event)

    # -- shards

    def _give_out(self, slot: _Slot) -> None:
        index = self.queue.popleft()
        state = self.shards[index]
        slot.state, slot.shard = "busy", index
        slot.ref = slot.handle.process.remote(self.urls[index], self.stems[index], state.attempt)
        self._emit({"type": "dispatch", "stem": self.stems[index], "attempt": state.attempt, "worker": slot.name})

    def _shard_done(self, index: int, marker: DoneMarker, slot: _Slot) -> None:
        state = self.shards[index]
        # The marker is the truth; events may have been lost or may still be on their way.
        self.progress.adjust(marker.samples - state.videos, marker.samples_failed - state.failed,
                             marker.frames - state.frames)
        state.closed = True
        self.progress.shard_done(self.stems[index], ok=True)
        self._emit({"type": "shard_done", "stem": self.stems[index], "attempt": state.attempt, "worker": slot.name})

    def _attempt_failed(self, index: int, cause: str) -> None:
        """Takes back what the attempt reported; gives the shard out again or, out of retries, fails it."""
        state = self.shards[index]
        stem = self.stems[index]
        self.progress.adjust(-state.videos, -state.failed, -state.frames)
        state.videos = state.failed = state.frames = 0
        state.causes.append(cause)
        if state.attempt < self.runtime.max_shard_retries:
            self.progress.shard_retry(stem, cause, state.attempt, self.runtime.max_shard_retries)
            state.attempt += 1
            self.queue.append(index)  # at the back: a poisonous shard does not hold up the others
            self._emit({"type": "retry", "stem": stem, "attempt": state.attempt, "cause": cause})
        else:
            state.closed = True
            attempts = state.attempt + 1
            self.failed[stem] = f"{cause} (after {attempts} attempt{'s' if attempts > 1 else ''})"
            log.error("shard %s failed after %d attempt(s): %s", stem, attempts, "; ".join(state.causes))
            self.progress.shard_done(stem, ok=False)
            self._emit({"type": "shard_failed", "stem": stem, "cause": cause})

    def _settle(self, slot: _Slot) -> None:
        """Handles the finished future of `slot` (setup or shard)."""
        from ray.exceptions import RayActorError, RayError, RayTaskError

        ref, slot.ref = slot.ref, None
        if slot.state == "starting":
            try:
                info = self.ray.get(ref)
            except Exception as exc:
                user_error = _user_error(exc)
                if user_error is not None:
                    raise user_error  # a bad model or output folder: every worker would fail the same way
                self.start_failures += 1
                if self.start_failures > self.workers.count * (self.runtime.max_shard_retries + 1):
                    raise VidbatchError(f"Ray workers keep failing to start ({self.start_failures} times); "
                                        f"last cause: {_cause(exc)}") from exc
                self._replace(slot, f"failed to start: {_cause(exc)}")
                return
            slot.state, slot.pid = "idle", info["pid"]
            log.info("worker %s ready: pid %s on %s, device %s", slot.name, info["pid"], info["node"], info["device"])
            self._emit({"type": "worker_ready", **info})
            return
        index, slot.shard = slot.shard, None
        try:
            marker = self.ray.get(ref)
        except RayTaskError as exc:  # the shard raised; the worker is fine
            slot.state = "idle"
            self._attempt_failed(index, _cause(exc))
        except (RayActorError, RayError) as exc:  # the worker process or its node is gone
            self._replace(slot, _cause(exc))
            self._attempt_failed(index, f"worker {slot.name} died: {_cause(exc)}")
        else:
            slot.state = "idle"
            self._shard_done(index, marker, slot)

    def run(self) -> dict[str, str]:
        """Runs every shard to done or failed; returns the failed ones (stem -> cause)."""
        self.slots = [self._start_worker() for _ in range(self.workers.count)]
        log.info("starting %s", self.workers.describe())
        no_worker_since = time.monotonic()
        try:
            while self.queue or any(s.state == "busy" for s in self.slots):
                for slot in self.slots:
                    if slot.state == "idle" and self.queue:
                        self._give_out(slot)
                waiting = {s.ref: s for s in self.slots if s.ref is not None}
                if not waiting:  # cannot happen while there is work (idle workers just got shards)
                    raise RuntimeError("dispatcher has work but no worker future to wait on")
                ready, _ = self.ray.wait(list(waiting), num_returns=1, timeout=POLL_S)
                if ready:  # take every future that is ready now, not only the first
                    ready, _ = self.ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
                self._drain_events()
                for ref in ready:
                    self._settle(waiting[ref])
                ready_count = self._ready_count()
                self.progress.set_workers(ready_count, len(self.slots))
                self.progress.tick()
                if ready_count:
                    no_worker_since = time.monotonic()
                elif time.monotonic() - no_worker_since > self.runtime.worker_start_timeout_s:
                    raise ConfigError(
                        f"no Ray worker could start within runtime.worker_start_timeout_s="
                        f"{self.runtime.worker_start_timeout_s:g}s; wanted {self.workers.describe()}, the cluster "
                        f"has {_resources_text(self.ray.cluster_resources())}")
            self._drain_events()
        finally:
            for slot in self.slots:
                try:
                    self.ray.kill(slot.handle, no_restart=True)
                except Exception:  # already gone
                    pass
            try:
                self.ray.kill(self.relay, no_restart=True)
            except Exception:
                pass
        return self.failed


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _resources_text(resources: dict) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(shown.items())) or "no CPU or GPU"


class _RaySession:
    """Joins the configured cluster or starts an embedded one; leaves a cluster it did not connect to alone."""

    def __init__(self, runtime: RuntimeConfig):
        self.runtime = runtime
        self.connected_here = False

    def __enter__(self) -> str:
        import ray

        if ray.is_initialized():  # the caller (a notebook, a test, a `ray job` entrypoint) already connected
            return "the Ray cluster this process is connected to"
        address = self.runtime.ray_address or os.environ.get("RAY_ADDRESS") or None
        # ray.init makes SIGTERM exit with code 15 on the driver; keep the run's handlers (exit 143, one line).
        handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS} if _in_main_thread() else {}
        # Under the CLI, Ray's start-up lines and token notice are noise: only its errors while it starts,
        # then its warnings to run.log (demoted); a library caller keeps Ray's own logging.
        quiet = dict(logging_level=logging.ERROR) if logs_set_up() else {}
        try:
            if address:
                ray.init(address=address, log_to_driver=True, **quiet)
                where = f"the Ray cluster at {address}"
            else:
                # "local": never silently join a cluster some earlier `ray start` left on this machine.
                cpus = max(os.cpu_count() or 1, (self.runtime.workers or 1) * self.runtime.cpus_per_worker)
                ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True, **quiet)
                where = "an embedded local Ray cluster"
        except ConnectionError as exc:
            raise ConfigError(f"cannot join the Ray cluster at {address!r} ({exc}); check runtime.ray_address or "
                              "RAY_ADDRESS, or leave both unset to start an embedded cluster") from exc
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            if quiet:
                demote_third_party_logs()
        self.connected_here = True
        return where

    def __exit__(self, *exc: object) -> None:
        if self.connected_here:
            import ray

            ray.shutdown()


def run_ray(config: Config, inputs: Sequence[str], out_dir: Path, *, overwrite: bool = False,
            shard_index: int = 0, num_shards: int = 1, console: Console | None = None,
            on_event: Callable[[dict], None] | None = None) -> RunOutcome:
    """Runs the shards still to do on Ray; a shard that keeps failing is recorded as failed.

    Usage, config and model errors raise (the CLI turns them into exit code 2). `on_event` is called on
    the driver with every worker event (`video`, `start`, `log`) and driver event (`dispatch`,
    `worker_ready`, `worker_replaced`, `retry`, `shard_done`, `shard_failed`), each a dict with `type`.
    """
    console = console or Console()
    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    plan = prepare_run(config, inputs, out_dir, overwrite=overwrite, shard_index=shard_index,
                       num_shards=num_shards, console=console)
    failed: dict[str, str] = {}
    if plan.todo:
        import ray

        with _RaySession(config.runtime) as where:
            workers = plan_workers(config.runtime, ray.cluster_resources().get("GPU", 0), len(plan.todo))
            log.info("ray: %s; %s", where, workers.describe())
            console.print(f"running on {where}: {workers.describe()}", highlight=False)
            with RunProgress(len(plan.todo), console, config.runtime.log_every_s,
                             total_videos=known_video_total(plan.urls, plan.todo)) as progress:
                dispatcher = Dispatcher(config, plan.urls, plan.stems, plan.todo, out_dir, workers, progress,
                                        on_event)
                failed = dispatcher.run()
    return RunOutcome(plan=plan, failed=failed, started=started)
