"""One live run per output folder (per SLURM array task): a lock file that names its owner.

Two runs writing the same shards of one output would delete each other's live temporaries and race
on the same files. A run takes `OUT/.vidbatch-run.{i}-of-{n}.lock` (`i`/`n`: its --shard-index /
--num-shards), created exclusively and holding the owner's host, pid and start time; a thread
touches it every `REFRESH_S` while the run lives. A run refuses to start while a live lock stands
for the same task, or for any task of another partitioning (its shards may overlap). A lock is stale,
and taken over, when its pid is dead on this host, or, for another host, when it was not touched for
`STALE_S` (a run on another node that died; a fresh one is waited for that long before refusing).

This detects, it is not a lease: two runs started in the same instant with different partitionings
can both pass. Cluster-wide leases replace it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vidbatch.core.errors import OutputBusyError

REFRESH_S = 15.0
STALE_S = 60.0
_PREFIX = ".vidbatch-run."
_SUFFIX = ".lock"


@dataclass(frozen=True)
class LockOwner:
    host: str
    pid: int
    started: float
    shard_index: int
    num_shards: int

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}, started {started}, task {self.shard_index} of {self.num_shards}"


def lock_path(out_dir: Path, shard_index: int = 0, num_shards: int = 1) -> Path:
    return Path(out_dir) / f"{_PREFIX}{shard_index}-of-{num_shards}{_SUFFIX}"


def _read_owner(path: Path) -> LockOwner | None:
    """The lock's owner, or None when it cannot be read (being written, or garbage)."""
    try:
        data = json.loads(path.read_text())
        return LockOwner(str(data["host"]), int(data["pid"]), float(data["started"]),
                         int(data["shard_index"]), int(data["num_shards"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, another user's
        return True
    return True


def _is_stale(path: Path, owner: LockOwner | None) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    if owner is not None and owner.host == socket.gethostname():
        return not _pid_alive(owner.pid)
    return age > STALE_S   # another host (or unreadable): only the heartbeat tells


def _conflicts(owner: LockOwner | None, shard_index: int, num_shards: int) -> bool:
    if owner is None:
        return True
    return owner.num_shards != num_shards or owner.shard_index == shard_index


def _live_conflict(out_dir: Path, shard_index: int, num_shards: int) -> tuple[Path, LockOwner | None] | None:
    """A live lock that forbids this run, if any; stale locks met on the way are removed."""
    for path in sorted(Path(out_dir).glob(f"{_PREFIX}*{_SUFFIX}")):
        owner = _read_owner(path)
        mine = owner is not None and (owner.host, owner.pid) == (socket.gethostname(), os.getpid())
        if mine or _is_stale(path, owner):   # "mine": left by an earlier process with this pid
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        if _conflicts(owner, shard_index, num_shards):
            return path, owner
    return None


def _refuse(out_dir: Path, path: Path, owner: LockOwner | None) -> OutputBusyError:
    who = owner.describe() if owner is not None else "an unreadable owner"
    return OutputBusyError(
        f"another run is writing {out_dir} ({who}; lock {path.name}): wait for it to finish, or write to "
        f"another --output; if that run is gone (e.g. its node died), delete {path}")


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(REFRESH_S):
        with contextlib.suppress(OSError):
            os.utime(path)


@contextlib.contextmanager
def output_lock(out_dir: Path, shard_index: int = 0, num_shards: int = 1,
                wait_s: float = STALE_S + REFRESH_S) -> Iterator[Path]:
    """Holds the run lock of `out_dir` for this task while the block runs; OutputBusyError if another
    live run holds a conflicting one. A fresh lock of another host is waited for up to `wait_s`
    (it may belong to a run that just died there)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while (conflict := _live_conflict(out_dir, shard_index, num_shards)) is not None:
        path, owner = conflict
        same_host = owner is not None and owner.host == socket.gethostname()
        if same_host or time.monotonic() >= deadline:
            raise _refuse(out_dir, path, owner)
        time.sleep(min(REFRESH_S, max(0.0, deadline - time.monotonic())) or 0.1)
    path = lock_path(out_dir, shard_index, num_shards)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
             "shard_index": shard_index, "num_shards": num_shards}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:   # another run took it between our check and now
        raise _refuse(out_dir, path, _read_owner(path)) from None
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(owner))
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), name="vidbatch-run-lock", daemon=True)
    beat.start()
    try:
        yield path
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
