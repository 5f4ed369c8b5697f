"""This driver's share of a plan: shards handed out through leases, so drivers pull work from one plan.

Every driver of an output plans the same shards. `SharedWork` walks them in the driver's order (an
array task starts with its own slice, `--shard-index` of `--num-shards`, then helps with the rest)
and hands out a shard only once this driver holds its lease; a shard another driver holds is skipped
and looked at again later (taken over when its lease expires), a shard someone finished meanwhile is
dropped. A driver stops when nothing is left that it could claim; the one that finishes the last
shard writes the summary and the report (`report.finalize`).

An attempt whose commit fence found the lease lost (`dispatch.leases.lease_fence`) published nothing;
the shard goes back to this driver's pending list (`lost`): it is done by whoever holds it now, or
claimed again here once it is free (its lease merely expired). After MAX_LEASE_LOSSES such losses the
driver gives the shard up as failed: its leases keep expiring before its commits (a `runtime.lease_s`
too short for the filesystem, or a Ray node whose clock is far off the driver's).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Container, Iterator, Sequence

from vidbatch.dispatch.leases import LeaseBook, clear_failure, failure_path, live_lease, record_failure
from vidbatch.dispatch.plan import RunPlan
from vidbatch.io.shard_check import intact_marker, is_intact

log = logging.getLogger("vidbatch")

# Lost leases of one shard after which this driver gives it up (a rerun continues it).
MAX_LEASE_LOSSES = 3


class SharedWork:
    """The shards of `plan.todo` still to do, claimed one at a time through `book`."""

    def __init__(self, plan: RunPlan, out_dir: Path, book: LeaseBook, deadline: float | None = None):
        """`deadline` (unix time, `runtime.deadline`): no shard is started that would likely end after it,
        judged by the longest shard done so far (`stopped` then says why)."""
        self.plan = plan
        self.out_dir = Path(out_dir)
        self.book = book
        self.pending: list[int] = list(plan.todo)   # not claimed by this driver yet, in order
        self.deadline = deadline
        self.started = time.time()
        self.claims = 0
        self.longest: float | None = None  # seconds of the longest done shard (read only with a deadline)
        if deadline is not None:
            markers = (intact_marker(self.out_dir, stem) for stem in plan.stems)
            self.longest = max((m.seconds for m in markers if m is not None), default=None)
        self.stopped: str | None = None
        self.never_fits = False
        self.losses: dict[int, int] = {}   # plan index -> lost leases of this driver's attempts

    def _fits_before_deadline(self) -> bool:
        """Whether a shard as long as the longest done so far still ends before the deadline."""
        if self.deadline is None or self.longest is None:
            return True
        left = self.deadline - time.time()
        if left >= self.longest:
            return True
        if self.stopped is None:
            self.never_fits = self.claims == 0 and self.longest > self.deadline - self.started
            self.stopped = (f"not starting another shard: the longest so far took {self.longest:.0f}s and "
                            f"{max(0.0, left):.0f}s are left before runtime.deadline")
            if self.never_fits:
                self.stopped += ("; that is more than this job's whole time: raise its time limit or make the "
                                 "shards smaller")
            log.warning("%s", self.stopped)
        return False

    def still_todo(self, index: int) -> bool:
        """Not finished by anyone yet (a --retry-failed shard: its marker still counts failed samples;
        with --overwrite every shard of the plan is to do)."""
        stem = self.plan.stems[index]
        if self.plan.overwrite:
            return True
        if index in self.plan.retry:
            marker = intact_marker(self.out_dir, stem)
            return marker is None or marker.samples_failed > 0 or marker.rows_failed > 0
        return not is_intact(self.out_dir, stem)

    def claim_next(self) -> int | None:
        """Claims and returns the first pending shard nobody else holds; None when there is none now.
        Shards finished by another driver meanwhile are dropped from `pending`."""
        for index in list(self.pending):
            if not self.still_todo(index):
                self.pending.remove(index)
            elif not self._fits_before_deadline():
                return None
            elif self.book.claim(self.plan.stems[index]):
                self.pending.remove(index)
                self.claims += 1
                return index
        return None

    def held_elsewhere(self) -> list[int]:
        """Pending shards another driver holds a live lease on."""
        return [i for i in self.pending if live_lease(self.out_dir, self.plan.stems[i]) is not None]

    def finished(self, index: int) -> None:
        marker = intact_marker(self.out_dir, self.plan.stems[index])
        if marker is not None:
            self.longest = max(self.longest or 0.0, marker.seconds)
        clear_failure(self.out_dir, self.plan.stems[index])
        self.book.release(self.plan.stems[index])

    def failed(self, index: int, cause: str) -> None:
        record_failure(self.out_dir, self.plan.stems[index], cause, self.book.owner)
        self.book.release(self.plan.stems[index])

    def lost(self, index: int, cause: str) -> bool:
        """This driver's attempt lost the shard's lease and published nothing: the lease is given up (if
        it is still this driver's, it expired) and the shard goes back to pending, to be claimed again
        when free. Returns False, with the shard recorded failed, after MAX_LEASE_LOSSES losses."""
        self.losses[index] = self.losses.get(index, 0) + 1
        if self.losses[index] >= MAX_LEASE_LOSSES:
            self.failed(index, f"{cause} ({self.losses[index]} times: is runtime.lease_s long enough?)")
            return False
        self.book.release(self.plan.stems[index])
        self.pending.append(index)
        return True

    def claimed(self) -> Iterator[int]:
        """Claims shard after shard for a driver that runs one at a time (the local backend); stops when
        nothing is left but shards other drivers hold."""
        while True:
            index = self.claim_next()
            if index is None:
                return
            yield index


@contextmanager
def renewing(book: LeaseBook) -> Iterator[None]:
    """Renews `book`'s leases from a thread while the block runs (the local backend's shard blocks)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(book.ttl_s / 3):
            book.renew()

    thread = threading.Thread(target=loop, name="vidbatch-leases", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def unfinished_stems(out_dir: Path, stems: Sequence[str], done: Container[str] | None = None) -> dict[str, str]:
    """Shards that are neither done nor given up: stem -> why (held by a driver, or never started).
    `done`: the stems known to be done and intact (one pass over the output made it), else each is checked."""
    unfinished = {}
    for stem in stems:
        if stem in done if done is not None else is_intact(out_dir, stem):
            continue
        lease = live_lease(out_dir, stem)
        if lease is not None:
            unfinished[stem] = f"in progress: driver {lease.owner} holds it until {time.ctime(lease.expires)}"
        elif not failure_path(out_dir, stem).exists():
            unfinished[stem] = "not processed yet"
    return unfinished
