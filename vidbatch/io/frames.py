"""A clip's frames in a raw file on local disk, written in order and read a window at a time.

A 10,000-frame clip at 512 px is 7.9 GB of uint8 frames; held as one array (and again as the
edited frames, and again in float for the VAE) it would not fit a worker's host memory. A
`FrameFile` keeps them on disk instead: decoding appends windows as ffmpeg produces them, the VAE,
the encoder and the metrics read windows, so host memory is bounded by the window, not the clip.

It reads like a `(T, H, W, C)` uint8 array where that is cheap: `shape`, `len`, integer, slice and
index-array indexing (each a copy of just those frames, read with `pread`, so the file is never
mapped into the process: mapped pages would count as the process's memory), and iteration frame
by frame. `np.asarray(frame_file)` reads the whole clip: meant for short clips and tests.

The file lives in the folder given (the system's temporary folder by default) and is removed when
the object is closed or garbage-collected. Pickling hands the file over (a DataLoader worker
decodes, the main process edits): the unpickled object owns and removes it, the sender no longer does.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = ["FrameFile", "frame_windows"]

# Frames read at a time by `windows` and iteration: ~25 MB at 512 px, ~0.8 MB at 64 px.
WINDOW = 32


def _remove(fd: int, path: str) -> None:
    """Close and remove a frame file (a finaliser: must not raise)."""
    try:
        os.close(fd)
    except OSError:
        pass
    try:
        os.unlink(path)
    except OSError:
        pass


class FrameFile:
    """`(T, H, W, C)` uint8 frames in a raw file: `append` windows in order, read any frames back."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, height: int, width: int, channels: int = 3, directory: str | Path | None = None):
        if height < 1 or width < 1 or channels < 1:
            raise ValueError(f"a frame must have a positive size, got {height}x{width}x{channels}")
        self.frame_shape = (int(height), int(width), int(channels))
        self.frame_bytes = int(np.prod(self.frame_shape))
        fd, path = tempfile.mkstemp(prefix="vidbatch-frames-", suffix=".rgb", dir=directory)
        self._open(fd, path, count=0)

    def _open(self, fd: int, path: str, count: int) -> None:
        self.path, self._fd, self._count = path, fd, count
        self._finalizer = weakref.finalize(self, _remove, fd, path)

    @classmethod
    def from_array(cls, frames: np.ndarray, directory: str | Path | None = None) -> "FrameFile":
        """A frame file holding a copy of `frames` `(T, H, W, C)` uint8."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be (T, H, W, C) uint8, got shape {frames.shape} dtype {frames.dtype}")
        out = cls(*frames.shape[1:], directory=directory)
        out.append(frames)
        return out

    # -- the array-like surface ----------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self._count, *self.frame_shape)

    @property
    def nbytes(self) -> int:
        return self._count * self.frame_bytes

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"FrameFile(shape={self.shape}, path={self.path!r})"

    def __getitem__(self, index: int | slice | np.ndarray | list[int]) -> np.ndarray:
        """Frame `index` `(H, W, C)`, or frames `(n, H, W, C)` for a slice or an index array (a copy)."""
        if isinstance(index, (int, np.integer)):
            i = int(index) + (self._count if index < 0 else 0)
            if not 0 <= i < self._count:
                raise IndexError(f"frame {index} out of range for {self._count} frames")
            return self._read(i, 1)[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(self._count)
            if step == 1:
                return self._read(start, max(0, stop - start))
            return self._take(np.arange(start, stop, step))
        return self._take(np.asarray(index))

    def __iter__(self) -> Iterator[np.ndarray]:
        for window in self.windows():
            yield from window

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        frames = self._read(0, self._count)
        return frames if dtype is None else frames.astype(dtype, copy=False)

    def windows(self, size: int = WINDOW) -> Iterator[np.ndarray]:
        """The frames in order, `size` at a time: `(n <= size, H, W, C)` arrays."""
        for start in range(0, self._count, size):
            yield self._read(start, min(size, self._count - start))

    # -- writing and reading -----------------------------------------------------------------

    def append(self, frames: np.ndarray) -> None:
        """Adds `(n, H, W, C)` uint8 frames at the end."""
        frames = np.asarray(frames)
        if frames.shape[1:] != self.frame_shape or frames.dtype != np.uint8:
            raise ValueError(f"expected frames of shape (n, {', '.join(map(str, self.frame_shape))}) uint8, "
                             f"got {frames.shape} {frames.dtype}")
        self.append_bytes(memoryview(np.ascontiguousarray(frames)).cast("B"))

    def append_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Adds whole frames given as raw bytes (rgb24 as ffmpeg writes them)."""
        view = memoryview(data).cast("B")
        if len(view) % self.frame_bytes:
            raise ValueError(f"{len(view)} bytes is not a whole number of {self.frame_bytes}-byte frames")
        offset = self.nbytes
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written
        self._count = offset // self.frame_bytes

    def _read(self, start: int, count: int) -> np.ndarray:
        out = np.empty((count, *self.frame_shape), dtype=np.uint8)
        buffer = memoryview(out).cast("B")
        offset, done = start * self.frame_bytes, 0
        while done < len(buffer):
            got = os.preadv(self._fd, [buffer[done:]], offset + done)
            if got == 0:
                raise OSError(f"{self.path}: ended after {(offset + done) // self.frame_bytes} frames")
            done += got
        return out

    def _take(self, indices: np.ndarray) -> np.ndarray:
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        indices = np.where(indices < 0, indices + self._count, indices)
        if indices.size and (indices.min() < 0 or indices.max() >= self._count):
            raise IndexError(f"frame index out of range for {self._count} frames")
        out = np.empty((len(indices), *self.frame_shape), dtype=np.uint8)
        for row, i in enumerate(indices.tolist()):
            out[row] = self._read(i, 1)[0]
        return out

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Removes the file now (reading afterwards raises)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __getstate__(self) -> dict:
        """Hands the file over to whoever unpickles it: this object stops removing it."""
        if self.closed:
            raise ValueError("cannot pickle a closed FrameFile")
        self._finalizer.detach()
        os.close(self._fd)
        self._fd = -1  # a later read here fails (EBADF) instead of reading whatever reuses the number
        return {"path": self.path, "count": self._count, "frame_shape": self.frame_shape}

    def __setstate__(self, state: dict) -> None:
        self.frame_shape = tuple(state["frame_shape"])
        self.frame_bytes = int(np.prod(self.frame_shape))
        self._open(os.open(state["path"], os.O_RDWR), state["path"], state["count"])


def frame_windows(frames: np.ndarray | FrameFile, size: int = WINDOW) -> Iterator[np.ndarray]:
    """`frames` `(T, H, W, C)` in order, `size` at a time: from an array (views) or a `FrameFile` (reads)."""
    if isinstance(frames, FrameFile):
        yield from frames.windows(size)
        return
    for start in range(0, len(frames), size):
        yield frames[start:start + size]
