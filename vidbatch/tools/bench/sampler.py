"""Peak memory of a block: CUDA's counters on a GPU, a sampling thread over the resident set on a CPU."""

from __future__ import annotations

import os
import resource
import sys
import threading

import torch

from vidbatch.tools.bench.device import sync


def _rss_bytes() -> int | None:
    """The process's current resident set in bytes (Linux /proc), or None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakMemory:
    """Peak memory while a `with` block runs, and what was held when it started.

    CUDA: ``memory_allocated`` at entry and ``max_memory_allocated`` over the block (the peak counter is
    reset at entry). CPU: the resident set at entry and its maximum over the block, sampled by a thread
    every `interval_s`; where the block set a new process-wide ``ru_maxrss`` that exact figure wins (a
    sampler can miss a short spike, ``ru_maxrss`` cannot, but it also remembers model loading).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device = device
        self.interval_s = interval_s
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._maxrss_at_start = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = self.peak_bytes = torch.cuda.memory_allocated(self.device)
            return self
        self._maxrss_at_start = _maxrss_bytes()
        self.baseline_bytes = self.peak_bytes = _rss_bytes() or self._maxrss_at_start
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="vidbatch-bench-rss", daemon=True)
        self._thread.start()
        return self

    def sample(self) -> None:
        """Take one reading now (the sampler thread also calls this)."""
        if self.device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
            return
        rss = _rss_bytes()
        if rss is not None and rss > self.peak_bytes:
            self.peak_bytes = rss

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, _rss_bytes() or 0)
        maxrss = _maxrss_bytes()
        if maxrss > self._maxrss_at_start:  # the block itself set the process's record: exact
            self.peak_bytes = max(self.peak_bytes, maxrss)
