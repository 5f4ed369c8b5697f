"""Model weights staged to node-local disk once per node (`model.stage_local`).

Sixty-four workers that each read a 2-5 GB model from a shared filesystem at start load it 64 times over the
network, all at once. Staged, each node copies it once into `{runtime.local_dir}/vidbatch-models/<fingerprint>/`
and every worker of the node loads that copy.

- The fingerprint names the source by what it is now: its resolved path and every file's relative path, size
  and modification time (stat only, no reading). A model replaced in place gets a new copy; the old copy stays
  until the scratch folder is cleaned (on SLURM: at the end of the job).
- The copy is written under a temporary name in the same folder and renamed into place when complete, so a
  copy that exists is whole. Workers of one node take an exclusive `flock` on `<fingerprint>.lock` while
  copying: the first copies, the others wait and then use its copy. A copier that dies releases the lock
  with its process; the next one removes the dead temporary and copies again. `flock` is only reliable on
  local disks, which is what the scratch folder is for.
- `auto` stages only what is on a network filesystem (the mount table says which), and loads in place when
  the local disk lacks room; `always` stages every local path and fails when it does not fit.

Hub ids are not staged: they load from the Hugging Face cache, which `HF_HOME` (or `HF_HUB_CACHE`) can put on
local disk.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vidbatch.core.atomic import fsync_dir, remove_stale_temporaries, temporary_path
from vidbatch.core.errors import ModelLoadError

__all__ = ["NETWORK_FILESYSTEMS", "STAGE_MODES", "StagedModel", "filesystem_type", "source_fingerprint", "stage_model"]

log = logging.getLogger(__name__)

STAGE_MODES = ("auto", "always", "never")
STAGED_FOLDER = "vidbatch-models"
_MARKER = "vidbatch-staged.json"  # written into the copy last, before the rename: what was copied from where
# Headroom kept free on the local disk beyond the copy itself (the inversion cache and the job need some too).
_FREE_MARGIN_BYTES = 1 << 30

# Mount types whose reads go over the network: `auto` stages models found on them.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "panfs", "afs",
    "9p", "wekafs", "orangefs", "pvfs2", "davfs", "fuse.ceph", "fuse.glusterfs", "fuse.sshfs", "fuse.s3fs",
    "fuse.gcsfuse", "fuse.juicefs", "fuse.mountpoint-s3", "fuse.rclone", "fuse.beegfs", "fuse.weka",
})


@dataclass(frozen=True)
class StagedModel:
    """Where to load a model from: `path` (the staged copy, or the source itself when not staged);
    `copied` says whether this call made the copy."""

    path: Path
    copied: bool


def filesystem_type(path: str | os.PathLike[str], mounts: str = "/proc/self/mounts") -> str | None:
    """The filesystem type of the mount holding `path` (e.g. 'ext4', 'nfs4', 'lustre'), from the mount
    table: the longest mount point that contains it. None where there is no mount table (not Linux)."""
    try:
        text = Path(mounts).read_text()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, best_type = "", None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # The table escapes spaces, tabs, newlines and backslashes in mount points as octal (\040).
        point = fields[1].encode("latin-1").decode("unicode_escape")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type


def _files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    return sorted(p for p in source.rglob("*") if p.is_file())


def source_fingerprint(source: Path) -> str:
    """32 hex chars naming the staged copy of `source`: its resolved path and each file's relative path,
    size and mtime (stat only: fingerprinting a 5 GB model must not read it)."""
    source = source.resolve()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{source}\n".encode())
    for path in _files(source):
        st = path.stat()
        rel = path.name if path == source else path.relative_to(source).as_posix()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _is_under(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def stage_model(source: str | os.PathLike[str], mode: str, local: str | os.PathLike[str], label: str) -> StagedModel:
    """The path to load the model at `source` (a folder or a single file) from, staging it first when `mode`
    says so (see the module docstring). `local` is the node's scratch folder; `label` names the model in
    errors and logs (the user's `model.id`).

    Raises:
        ModelLoadError: `mode` is 'always' and the copy cannot be made (no room, an I/O error).
        ValueError: `mode` is not one of STAGE_MODES.
    """
    if mode not in STAGE_MODES:
        raise ValueError(f"model.stage_local must be one of {', '.join(STAGE_MODES)}, got {mode!r}")
    source, local = Path(source), Path(local)
    if mode == "never" or _is_under(source, local):
        return StagedModel(source, False)
    if mode == "auto":
        fstype = filesystem_type(source)
        if fstype not in NETWORK_FILESYSTEMS:
            return StagedModel(source, False)
    root = local / STAGED_FOLDER
    final = root / source_fingerprint(source)
    target = final / source.resolve().name
    if (final / _MARKER).is_file():
        return StagedModel(target, False)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _node_lock(root / f"{final.name}.lock", label):
            if (final / _MARKER).is_file():  # another worker of this node copied it while we waited
                return StagedModel(target, False)
            _copy(source, final, target, mode, label)
    except _NoRoom as exc:
        if mode == "always":
            raise ModelLoadError(f"model.id '{label}': cannot stage it to {root}: {exc}. Fix: free space there, "
                                 "set runtime.local_dir to a larger local disk, or model.stage_local=auto|never") from None
        log.warning("model %s: not staged to local disk (%s); loading it in place", label, exc)
        return StagedModel(source, False)
    except OSError as exc:
        if mode == "always":
            raise ModelLoadError(f"model.id '{label}': staging it to {root} failed ({exc}). Fix: check that "
                                 "runtime.local_dir is a writable local folder, or model.stage_local=auto|never") from exc
        log.warning("model %s: staging to %s failed (%s); loading it in place", label, root, exc)
        return StagedModel(source, False)
    return StagedModel(target, True)


class _NoRoom(Exception):
    """The local disk has not enough free space for the copy."""


class _node_lock:
    """An exclusive `flock` on `path`, held for the `with` block (released by the kernel if we die)."""

    def __init__(self, path: Path, label: str) -> None:
        self.path, self.label, self.fd = path, label, -1

    def __enter__(self) -> "_node_lock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("model %s: another process of this node is staging it; waiting for its copy", self.label)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _copy(source: Path, final: Path, target: Path, mode: str, label: str) -> None:
    """Copy `source` to `target` inside `final`, via a temporary folder renamed into place. Called with the
    node lock held, so temporaries of `final` left behind belong to copiers that died."""
    files = _files(source)
    size = sum(p.stat().st_size for p in files)
    free = shutil.disk_usage(final.parent).free
    if free < size + _FREE_MARGIN_BYTES:
        raise _NoRoom(f"{size / 1e9:.2f} GB to copy, {free / 1e9:.2f} GB free (keeping "
                      f"{_FREE_MARGIN_BYTES / 2**30:.0f} GiB spare)")
    remove_stale_temporaries(final, older_than_s=0.0)
    tmp = temporary_path(final)
    started = time.perf_counter()
    try:
        tmp.mkdir()
        inner = tmp / target.name
        if source.is_dir():
            shutil.copytree(source, inner, symlinks=False)  # symlinks (hub-cache style folders) are followed
        else:
            shutil.copy2(source, inner)
        for path in (p for p in tmp.rglob("*") if p.is_file()):
            with open(path, "rb") as f:  # durable before the rename makes the copy visible as complete
                os.fsync(f.fileno())
        marker = {"source": str(source.resolve()), "bytes": size, "files": len(files), "mode": mode,
                  "staged": time.time()}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1))
        if final.exists():  # a folder without the marker: not a complete copy (we hold the lock)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("model %s: staged %.2f GB to %s in %.1f s", label, size / 1e9, final, time.perf_counter() - started)
