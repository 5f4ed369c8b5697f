"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one.

Every file vidbatch publishes (shards, stats, done markers, cache entries, the report, configs) is
written under a unique temporary name in its final directory, flushed and fsynced, renamed into
place, and the directory is fsynced so the rename survives a crash. A failed write removes its
temporary. Temporaries are created with mode 0666 minus the umask (not mkstemp's 0600), so files
in a shared folder stay readable by the group as the user's umask says.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".tmp"


def temporary_path(path: str | Path) -> Path:
    """A unique hidden sibling of `path` for writing it: `.{name}.{pid}.{random}.tmp`.

    The pid and a random part keep two writers (processes, threads, drivers) from ever sharing one.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


def fsync_dir(directory: str | Path) -> None:
    """Makes a rename in `directory` durable; best effort (some filesystems refuse to fsync a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: str | Path, final: str | Path) -> None:
    """Moves a complete file `tmp` (written by us or a library) to `final`: fsync, rename, fsync the folder."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # the data must be on disk before the name points at it
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write `final` through (for libraries that take a path, e.g. safetensors).

    On normal exit the file at the temporary path is published as `final`; on an exception it is removed.
    """
    tmp = temporary_path(final)
    try:
        yield tmp
        publish(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_open(final: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """`open(final, mode)` that publishes the file only when the block ends without an exception."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(final) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with open(fd, mode, encoding=encoding if mode == "w" else None) as f:
            yield f
            f.flush()


def atomic_write(final: str | Path, data: bytes | str, encoding: str = "utf-8") -> None:
    """Writes `data` (bytes, or text in `encoding`) to `final` atomically."""
    payload = data.encode(encoding) if isinstance(data, str) else data
    with atomic_open(final, "wb") as f:
        f.write(payload)
