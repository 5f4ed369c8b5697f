"""Leases on shards, so several drivers (a second submission, SLURM array tasks) share one output.

A driver works on a shard only while it holds the shard's lease, `OUT/leases/{stem}.json`: who holds
it (`owner`, the driver's run id), the attempt, the host and pid, and when it expires. The holder
renews it (every third of `runtime.lease_s`) while the shard is in flight and removes it when the
shard is done or given up (a driver ended by SIGTERM or Ctrl-C releases its leases on the way out). A lease is created whole and exclusively (written under a unique
temporary name, then hard-linked to its final name, which fails if the name exists: safe on NFS
too). An expired lease (its driver died or hung), or one whose driver ran on this host and whose
process is gone, is broken by renaming it away, and the shard is free for anyone. Drivers that give up on a shard record why in `OUT/failed/{stem}.json`; the finaliser
reads those (so one driver's failures are in the summary whoever writes it).

Leases keep drivers from doing the same work twice, and they fence the commit: an attempt publishes
its shard only if, just before the renames, the lease still names its driver and its attempt and has
not expired (`lease_fence`, checked by `io.output_shards.ShardOutput.commit`); otherwise it removes its
temporaries and reports `core.faults.LeaseLost`, which is neither a failed shard nor a failed row. The
Ray driver writes the attempt it hands out into the lease (`LeaseBook.hand_out`), so a worker the
driver gave up on (a node cut off, not dead) is fenced as well as another driver. The exactly-once
output never depends on the fence alone: a shard is still committed by renames of complete files,
done marker last, so even two attempts that both pass it (one stalled between the check and the
renames for longer than its lease) can only publish complete, equivalent shards.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Container

from vidbatch.core.atomic import TMP_SUFFIX, atomic_write, temporary_path
from vidbatch.core.faults import LeaseLost
from vidbatch.io.shard_check import is_intact

log = logging.getLogger("vidbatch")


# A lease temporary older than this whose pid names no process here was left by a killed writer.
DEAD_WRITER_S = 1.0


def new_run_id() -> str:
    """A driver's identity in leases and failure records: host, pid and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Lease:
    stem: str
    owner: str       # the run id of the driver holding it
    attempt: int     # the holder's attempt at the shard (fences late events and records)
    host: str
    pid: int
    expires: float   # unix time

    def live(self, now: float | None = None) -> bool:
        """Unexpired, and its driver not known dead (a driver on this host whose process is gone, e.g.
        killed with SIGKILL, holds nothing: its shards are free at once for a rerun)."""
        if (time.time() if now is None else now) >= self.expires:
            return False
        return not (self.host == socket.gethostname() and not _process_exists(self.pid))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def lease_path(out_dir: Path, stem: str) -> Path:
    return Path(out_dir) / "leases" / f"{stem}.json"


def failure_path(out_dir: Path, stem: str) -> Path:
    return Path(out_dir) / "failed" / f"{stem}.json"


