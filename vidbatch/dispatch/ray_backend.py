"""The `ray` backend's driver: one long-lived worker per GPU, shards handed out one at a time, failures sorted.

The driver (the `vidbatch run` process) joins a Ray cluster (`runtime.ray_address`, `$RAY_ADDRESS`) or
starts an embedded local one, then starts `ShardWorker` actors (`dispatch.ray_worker`): one per GPU
(`num_gpus=1`), or `runtime.workers` CPU workers. Each loads the model once and runs
`batch.shard.process_shard` (the Lightning predict loop) shard after shard.

Dispatch is dynamic: the driver keeps exactly one shard in flight per ready worker and gives the next
shard to whichever worker finishes first, so fast and slow GPUs (or short and long shards) even out.

Failures are sorted (`core.faults`):
- the worker's (infrastructure): a CUDA or driver error raised by a shard, a worker process that died
  (killed, out of host memory, node lost), a worker that reported no progress for
  `runtime.stall_timeout_s` (a wedged read, a hung GPU; it is killed). The worker is retired and a new
  one takes its place; the shard goes to the front of the queue without spending a retry (up to
  FREE_REQUEUES times, in case the shard is what breaks its workers). After `runtime.quarantine_after`
  such failures in a row a place is quarantined, not refilled (a quarantined GPU worker that still
  lives is kept idle, holding the bad GPU so no other worker lands on it). Only when every place is
  quarantined do the remaining shards fail;
- the shard's: any other exception a shard raises (an unreadable tar). The worker is kept and the
  shard given out again at the back of the queue; after `runtime.max_shard_retries` retries it is
  reported failed and the run exits 1; a rerun continues;
- a sample's: a failed row naming the cause (the shard goes on); out of memory is retried once with
  smaller chunks first (`batch.module`);
- the cluster's: when, for CLUSTER_LOST_GRACE_S, no live node can host a worker (the embedded node
  died, every node was lost), the run stops at once: "the Ray cluster was lost: rerun to resume",
  exit 1, the unfinished shards reported failed.

Exactly once: every attempt writes its own temporaries and the output of a shard becomes visible only
by renames of complete files, the done marker last (io.output_shards). The commit is fenced by the
shard's lease (`dispatch.leases.lease_fence`): the driver writes the attempt it hands out into the
lease, and a worker publishes only if, just before its renames, the lease still names this driver and
that attempt. So an attempt the driver gave up on (a worker on a node that was cut off, not dead) or a
shard another driver took over publishes nothing: the worker removes its temporaries and reports
`LeaseLost`, which spends no retry and retires no worker; the shard is left to its new holder (or
claimed again here once it is free). A retried shard rewrites its output from scratch; the new
attempt's `remove_stale_temporaries` deletes an earlier attempt's temporaries, and that attempt, should
it still run, then fails its fence (or its rename, which asks the fence again).

Progress: workers send events (see `dispatch.ray_worker`) to a small `EventRelay` actor; the driver
drains it every poll without blocking and draws with `RunProgress`, adding per-worker throughput,
peak memory and stall warnings to the status lines. The counts of an attempt that is redone are taken
back, and a finished shard's counts are set from its done marker, so the totals are exact whatever is
killed. A relay that dies is restarted by Ray; its loss is reported once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console

from vidbatch.config.schema import Config, RuntimeConfig
from vidbatch.core.errors import ConfigError, VidbatchError
from vidbatch.core.faults import is_infrastructure_error, is_lease_lost
from vidbatch.core.rows import DoneMarker
from vidbatch.core.signals import STOP_SIGNALS
from vidbatch.dispatch.estimate import known_video_total
from vidbatch.dispatch.leases import LeaseBook, new_run_id
from vidbatch.dispatch.logs import demote_third_party_logs, logs_set_up
from vidbatch.dispatch.plan import RunOutcome, RunPlan, prepare_run
from vidbatch.dispatch.progress import RunProgress
from vidbatch.dispatch.ray_worker import EventRelay, ShardWorker, file_sha256
from vidbatch.dispatch.work import SharedWork

log = logging.getLogger("vidbatch")

# Seconds between polls of the futures and the event relay (bounds how late progress is drawn).
POLL_S = 0.25
# Environment a worker needs to find models offline like the driver does; forwarded when set.
FORWARDED_ENV = ("VIDBATCH_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# Test-only fault hooks (dispatch.ray_worker, engine.editor) reach the workers through this prefix.
TEST_ENV_PREFIX = "VIDBATCH_TEST_"
# Hand-outs again after a worker failure that a shard gets for free; then they spend its retries.
FREE_REQUEUES = 3
# A relay drain unanswered for this long counts as a lost relay (said once).
RELAY_LATE_S = 30.0
# How often the driver asks Ray which nodes live, and how long none may host a worker before the run stops.
CLUSTER_CHECK_S = 2.0
CLUSTER_LOST_GRACE_S = 10.0
CLUSTER_LOST = "the Ray cluster was lost: rerun to resume"


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
# Driver side


@dataclass
class _Slot:
    """One place for a worker (normally one GPU) as the driver sees it; a retired worker's place gets a new actor."""

    name: str
    handle: Any
    ref: Any = None             # the future in flight: setup() while starting, process() while busy
    state: str = "starting"     # starting -> idle <-> busy; quarantined: never refilled
    pid: int | None = None
    shard: int | None = None    # plan index of the shard in flight
    strikes: int = 0            # infrastructure failures in a row of this place's workers
    last_progress: float = 0.0  # monotonic time of the worker's last event while busy
    stall_warned: bool = False


@dataclass
class _ShardState:
    """Driver-side bookkeeping of one shard: its attempt and what that attempt reported."""

    attempt: int = 0           # counts every hand-out; events of older attempts are ignored
    retries: int = 0           # hand-outs again after the shard itself failed (runtime.max_shard_retries)
    requeues: int = 0          # hand-outs again after its worker failed (free, up to FREE_REQUEUES)
    videos: int = 0
    failed: int = 0
    frames: int = 0
    closed: bool = False       # done or failed for good: late events are ignored
    causes: list[str] = field(default_factory=list)


@dataclass
class _WorkerStats:
    """What a worker's video events said: for the per-worker throughput and memory in the status lines."""

    frames: int = 0
    seconds: float = 0.0
    memory_mb: float | None = None


class RayClusterLost(Exception):
    """No live Ray node can host a worker any more (the embedded node died, every node was lost)."""


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
    """The driver loop: starts workers, hands out shards one at a time, retires failed workers, retries."""

    def __init__(self, config: Config, plan: RunPlan, out_dir: Path, workers: WorkerPlan, progress: RunProgress,
                 on_event: Callable[[dict], None] | None = None, book: LeaseBook | None = None):
        """`book`: this driver's leases (a fresh run id by default); shards are claimed through it as
        workers become free (`dispatch.work`), so other drivers of the same output can share them."""
        import ray

        self.ray = ray
        self.config = config
        self.runtime = config.runtime
        self.urls, self.stems = list(plan.urls), list(plan.stems)
        self.ranges = [plan.sample_range(i) for i in range(len(plan.urls))]   # None: the whole shard
        self.out_dir = out_dir
        self.workers = workers
        self.progress = progress
        self.on_event = on_event
        self.book = book or LeaseBook(out_dir, new_run_id(), config.runtime.lease_s)
        self.work = SharedWork(plan, out_dir, self.book, config.runtime.deadline)
        self.queue: deque[int] = deque()  # claimed shards waiting for a worker (new, requeued, retried)
        self.shards = {i: _ShardState() for i in plan.todo}
        self.retry = set(plan.retry)
        self.failed: dict[str, str] = {}
        self.slots: list[_Slot] = []
        self.stats: dict[str, _WorkerStats] = {}
        self.started = 0
        self.start_failures = 0
        self.ever_ready = False
        self.index_of = {stem: i for i, stem in enumerate(self.stems)}
        self.config_sha = file_sha256(out_dir / "config.yaml")  # written by prepare_run; workers compare theirs
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        self.threads = workers.cpus if config.runtime.threads == "auto" else int(config.runtime.threads)
        if not workers.use_gpu:  # read by OpenMP when the worker's torch starts, before set_num_threads
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        env.update({k: v for k, v in os.environ.items() if k.startswith(TEST_ENV_PREFIX)})
        self.actor_options = dict(num_cpus=workers.cpus, num_gpus=1 if workers.use_gpu else 0, max_restarts=0,
                                  max_concurrency=1, runtime_env={"env_vars": env} if env else None)
        # On the driver's own node (soft: a restart may go elsewhere): a lost worker node must not take the
        # progress relay, and with it every worker's events, down with it.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
        self.relay = ray.remote(EventRelay).options(num_cpus=0, max_restarts=-1, max_task_retries=-1,
                                                    scheduling_strategy=here).remote()
        self.relay_ok = True
        self.relay_pid: int | None = None
        self.relay_warned = False
        self.drain_ref: Any = None
        self.drain_sent = 0.0
        self.cluster_checked = 0.0
        self.cluster_lost_since: float | None = None
        self.actor_class = ray.remote(ShardWorker)

    # -- workers

    def _start_worker(self, strikes: int = 0) -> _Slot:
        self.started += 1
        name = f"w{self.started}"
        handle = self.actor_class.options(**self.actor_options).remote(
            self.config, str(self.out_dir), self.relay, name, self.workers.use_gpu, self.threads, os.getcwd())
        return _Slot(name=name, handle=handle, ref=handle.setup.remote(self.config_sha), strikes=strikes)

    def _kill(self, handle: Any) -> None:
        try:
            self.ray.kill(handle, no_restart=True)
        except Exception:  # already gone
            pass

    def _retire(self, slot: _Slot, why: str, alive: bool) -> None:
        """An infrastructure failure of `slot`'s worker: replace it, or after `runtime.quarantine_after`
        failures in a row, quarantine its place. A quarantined GPU worker that still lives is kept, idle:
        it holds its GPU, so no replacement can land on the bad device."""
        slot.strikes += 1
        slot.ref, slot.shard = None, None
        if slot.strikes >= self.runtime.quarantine_after:
            if not (alive and self.workers.use_gpu):
                self._kill(slot.handle)
            slot.state = "quarantined"
            log.error("worker %s (pid %s) quarantined after %d infrastructure failure(s) in a row (last: %s); its "
                      "place is not refilled", slot.name, slot.pid, slot.strikes, why)
            self._emit({"type": "worker_quarantined", "worker": slot.name, "pid": slot.pid, "cause": why})
            if all(s.state == "quarantined" for s in self.slots):
                raise _NoHealthyWorker(f"every worker was quarantined (last: {why})")
            return
        self._kill(slot.handle)
        fresh = self._start_worker(slot.strikes)
        log.warning("worker %s (pid %s) retired: %s; started %s in its place", slot.name, slot.pid, why, fresh.name)
        self._emit({"type": "worker_replaced", "worker": slot.name, "pid": slot.pid, "by": fresh.name, "cause": why})
        self.slots[self.slots.index(slot)] = fresh

    def _ready_count(self) -> int:
        return sum(s.state in ("idle", "busy") for s in self.slots)

    # -- events

    def _emit(self, event: dict) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _drain_events(self, wait_s: float = 0.0) -> None:
        """Takes the relay's events without blocking the loop: a drain that is not answered yet stays pending."""
        if self.drain_ref is None:
            self.drain_ref, self.drain_sent = self.relay.drain.remote(), time.monotonic()
        ready, _ = self.ray.wait([self.drain_ref], timeout=wait_s)
        if not ready:  # (a relay that never answered yet is still starting, not late)
            if self.relay_pid is not None and time.monotonic() - self.drain_sent > RELAY_LATE_S:
                self._relay_down(f"no answer for {RELAY_LATE_S:g}s")
            return
        ref, self.drain_ref = self.drain_ref, None
        try:
            pid, events = self.ray.get(ref)
        except Exception as exc:
            self._relay_down(_cause(exc))
            return
        if self.relay_pid is not None and pid != self.relay_pid:  # Ray restarted it; what it held is gone
            self._relay_down(f"its process {self.relay_pid} ended; restarted as {pid}")
        if pid != self.relay_pid:
            self.relay_pid = pid
            self._emit({"type": "relay_ready", "pid": pid})
        if not self.relay_ok:
            self.relay_ok = True
            log.info("progress relay is back")
            for slot in self.slots:  # the quiet time while it was away says nothing about the workers
                slot.last_progress = time.monotonic()
        for event in events:
            self._on_worker_event(event)

    def _relay_down(self, cause: str) -> None:
        """The relay died or does not answer: said once per run; Ray restarts it (max_restarts=-1)."""
        self.relay_ok = False
        if not self.relay_warned:
            self.relay_warned = True
            log.warning("progress relay lost (%s); Ray restarts it. Events sent meanwhile are lost: progress lines "
                        "may lag until shards finish (done markers correct the totals), and stall detection "
                        "waits for the relay", cause)
            self._emit({"type": "relay_lost", "cause": cause})

    def _slot_of(self, worker: str | None) -> _Slot | None:
        return next((s for s in self.slots if s.name == worker), None)

    def _on_worker_event(self, event: dict) -> None:
        kind = event.get("type")
        slot = self._slot_of(event.get("worker"))
        if slot is not None and slot.state == "busy":
            slot.last_progress, slot.stall_warned = time.monotonic(), False
        if kind == "log":
            log.log(event["level"], "[%s] %s", event["worker"], event["message"])
        elif kind == "start":
            log.info("shard %s attempt %d started on %s (pid %s)", event["stem"], event["attempt"] + 1,
                     event["worker"], event["pid"])
        elif kind == "video":
            stats = self.stats.setdefault(event["worker"], _WorkerStats())
            stats.frames += event["frames"]
            stats.seconds += event.get("seconds", 0.0)
            stats.memory_mb = event.get("memory_mb", stats.memory_mb)
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
        stem = self.stems[index]
        if not self.book.hand_out(stem, state.attempt):  # the lease went meanwhile (this driver stalled)
            self._lease_lost(index, f"lease of shard {stem} lost before attempt {state.attempt + 1} started", None)
            return
        slot.state, slot.shard = "busy", index
        slot.last_progress, slot.stall_warned = time.monotonic(), False
        slot.ref = slot.handle.process.remote(self.urls[index], stem, state.attempt, index in self.retry,
                                              self.book.owner, self.ranges[index])
        self._emit({"type": "dispatch", "stem": self.stems[index], "attempt": state.attempt, "worker": slot.name})

    def _shard_done(self, index: int, marker: DoneMarker, slot: _Slot) -> None:
        state = self.shards[index]
        # The marker is the truth; events may have been lost or may still be on their way.
        self.progress.adjust(marker.samples - state.videos, marker.samples_failed - state.failed,
                             marker.frames - state.frames)
        state.closed = True
        slot.strikes = 0
        self.work.finished(index)
        self.progress.shard_done(self.stems[index], ok=True)
        self._emit({"type": "shard_done", "stem": self.stems[index], "attempt": state.attempt, "worker": slot.name})

    def _take_back(self, index: int, cause: str) -> _ShardState:
        """Takes back the counts the failed attempt reported."""
        state = self.shards[index]
        self.progress.adjust(-state.videos, -state.failed, -state.frames)
        state.videos = state.failed = state.frames = 0
        state.causes.append(cause)
        return state

    def _requeue(self, index: int, cause: str) -> None:
        """The shard's worker failed, not the shard: it goes to the front of the queue without spending a
        retry. A shard whose workers keep failing (it may be what breaks them) spends retries after
        FREE_REQUEUES such hand-outs."""
        state = self.shards[index]
        if state.requeues >= FREE_REQUEUES:
            self._attempt_failed(index, cause)
            return
        self._take_back(index, cause)
        state.requeues += 1
        state.attempt += 1
        self.queue.appendleft(index)
        log.warning("shard %s: its worker failed (%s); given out again, not counted against its retries",
                    self.stems[index], cause)
        self._emit({"type": "requeue", "stem": self.stems[index], "attempt": state.attempt, "cause": cause})

    def _attempt_failed(self, index: int, cause: str) -> None:
        """The shard itself failed: gives it out again or, out of retries, fails it."""
        state = self._take_back(index, cause)
        stem = self.stems[index]
        if state.retries < self.runtime.max_shard_retries:
            self.progress.shard_retry(stem, cause, state.retries, self.runtime.max_shard_retries)
            state.retries += 1
            state.attempt += 1
            self.queue.append(index)  # at the back: a poisonous shard does not hold up the others
            self._emit({"type": "retry", "stem": stem, "attempt": state.attempt, "cause": cause})
        else:
            state.closed = True
            attempts = state.attempt + 1
            self.failed[stem] = f"{cause} (after {attempts} attempt{'s' if attempts > 1 else ''})"
            self.work.failed(index, self.failed[stem])
            log.error("shard %s failed after %d attempt(s): %s", stem, attempts, "; ".join(state.causes))
            self.progress.shard_done(stem, ok=False)
            self._emit({"type": "shard_failed", "stem": stem, "cause": cause})

    def _lease_lost(self, index: int, cause: str, slot: _Slot | None) -> None:
        """The attempt's commit fence found the lease lost: it published nothing. Neither the shard's
        failure nor the worker's: the shard is left to the driver that holds it now, or claimed again
        here when free (`SharedWork.lost`); no retry is spent."""
        state = self._take_back(index, cause)
        state.attempt += 1   # whatever the old attempt still reports is ignored
        stem = self.stems[index]
        self.progress.shard_lost(stem, cause)
        self._emit({"type": "lease_lost", "stem": stem, "attempt": state.attempt - 1,
                    "worker": slot.name if slot is not None else None, "cause": cause})
        if not self.work.lost(index, cause):
            state.closed = True
            self.failed[stem] = cause
            self.progress.shard_done(stem, ok=False)
            self._emit({"type": "shard_failed", "stem": stem, "cause": cause})

    def _infrastructure_failure(self, slot: _Slot, why: str, alive: bool) -> None:
        """The worker failed (device error, death, stall): its shard is requeued and the worker retired."""
        index = slot.shard
        self._retire(slot, why, alive)
        if index is not None:
            self._requeue(index, f"worker {slot.name}: {why}")

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
                self._retire(slot, f"failed to start: {_cause(exc)}", alive=isinstance(exc, RayTaskError))
                return
            slot.state, slot.pid = "idle", info["pid"]
            self.ever_ready = True
            log.info("worker %s ready: pid %s on %s, device %s%s", slot.name, info["pid"], info["node"],
                     info["device"], f" (GPU {','.join(info['gpus'])})" if info.get("gpus") else "")
            self._emit({"type": "worker_ready", **info})
            return
        try:
            marker = self.ray.get(ref)
        except RayTaskError as exc:
            if is_lease_lost(exc):  # overtaken by another driver (or attempt): nothing published, nobody failed
                index, slot.shard, slot.state = slot.shard, None, "idle"
                slot.strikes = 0
                self._lease_lost(index, _cause(exc), slot)
            elif is_infrastructure_error(exc):  # a device error: the worker is suspect, not the shard
                self._infrastructure_failure(slot, _cause(exc), alive=True)
            else:  # the shard raised; the worker is fine
                index, slot.shard, slot.state = slot.shard, None, "idle"
                self._attempt_failed(index, _cause(exc))
        except (RayActorError, RayError) as exc:  # the worker process or its node is gone
            self._infrastructure_failure(slot, f"died: {_cause(exc)}", alive=False)
        else:
            index, slot.shard, slot.state = slot.shard, None, "idle"
            self._shard_done(index, marker, slot)

    # -- liveness

    def _check_stalls(self, now: float) -> None:
        """Kills and replaces a busy worker that sent no event for `runtime.stall_timeout_s`; warns at half."""
        timeout = self.runtime.stall_timeout_s
        if timeout is None or not self.relay_ok:  # without the relay, silence proves nothing
            return
        for slot in list(self.slots):
            if slot.state != "busy":
                continue
            quiet = now - slot.last_progress
            if quiet > timeout:
                self._infrastructure_failure(
                    slot, f"no progress for {quiet:.0f}s (runtime.stall_timeout_s={timeout:g})", alive=False)
            elif quiet > timeout / 2 and not slot.stall_warned:
                slot.stall_warned = True
                log.warning("worker %s (pid %s) has reported no progress on shard %s for %.0fs; it is replaced "
                            "at %gs (runtime.stall_timeout_s)", slot.name, slot.pid, self.stems[slot.shard],
                            quiet, timeout)
                self._emit({"type": "stall_warning", "worker": slot.name, "seconds": round(quiet, 1)})

    def _check_cluster(self, now: float) -> None:
        """Raises RayClusterLost when, for CLUSTER_LOST_GRACE_S, no live node could host a worker."""
        if not self.ever_ready or now - self.cluster_checked < CLUSTER_CHECK_S:
            return
        self.cluster_checked = now
        if _usable_nodes(self.ray, self.workers):
            self.cluster_lost_since = None
            return
        if self.cluster_lost_since is None:
            self.cluster_lost_since = now
            log.warning("no live Ray node can host a worker; waiting %gs for one before giving up", CLUSTER_LOST_GRACE_S)
        elif now - self.cluster_lost_since >= CLUSTER_LOST_GRACE_S:
            raise RayClusterLost(f"no live Ray node could host a worker for {now - self.cluster_lost_since:.0f}s")

    def _worker_detail(self, now: float) -> str:
        """Per live worker: frames/s over its editing time, peak memory, and how long it has been quiet."""
        parts = []
        for slot in self.slots:
            if slot.state not in ("idle", "busy"):
                continue
            stats = self.stats.get(slot.name, _WorkerStats())
            text = f"{slot.name} {stats.frames / stats.seconds:.2f} frames/s" if stats.seconds else f"{slot.name} -"
            if stats.memory_mb is not None:
                text += f" {stats.memory_mb:.0f} MB"
            timeout = self.runtime.stall_timeout_s
            if slot.state == "busy" and timeout is not None and now - slot.last_progress > timeout / 2:
                text += f" STALLED {now - slot.last_progress:.0f}s"
            parts.append(text)
        return ", ".join(parts)

    def _claim_for_idle_workers(self) -> None:
        """Claims shards (leases) only as workers are free to start them: a claimed shard waiting here
        would keep other drivers of the output from it."""
        idle = sum(s.state == "idle" for s in self.slots)
        while len(self.queue) < idle:
            index = self.work.claim_next()
            if index is None:
                return
            self.queue.append(index)

    def _more_to_do(self) -> bool:
        """Work in flight or queued, or a shard this driver can still claim (claimed here, for the queue)."""
        if self.queue or any(s.state == "busy" for s in self.slots):
            return True
        index = self.work.claim_next()
        if index is None:
            return False
        self.queue.append(index)
        return True

    def _loop_once(self) -> None:
        self.book.renew_due()
        self._claim_for_idle_workers()
        for slot in self.slots:
            if slot.state == "idle" and self.queue:
                self._give_out(slot)
        waiting = {s.ref: s for s in self.slots if s.ref is not None}
        ready: list = []
        if waiting:
            ready, _ = self.ray.wait(list(waiting), num_returns=1, timeout=POLL_S)
            if ready:  # take every future that is ready now, not only the first
                ready, _ = self.ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
        else:  # every place quarantined or waiting for a node: nothing to wait on but time
            time.sleep(POLL_S)
        self._drain_events(wait_s=POLL_S)  # a live relay answers in milliseconds; a lost one costs one poll
        for ref in ready:
            self._settle(waiting[ref])
        now = time.monotonic()
        self._check_stalls(now)
        self._check_cluster(now)
        self.progress.set_workers(self._ready_count(), sum(s.state != "quarantined" for s in self.slots))
        self.progress.detail = self._worker_detail(now)
        self.progress.tick()

    def run(self) -> dict[str, str]:
        """Runs every shard to done or failed; returns the failed ones (stem -> cause)."""
        self.slots = [self._start_worker() for _ in range(self.workers.count)]
        log.info("starting %s", self.workers.describe())
        no_worker_since = time.monotonic()
        try:
            while self._more_to_do():
                try:
                    self._loop_once()
                except _NoHealthyWorker as exc:
                    self.fail_unfinished(f"no healthy Ray worker left: {exc}")
                    break
                if self._ready_count():
                    no_worker_since = time.monotonic()
                elif time.monotonic() - no_worker_since > self.runtime.worker_start_timeout_s:
                    raise ConfigError(
                        f"no Ray worker could start within runtime.worker_start_timeout_s="
                        f"{self.runtime.worker_start_timeout_s:g}s; wanted {self.workers.describe()}, the cluster "
                        f"has {_resources_text(self.ray.cluster_resources())}")
            self._drain_events(wait_s=5.0)
        finally:
            for slot in self.slots:
                self._kill(slot.handle)
            self._kill(self.relay)
            self.book.release_all()  # whatever is unfinished here is free for other drivers at once
        return self.failed

    def fail_unfinished(self, cause: str) -> None:
        """Records every shard not done yet as failed with `cause` (a rerun continues them); the shards this
        driver holds get a failure record for the summary, whoever writes it."""
        for index, state in self.shards.items():
            if not state.closed and self.work.still_todo(index):
                state.closed = True
                self.failed[self.stems[index]] = cause
                if self.stems[index] in self.book.held:
                    self.work.failed(index, cause)
                self.progress.shard_done(self.stems[index], ok=False)
        self.queue.clear()
        for slot in self.slots:
            slot.shard = None
            if slot.state == "busy":
                slot.state = "idle"

