"""Progress of a run: rich bars on a terminal, plain periodic status lines otherwise and in the log.

The log file always gets plain lines (one every `every_s` seconds, plus shard events), so a SLURM
job's log and `OUT/run.log` tell how far a run is without a terminal. Only the driver draws: with the
Ray backend, workers send per-video events that the driver feeds in here (`video_done`, `adjust`).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger("vidbatch")


def setup_logging(log_file: Path | None, console: Console) -> None:
    """Plain timestamped lines to `log_file`; warnings and errors also to the console (stderr)."""
    logger = logging.getLogger("vidbatch")
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    stream = logging.StreamHandler(sys.stderr)
    stream.setLevel(logging.WARNING)
    stream.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(stream)
    logger.propagate = False


class RunProgress:
    """Counts shards, videos and frames; draws bars on a terminal, writes status lines otherwise."""

    def __init__(self, total_shards: int, console: Console, every_s: float = 30.0):
        self.total_shards = total_shards
        self.console = console
        self.every_s = every_s
        self.shards_done = 0
        self.shards_failed = 0
        self.videos = 0
        self.videos_failed = 0
        self.frames = 0
        self.retries = 0
        self.workers: tuple[int, int] | None = None  # (ready, wanted), Ray backend only
        self.detail = ""  # Ray backend: per-worker throughput, memory and stall warnings, set by the driver
        self._started = time.monotonic()
        self._last_line = self._started
        self._bars: Progress | None = None
        if console.is_terminal:
            self._bars = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console, transient=False)
            self._shard_task = self._bars.add_task("shards", total=total_shards, rate="")
            self._video_task = self._bars.add_task("videos", total=None, rate="")

    def __enter__(self) -> "RunProgress":
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()

    def status_line(self) -> str:
        elapsed = time.monotonic() - self._started
        fps = self.frames / elapsed if elapsed > 0 else 0.0
        eta = ""
        finished = self.shards_done + self.shards_failed
        if 0 < finished < self.total_shards:
            eta = f", eta {elapsed / finished * (self.total_shards - finished):.0f}s"
        retried = f", {self.retries} retried" if self.retries else ""
        workers = f"; workers {self.workers[0]}/{self.workers[1]}" if self.workers is not None else ""
        return (f"progress: shards {self.shards_done}/{self.total_shards} done, {self.shards_failed} failed"
                f"{retried}; videos {self.videos} ({self.videos_failed} failed); {self.frames} frames, "
                f"{fps:.2f} frames/s; elapsed {elapsed:.0f}s{eta}{workers}{f' ({self.detail})' if self.detail else ''}")

    def _tick(self, force: bool = False) -> None:
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
        """Redraws, and writes a status line if `every_s` has passed: call it periodically while waiting."""
        self._tick()

    def video_done(self, frames: int, ok: bool) -> None:
        self.videos += 1
        self.videos_failed += 0 if ok else 1
        self.frames += frames
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
