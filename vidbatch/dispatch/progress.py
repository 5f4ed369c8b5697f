"""Progress of a run: rich bars on a terminal, and a plain status line every `every_s` seconds.

The status line goes to the log file (`OUT/run.log`) always, and to the console when it is not a
terminal (SLURM logs, pipes), from a timer thread: a line comes every `every_s` even while one long
video is being edited. It gives the known totals (videos are counted from the local shards' headers
before the run; `pipe:` shards are not), an ETA, and where the current video is (inversion or edit
step). Only the driver draws: with the Ray backend, workers send per-video and per-step events that
the driver feeds in here (`video_done`, `video_step`, `adjust`).
"""

from __future__ import annotations

import logging
import threading
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vidbatch.dispatch.logs import setup_logging

__all__ = ["RunProgress", "setup_logging"]

log = logging.getLogger("vidbatch")


class RunProgress:
    """Counts shards, videos and frames; draws bars on a terminal, writes status lines every `every_s`."""

    def __init__(self, total_shards: int, console: Console, every_s: float = 30.0, total_videos: int | None = None):
        self.total_shards = total_shards
        self.total_videos = total_videos
        self.console = console
        self.every_s = every_s
        self.shards_done = 0
        self.shards_failed = 0
        self.videos = 0
        self.videos_failed = 0
        self.frames = 0
        self.retries = 0
        self.lost = 0   # attempts whose lease was lost (another driver owns the shard): not done, not failed
        self.workers: tuple[int, int] | None = None  # (ready, wanted), Ray backend only
        self.current: tuple[str, str, int, int] | None = None  # (video key, stage, done, total)
        self.detail = ""  # Ray backend: per-worker throughput, memory and stall warnings, set by the driver
        self._started = time.monotonic()
        self._last_line = self._started
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._bars: Progress | None = None
        if console.is_terminal:
            self._bars = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console, transient=False)
            self._shard_task = self._bars.add_task("shards", total=total_shards, rate="")
            self._video_task = self._bars.add_task("videos", total=total_videos, rate="")
            self._step_task = self._bars.add_task("current video", total=None, rate="")

    def __enter__(self) -> "RunProgress":
        if self._bars is not None:
            self._bars.start()
        self._timer = threading.Thread(target=self._every, name="vidbatch-progress", daemon=True)
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join(timeout=5)
        if self._bars is not None:
            self._bars.stop()

    def _every(self) -> None:
        while not self._stop.wait(min(self.every_s, 1.0)):
            self._tick()

    def eta_s(self) -> float | None:
        """Seconds left: from the video rate when the total is known, else from the shard rate."""
        elapsed = time.monotonic() - self._started
        if self.total_videos and 0 < self.videos < self.total_videos:
            return elapsed / self.videos * (self.total_videos - self.videos)
        finished = self.shards_done + self.shards_failed
        if 0 < finished < self.total_shards:
            return elapsed / finished * (self.total_shards - finished)
        return None

    def status_line(self) -> str:
        elapsed = time.monotonic() - self._started
        fps = self.frames / elapsed if elapsed > 0 else 0.0
        eta = self.eta_s()
        retried = f", {self.retries} retried" if self.retries else ""
        retried += f", {self.lost} lease(s) lost" if self.lost else ""
        workers = f"; workers {self.workers[0]}/{self.workers[1]}" if self.workers is not None else ""
        of_videos = f"/{self.total_videos}" if self.total_videos is not None else ""
        now = ""
        if self.current is not None:
            key, stage, done, total = self.current
            now = f"; now {key}: {stage} {done}/{total}"
        return (f"progress: shards {self.shards_done}/{self.total_shards} done, {self.shards_failed} failed"
                f"{retried}; videos {self.videos}{of_videos} ({self.videos_failed} failed); {self.frames} frames, "
                f"{fps:.2f} frames/s{now}; elapsed {elapsed:.0f}s"
                f"{f', eta {eta:.0f}s' if eta is not None else ''}{workers}{f' ({self.detail})' if self.detail else ''}")

    def _tick(self, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if self._bars is not None:
                elapsed = now - self._started
                rate = f"{self.frames / elapsed:.2f} frames/s" if elapsed > 0 else ""
                self._bars.update(self._shard_task, completed=self.shards_done + self.shards_failed)
                self._bars.update(self._video_task, completed=self.videos, rate=rate)
            if force or now - self._last_line >= self.every_s:
                self._last_line = now
                line = self.status_line()
                log.info(line)
                if self._bars is None:
                    self.console.print(line, highlight=False, soft_wrap=True)

    def tick(self) -> None:
        """Redraws, and writes a status line if `every_s` has passed."""
        self._tick()

    def video_done(self, frames: int, ok: bool) -> None:
        self.videos += 1
        self.videos_failed += 0 if ok else 1
        self.frames += frames
        self.current = None
        self._tick()

    def video_step(self, key: str, stage: str, done: int, total: int) -> None:
        """Where the current video is: `stage` ('invert' or 'edit NAME') at step `done` of `total`."""
        self.current = (key, stage, done, total)
        if self._bars is not None:
            self._bars.update(self._step_task, description=f"{key}: {stage}", completed=done, total=total)
        self._tick()

    def shard_done(self, stem: str, ok: bool) -> None:
        if ok:
            self.shards_done += 1
        else:
            self.shards_failed += 1
        log.info("shard %s %s", stem, "done" if ok else "FAILED")
        self._tick(force=True)

    def adjust(self, videos: int = 0, videos_failed: int = 0, frames: int = 0) -> None:
        """Corrects the counts (negative to take back the videos of a shard attempt that is redone)."""
        self.videos += videos
        self.videos_failed += videos_failed
        self.frames += frames
        self._tick()

    def shard_lost(self, stem: str, cause: str) -> None:
        """An attempt found the shard's lease lost at its commit and published nothing: not a failure (the
        shard is another driver's now, or is claimed again here once free)."""
        self.lost += 1
        log.warning("shard %s: %s", stem, cause)
        self._tick(force=True)

    def shard_retry(self, stem: str, cause: str, attempt: int, max_retries: int) -> None:
        """A shard attempt was lost (worker died or the shard raised) and the shard is given out again."""
        self.retries += 1
        log.warning("shard %s attempt %d failed (%s); giving it out again (retry %d of %d)",
                    stem, attempt + 1, cause, attempt + 1, max_retries)
        self._tick(force=True)

    def set_workers(self, ready: int, wanted: int) -> None:
        """Ray backend: how many workers are up, shown in the status line and the shards bar."""
        if self.workers == (ready, wanted):
            return
        self.workers = (ready, wanted)
        log.info("workers: %d of %d ready", ready, wanted)
        if self._bars is not None:
            self._bars.update(self._shard_task, description=f"shards ({ready}/{wanted} workers)")
        self._tick(force=True)