def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _NoHealthyWorker(Exception):
    """Every worker's place was quarantined."""


def _usable_nodes(ray: Any, workers: WorkerPlan) -> int:
    """How many live nodes have the resources one worker needs (0 when the cluster cannot be asked)."""
    try:
        nodes = ray.nodes()
    except Exception:  # the cluster's control store is gone too
        return 0
    need = {"CPU": workers.cpus, "GPU": 1 if workers.use_gpu else 0}
    return sum(1 for n in nodes if n.get("Alive")
               and all(n.get("Resources", {}).get(k, 0) >= v for k, v in need.items() if v))


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
            on_event: Callable[[dict], None] | None = None, retry_failed: bool = False) -> RunOutcome:
    """Runs the shards still to do on Ray; a shard that keeps failing is recorded as failed.

    Usage, config and model errors raise (the CLI turns them into exit code 2). A lost cluster stops the
    run at once with the unfinished shards failed (exit 1, a rerun resumes). `on_event` is called on the
    driver with every worker event (`video`, `start`, `beat`, `log`) and driver event (`dispatch`,
    `worker_ready`, `worker_replaced`, `worker_quarantined`, `requeue`, `retry`, `lease_lost`,
    `stall_warning`, `relay_ready`, `relay_lost`, `shard_done`, `shard_failed`), each a dict with `type`.
    """
    console = console or Console()
    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    plan = prepare_run(config, inputs, out_dir, overwrite=overwrite, shard_index=shard_index,
                       num_shards=num_shards, console=console, retry_failed=retry_failed)
    failed: dict[str, str] = {}
    stopped, never_fits = None, False
    if plan.todo:
        import ray

        with _RaySession(config.runtime) as where:
            workers = plan_workers(config.runtime, ray.cluster_resources().get("GPU", 0), len(plan.todo))
            log.info("ray: %s; %s", where, workers.describe())
            console.print(f"running on {where}: {workers.describe()}", highlight=False)
            with RunProgress(len(plan.todo), console, config.runtime.log_every_s,
                             total_videos=known_video_total(plan.urls, plan.todo, plan.ranges)) as progress:
                dispatcher = Dispatcher(config, plan, out_dir, workers, progress, on_event)
                try:
                    failed = dispatcher.run()
                except RayClusterLost as exc:
                    log.error("%s (%s)", CLUSTER_LOST, exc)
                    console.print(f"[red]{CLUSTER_LOST}[/red] ({exc})", highlight=False)
                    dispatcher.fail_unfinished(CLUSTER_LOST)
                    failed = dispatcher.failed
                stopped, never_fits = dispatcher.work.stopped, dispatcher.work.never_fits
    return RunOutcome(plan=plan, failed=failed, started=started, stopped=stopped, never_fits=never_fits)