def read_lease(out_dir: Path, stem: str) -> Lease | None:
    """The shard's lease, live or expired; None when there is none (or it is not readable)."""
    try:
        return Lease(**json.loads(lease_path(out_dir, stem).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def live_lease(out_dir: Path, stem: str) -> Lease | None:
    lease = read_lease(out_dir, stem)
    return lease if lease is not None and lease.live() else None


def lease_fence(out_dir: Path, stem: str, owner: str, attempt: int) -> Callable[[], None]:
    """The commit fence of one attempt: a callable that raises `LeaseLost` unless the shard's lease is
    still this driver's (`owner`), for this `attempt`, and live. Reads one small file; safe to call from a
    Ray worker on another node (the output folder is shared; expiry is compared with this node's clock,
    which the renewals every third of the lease leave two thirds of it to differ by)."""
    out_dir = Path(out_dir)

    def fence() -> None:
        lease = read_lease(out_dir, stem)
        if lease is None:
            why = "it was released or broken by another driver"
        elif lease.owner != owner:
            why = f"driver {lease.owner} holds it now"
        elif lease.attempt != attempt:
            why = f"attempt {lease.attempt + 1} of this driver holds it now"
        elif not lease.live():
            why = f"it expired {time.time() - lease.expires:.0f}s ago (not renewed: the driver stalled or died)"
        else:
            return
        raise LeaseLost(f"lease of shard {stem} lost by attempt {attempt + 1} of driver {owner}: {why}; its output "
                        "is not published")

    return fence


class LeaseBook:
    """One driver's leases on the shards of one output folder."""

    def __init__(self, out_dir: Path, owner: str, ttl_s: float):
        self.out_dir = Path(out_dir)
        self.owner = owner
        self.ttl_s = ttl_s
        self.held: dict[str, int] = {}      # stem -> attempt
        self._renewed = 0.0
        (self.out_dir / "leases").mkdir(parents=True, exist_ok=True)

    def _lease(self, stem: str, attempt: int) -> Lease:
        return Lease(stem=stem, owner=self.owner, attempt=attempt, host=socket.gethostname(), pid=os.getpid(),
                     expires=time.time() + self.ttl_s)

    def claim(self, stem: str, attempt: int = 0) -> bool:
        """Takes the shard's lease if nobody holds a live one (breaking an expired one); True if taken."""
        if stem in self.held:
            return True
        path = lease_path(self.out_dir, stem)
        current = read_lease(self.out_dir, stem)
        if current is not None and current.live():
            return False
        if current is not None or path.exists():  # expired (or unreadable): break it, once
            broken = temporary_path(path)
            try:
                os.rename(path, broken)
            except FileNotFoundError:  # another driver broke it first
                pass
            else:
                log.warning("lease of shard %s (driver %s) expired; taken over", stem,
                            current.owner if current else "unknown")
            finally:   # a stop (SIGTERM raises) between the rename and here must not leave it behind
                broken.unlink(missing_ok=True)
        self._remove_dead_writers_temporaries(stem)
        tmp = temporary_path(path)
        try:   # the write inside: a stop while writing must not leave the temporary behind either
            tmp.write_text(json.dumps(asdict(self._lease(stem, attempt))))
            os.link(tmp, path)  # fails if the name exists: someone else claimed it meanwhile
        except FileExistsError:
            return False
        except FileNotFoundError:  # our temporary was taken for a dead writer's (see below): claim later
            return False
        finally:
            tmp.unlink(missing_ok=True)
        self.held[stem] = attempt
        return True

    def _remove_dead_writers_temporaries(self, stem: str) -> None:
        """Removes the lease temporaries (`.{stem}.json.{pid}.{random}.tmp`) of writers that were killed while
        writing the shard's lease (a claim or a renewal): those whose pid names no process here, written more
        than `DEAD_WRITER_S` ago. A temporary lives for one write (milliseconds), so the age keeps a writer
        on another host whose pid happens not to exist here safe in practice, and if it ever is not, its
        claim fails and is tried again."""
        now = time.time()
        for tmp in (self.out_dir / "leases").glob(f".{stem}.json.*{TMP_SUFFIX}"):
            try:
                pid = int(tmp.name.rsplit(".", 3)[1])
                old = now - tmp.stat().st_mtime > DEAD_WRITER_S
            except (ValueError, FileNotFoundError):
                continue
            if old and not _process_exists(pid):
                tmp.unlink(missing_ok=True)

    def hand_out(self, stem: str, attempt: int) -> bool:
        """Records in the held lease that `attempt` is the one working on the shard now (so an older
        attempt still running somewhere fails its fence); False if the lease is no longer this driver's."""
        current = read_lease(self.out_dir, stem)
        if stem not in self.held or current is None or current.owner != self.owner:
            self.held.pop(stem, None)
            return False
        if current.attempt != attempt:
            self.held[stem] = attempt
            atomic_write(lease_path(self.out_dir, stem), json.dumps(asdict(self._lease(stem, attempt))))
        return True

    def fence(self, stem: str) -> Callable[[], None]:
        """The commit fence of the attempt this driver holds the shard for (`lease_fence`); one that always
        fails when the lease was dropped meanwhile (a renewal found it taken over)."""
        return lease_fence(self.out_dir, stem, self.owner, self.held.get(stem, -1))

    def renew_due(self) -> None:
        """Renews every held lease if a third of the lease time has passed since the last renewal."""
        if time.monotonic() - self._renewed >= self.ttl_s / 3:
            self.renew()

    def renew(self) -> None:
        """Pushes the expiry of every held lease forward; a lease someone else took over is dropped."""
        self._renewed = time.monotonic()
        for stem, attempt in list(self.held.items()):
            current = read_lease(self.out_dir, stem)
            if current is None or current.owner != self.owner:
                log.warning("lease of shard %s was taken over by %s; another driver redoes it", stem,
                            current.owner if current else "nobody")
                del self.held[stem]
                continue
            atomic_write(lease_path(self.out_dir, stem), json.dumps(asdict(self._lease(stem, attempt))))

    def release(self, stem: str) -> None:
        """Gives the lease up (the shard is done, or failed for good)."""
        if self.held.pop(stem, None) is None:
            return
        current = read_lease(self.out_dir, stem)
        if current is not None and current.owner == self.owner:
            lease_path(self.out_dir, stem).unlink(missing_ok=True)

    def release_all(self) -> None:
        for stem in list(self.held):
            self.release(stem)


def record_failure(out_dir: Path, stem: str, cause: str, owner: str) -> None:
    """`OUT/failed/{stem}.json`: why a driver gave the shard up, for whoever writes the summary."""
    path = failure_path(out_dir, stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"stem": stem, "cause": cause, "owner": owner, "time": time.time()}))


def clear_failure(out_dir: Path, stem: str) -> None:
    failure_path(out_dir, stem).unlink(missing_ok=True)


def recorded_failures(out_dir: Path, stems: list[str], done: Container[str] | None = None) -> dict[str, str]:
    """stem -> cause for the shards that have a failure record and no done marker. `done`: the stems known
    to be done and intact (their records are not read), else each is checked."""
    failed = {}
    for stem in stems:
        if done is not None and stem in done:
            continue
        try:
            record = json.loads(failure_path(out_dir, stem).read_text())
        except (OSError, ValueError):
            continue
        if done is not None or not is_intact(out_dir, stem):
            failed[stem] = str(record.get("cause", "unknown"))
    return failed


def remove_stale_temporaries_by_age(out_dir: Path, max_age_s: float) -> int:
    """Deletes temporaries (`.NAME.*.tmp`) under shards/, stats/, leases/ and failed/ older than `max_age_s`
    whose shard has no live lease: what crashed attempts and killed drivers left behind. Returns how many
    were removed."""
    removed = 0
    now = time.time()
    for folder in ("shards", "stats", "leases", "failed"):
        for tmp in (Path(out_dir) / folder).glob(f".*{TMP_SUFFIX}"):
            final_name = tmp.name[1:].rsplit(".", 3)[0]   # .{stem}.tar.{pid}.{random}.tmp -> {stem}.tar
            stem = final_name.rsplit(".", 1)[0]
            try:
                old = now - tmp.stat().st_mtime > max_age_s
            except FileNotFoundError:
                continue
            if old and live_lease(out_dir, stem) is None:
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed
