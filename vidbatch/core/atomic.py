"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one.

Every file vidbatch publishes (shards, stats, done markers, cache entries, the report, configs) is
written under a unique temporary name in its final directory, flushed and fsynced, renamed into
place, and the directory is fsynced so the rename survives a crash. A failed write removes its
temporary. Published files have mode 0666 minus the umask (not mkstemp's 0600), also when a
library wrote them with a mode of its own (safetensors writes 0600), so files in a shared folder
(the inversion cache, an output) stay readable by the group as the user's umask says.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".tmp"
# A temporary this old belongs to a writer that was killed (a write takes seconds to minutes).
STALE_TMP_SECONDS = 3600.0


def temporary_path(path: str | Path) -> Path:
    """A unique hidden sibling of `path` for writing it: `.{name}.{pid}.{random}.tmp`.

    The pid and a random part keep two writers (processes, threads, drivers) from ever sharing one.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


def remove_stale_temporaries(final: str | Path, older_than_s: float = STALE_TMP_SECONDS) -> list[Path]:
    """Removes what killed writers of `final` left beside it: `.{name}.*.tmp` files or folders (and
    `.{name}.old-*` folders of a folder swap) not modified for `older_than_s`. Returns what it removed.

    A writer that fails with an exception removes its own temporary; this is for one that was killed
    (SIGKILL, a node lost). By age, not by pid: a writer on another host may share the folder.
    """
    final = Path(final)
    removed = []
    now = time.time()
    for pattern in (f".{final.name}.*{TMP_SUFFIX}", f".{final.name}.old-*"):
        for path in final.parent.glob(pattern):
            try:
                if now - path.lstat().st_mtime < older_than_s:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError:   # gone meanwhile, or not ours to remove: leave it
                continue
            removed.append(path)
    return removed


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


def umask_file_mode() -> int:
    """0666 minus the process umask: the mode `open()` gives a new file."""
    mask = umask_from_proc()
    return 0o666 & ~(mask if mask is not None else umask_by_setting())


def umask_from_proc() -> int | None:
    """The process umask as /proc shows it (Linux), None where it cannot be read. Preferred because it
    leaves the umask alone: setting it to read it is process-wide and races other threads' new files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


def umask_by_setting() -> int:
    """The process umask, read the portable way: set to some value and put back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write `final` through (for libraries that take a path, e.g. safetensors).

    On normal exit the file at the temporary path gets the umask's mode (`umask_file_mode`) and is
    published as `final`; on an exception it is removed.
    """
    tmp = temporary_path(final)
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, umask_file_mode())
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
