"""Content-addressed on-disk store of DDIM inversion results.

Inversion costs as much as the edit itself, and bulk stylisation applies many styles to the same clips
(and reruns jobs), so each inversion is computed once and kept here, keyed by what determines it:
the decoded frames' content and the inversion settings (`inversion_key`).

By default the store lives on node-local disk (`{runtime.local_dir}/vidbatch-inversions`); an explicit
`inversion.cache_dir` may put it on a shared NFS/Lustre filesystem used by many processes on many nodes.
Layout:

    root/.size-index                the size index (see below): entries and sizes, for `max_bytes`
    root/ab/abcdef....safetensors   one entry: the tensors + a JSON metadata header (never pickle)
    root/ab/abcdef....hits          hit counter: one newline appended per hit (`wc -l` counts it)
    root/ab/.abcdef....safetensors.<pid>.<random>.tmp   an entry being written (`core.atomic`: renamed
                                    into place when complete)

Concurrency rules, all without locks (locks are unreliable on network filesystems):
- an entry is written under a unique temporary name in its final directory, fsynced, then `os.replace`d
  onto the final name, so readers see either no entry or a complete one, and two writers of the same key
  leave one complete entry (the last rename wins);
- a hit refreshes the entry's mtime (`os.utime`, the LRU clock) and appends one byte to the `.hits`
  sidecar; increments lost to races are acceptable, errors are swallowed;
- reads use `pread` rather than `mmap`: a file replaced or deleted by another node under an `mmap` can
  raise SIGBUS on NFS, while `pread` raises an ordinary error;
- every entry carries a checksum of its tensor data, verified on each read: a bad entry is logged once,
  deleted and reported as a miss, so the caller recomputes and replaces it.

The size index (only used with `max_bytes`): rather than listing and stat-ing every entry on each store,
each cache object keeps the entries' sizes and last uses in memory, loaded once from `root/.size-index`,
a journal of one line per store (`+ key size mtime`) and eviction (`- key`) that every process appends to
and reads the new tail of on its next store, so a store costs O(1) amortised. The journal starts with a
snapshot written by a full scan, redone when the journal is missing or unreadable, older than
`rescan_s`, or much longer than the entries it describes. The index is a hint, never trusted for
correctness: an eviction stats its victim first (gone: forgotten; used since, by another process: put
back at its new place in the LRU order), lines lost to races (concurrent appends on a network
filesystem, a snapshot replacing the journal under another process's append) only make the total
wrong until the next scan, and no entry is ever read through the index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vidbatch.core.atomic import TMP_SUFFIX, atomic_path, atomic_write
from vidbatch.core.errors import ConfigError
from vidbatch.core.local_dir import local_dir
from vidbatch.io.disk_tensor import disk_tensor
from vidbatch.io.frames import FrameFile

__all__ = [
    "FORMAT_VERSION",
    "INDEX_RESCAN_S",
    "CacheEntry",
    "InversionCache",
    "cache_max_bytes",
    "canonical_json",
    "inversion_cache_dir",
    "inversion_key",
    "tensor_checksum",
]

# Bump both when the entry layout or the key scheme changes: entries of another version never collide
# with this one's (the key tag is part of every key) and are treated as invalid if they somehow do.
FORMAT_VERSION = "vidbatch.inversion_cache/1"
_KEY_TAG = b"vidbatch.inversion_key/1"

_ENTRY_SUFFIX = ".safetensors"
_HITS_SUFFIX = ".hits"
_KEY_RE = re.compile(r"^[0-9a-f]{16,128}$")
_STALE_TMP_SECONDS = 3600.0  # a temp file this old belongs to a writer that died
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit; guards against reading garbage lengths
_INDEX_NAME = ".size-index"
_INDEX_HEADER = "# vidbatch.inversion_cache_index/1 scanned="
INDEX_RESCAN_S = 900.0  # the size index is rebuilt by a full scan when its snapshot is older than this
# ... or when its journal has more lines than this plus twice the entries (evicted keys' lines pile up).
_INDEX_SLACK_LINES = 1000
# mtimes go through the journal as text to the microsecond: a victim's mtime counts as newer (used since the
# index saw it) only beyond this, so the rounding costs no extra stat.
_MTIME_SLACK_S = 1e-3


# --------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------


def _check_jsonable(value: Any, path: str) -> None:
    """Raise TypeError naming `path` if `value` is not plain JSON (dict/list/tuple/str/int/float/bool/None)."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"inversion key part {path!r} is {value!r}: NaN/inf is not valid JSON")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_jsonable(item, f"{path}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, item in value.items():
            if not isinstance(k, str):
                raise TypeError(f"inversion key part {path!r} has a non-string key {k!r}")
            _check_jsonable(item, f"{path}.{k}")
        return
    raise TypeError(
        f"inversion key part {path!r} has a value of type {type(value).__name__} ({value!r}) that is not "
        "JSON-able; pass str/int/float/bool/None or lists/dicts of them"
    )


def canonical_json(parts: Mapping[str, Any]) -> str:
    """The canonical JSON text of `parts`: sorted keys, no whitespace, tuples as lists.

    Raises TypeError naming the offending key (dotted path for nested values) if a value is not JSON-able.
    Note that `1` and `1.0` serialise differently and therefore give different keys.
    """
    if not isinstance(parts, Mapping):
        raise TypeError(f"inversion key parts must be a mapping, got {type(parts).__name__}")
    for k, v in parts.items():
        if not isinstance(k, str):
            raise TypeError(f"inversion key part names must be strings, got {k!r}")
        _check_jsonable(v, k)
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _byte_view(x: np.ndarray | torch.Tensor) -> tuple[str, tuple[int, ...], memoryview]:
    """(dtype name, shape, raw bytes in C order) of an array or tensor, copying only when needed.

    Numpy and torch inputs with the same content give the same dtype name ("uint8", "float16", ...),
    hence the same key. Torch tensors are moved to CPU; non-contiguous inputs are packed.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu").contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        shape = tuple(t.shape)
        # view(uint8) works for every dtype, including bfloat16 which numpy cannot represent
        data = t.reshape(-1).view(torch.uint8).numpy()
        return dtype, shape, memoryview(data)
    if isinstance(x, np.ndarray):
        a = x
        if a.dtype.byteorder == ">":  # normalise big-endian input so equal values give equal keys
            a = a.astype(a.dtype.newbyteorder("<"))
        shape = tuple(a.shape)  # taken before packing: ascontiguousarray makes a 0-d array 1-d
        a = np.ascontiguousarray(a)
        if a.dtype.hasobject:
            raise TypeError("inversion_key: frames must be a numeric array, not an object array")
        return str(a.dtype), shape, memoryview(a.reshape(-1).view(np.uint8))
    raise TypeError(f"inversion_key: frames must be a numpy array or torch tensor, got {type(x).__name__}")


def inversion_key(frames: np.ndarray | torch.Tensor | FrameFile, parts: Mapping[str, Any]) -> str:
    """The cache key of an inversion: blake2b-256 hex digest (64 chars) of the frames' content and `parts`.

    Args:
        frames: the decoded frames actually inverted, e.g. uint8 `(T, H, W, 3)`; their bytes, shape and
            dtype go into the key (never a file name, so a re-encoded or renamed clip with the same
            pixels hits, and a changed clip under the same name misses).
        parts: every setting that changes the inversion (frame selection, size, model fingerprint,
            LoRAs and scales, scheduler config, steps, inversion prompt, control, dtype); serialised as
            canonical JSON, so the order of the keys does not matter.

    Nothing else goes into the key except a constant scheme tag (`_KEY_TAG`).

    Raises:
        TypeError: a value of `parts` is not JSON-able (the message names its key), or `frames` is
            not an array/tensor.
    """
    parts_json = canonical_json(parts)
    if isinstance(frames, FrameFile):
        # A window at a time, hashed exactly as the same frames in one array would be.
        dtype, shape, nbytes = "uint8", frames.shape, frames.nbytes
        chunks: Iterable[memoryview] = (memoryview(w).cast("B") for w in frames.windows())
    else:
        dtype, shape, data = _byte_view(frames)
        nbytes, chunks = data.nbytes, (data,)
    h = hashlib.blake2b(digest_size=32)
    h.update(_KEY_TAG + b"\0")
    # The frames header carries nbytes, so the boundary between the sections is unambiguous.
    header = json.dumps({"dtype": dtype, "nbytes": nbytes, "shape": list(shape)}, sort_keys=True)
    h.update(header.encode() + b"\0")
    for chunk in chunks:
        h.update(chunk)
    h.update(b"\0" + parts_json.encode("utf-8"))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------------


def _update_checksum_header(h: Any, name: str, dtype: torch.dtype, shape: list[int]) -> None:
    header = json.dumps({"dtype": str(dtype), "name": name, "shape": list(shape)}, sort_keys=True)
    h.update(header.encode("utf-8") + b"\0")


def _update_checksum_bytes(h: Any, t: torch.Tensor) -> None:
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _update_checksum(h: Any, name: str, t: torch.Tensor) -> None:
    """Feed one CPU contiguous tensor (name, dtype, shape, bytes) into the running hash `h`."""
    _update_checksum_header(h, name, t.dtype, list(t.shape))
    _update_checksum_bytes(h, t)


# A stored tensor larger than this is read a block of rows at a time into a `disk_tensor` (a long clip's
# trajectory need not fit in host memory); smaller ones are read whole.
STREAM_BYTES = 64 * 2**20


def _read_tensor(f: Any, name: str, h: Any) -> torch.Tensor:
    """One tensor of an open entry, fed into the checksum `h` as it is read."""
    part = f.get_slice(name)
    shape = list(part.get_shape())
    first = part[0:1] if shape and shape[0] > 0 else None
    row_bytes = 0 if first is None else first.numel() * first.element_size()
    if first is None or row_bytes * shape[0] <= STREAM_BYTES:
        t = f.get_tensor(name)
        _update_checksum(h, name, t)
        return t
    out = disk_tensor(tuple(shape), first.dtype)
    _update_checksum_header(h, name, first.dtype, shape)
    rows = max(1, STREAM_BYTES // 4 // row_bytes)
    for start in range(0, shape[0], rows):
        # safetensors refuses a slice that runs past the end (unlike Python's), so the last block is cut
        block = part[start:min(start + rows, shape[0])]
        _update_checksum_bytes(h, block)
        out[start:start + len(block)] = block
    return out


def tensor_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """'blake2b-256:<hex>' over every tensor's name, dtype, shape and bytes, in sorted name order.

    Tensors must be on CPU and contiguous (as they are inside `InversionCache.store` and after loading).
    """
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(tensors):
        _update_checksum(h, name, tensors[name])
    return "blake2b-256:" + h.hexdigest()


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One stored inversion, as listed by `InversionCache.entries()`.

    `last_used` is the file's mtime (refreshed on every hit: the LRU clock); `created` and `parts`
    come from the metadata header and are None when the header cannot be read (`verify()` says why).
    """

    key: str
    path: Path
    size_bytes: int
    last_used: float  # epoch seconds
    created: float | None  # epoch seconds
    hits: int
    parts: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for `vidbatch cache ls --json` and logs)."""
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


class _BadEntry(Exception):
    """An entry that is corrupt, truncated, of another format or fails its checksum."""


def _read_metadata_header(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, read from its header only (no tensor data).

    Raises OSError if the file cannot be read, `_BadEntry` if the header is not valid.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise _BadEntry("file shorter than a safetensors header")
        n = int.from_bytes(raw_len, "little")
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise _BadEntry(f"header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise _BadEntry(f"header is not valid JSON ({e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise _BadEntry("no metadata in the header")
    return meta


def _parse_created(meta: Mapping[str, str]) -> float | None:
    try:
        return float(meta["created"])
    except (KeyError, TypeError, ValueError):
        return None


def _parse_parts(meta: Mapping[str, str]) -> dict[str, Any] | None:
    try:
        parts = json.loads(meta["parts"])
    except (KeyError, TypeError, ValueError):
        return None
    return parts if isinstance(parts, dict) else None


def _safe_open(path: Path) -> Any:
    # pread instead of mmap: see the module docstring (SIGBUS on NFS). Older safetensors lack `backend`.
    try:
        return safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except TypeError:
        return safe_open(str(path), framework="pt", device="cpu")


def _read_entry(path: Path, key: str, keep: bool) -> dict[str, torch.Tensor]:
    """Read and fully validate one entry; return its tensors (an empty dict when `keep` is False).

    With `keep=False` each tensor is dropped after hashing. A tensor over `STREAM_BYTES` is read in
    blocks of rows into a `disk_tensor`, so neither loading nor verifying a multi-GB entry needs that
    much host memory.

    Raises:
        OSError: the file could not be read (missing, I/O error): not evidence of corruption.
        _BadEntry: the entry is invalid, with the cause as message.
    """
    try:
        f = _safe_open(path)
    except OSError:
        raise
    except Exception as e:  # SafetensorError and friends: the file is not a valid safetensors file
        raise _BadEntry(f"not a readable safetensors file ({e})") from None
    out: dict[str, torch.Tensor] = {}
    with f:
        meta = f.metadata() or {}
        if meta.get("vidbatch_format") != FORMAT_VERSION:
            raise _BadEntry(f"format {meta.get('vidbatch_format')!r} is not {FORMAT_VERSION!r}")
        if meta.get("key") != key:
            raise _BadEntry(f"metadata key {meta.get('key')!r} does not match the file name")
        expected = meta.get("checksum")
        if not expected:
            raise _BadEntry("no checksum in the metadata")
        h = hashlib.blake2b(digest_size=32)
        try:
            names = sorted(f.keys())
            if not names:
                raise _BadEntry("entry holds no tensors")
            for name in names:
                t = _read_tensor(f, name, h)
                if keep:
                    out[name] = t
                del t
        except (OSError, _BadEntry):
            raise
        except Exception as e:
            raise _BadEntry(f"tensor data unreadable ({e})") from None
    actual = "blake2b-256:" + h.hexdigest()
    if actual != expected:
        raise _BadEntry(f"checksum mismatch (stored {expected}, data {actual})")
    return out


def _file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _unlink_quiet(path: Path) -> bool:
    """Remove `path`; False if it was already gone (another process got there first)."""
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def _prepare_for_save(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached tensors; copies only what must be copied.

    safetensors refuses tensors whose memory overlaps (the same tensor under two names); those are
    cloned. Non-overlapping views of one storage (e.g. slices of a trajectory) are saved as they are.
    """
    out: dict[str, torch.Tensor] = {}
    spans: list[tuple[int, int]] = []  # byte ranges [start, end) already used by earlier tensors
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"InversionCache.store: invalid tensor name {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"InversionCache.store: {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided:
            raise ValueError(f"InversionCache.store: {name!r} is a sparse tensor; make it dense first")
        c = t.detach().to("cpu").contiguous()
        nbytes = c.numel() * c.element_size()
        if nbytes:
            start = c.data_ptr()
            if any(start < e and s < start + nbytes for s, e in spans):
                c = c.clone()
                start = c.data_ptr()
            spans.append((start, start + nbytes))
        out[name] = c
    return out


class _SizeIndex:
    """The entries' sizes and last uses, kept in memory and shared through the journal `root/.size-index`.

    Journal lines (UTF-8, one per event, appended with a single `write` under O_APPEND):

        # vidbatch.inversion_cache_index/1 scanned=<epoch>   header of a snapshot, written by a full scan
        + <key> <size bytes> <mtime>                          an entry stored (or found by the scan)
        - <key>                                               an entry evicted

    Lines that do not parse are skipped. A new snapshot replaces the file atomically; a reader notices
    the new file (another inode) and reads it from the start.
    """

    def __init__(self, root: Path, rescan_s: float, log: logging.Logger) -> None:
        self.path = root / _INDEX_NAME
        self.rescan_s = rescan_s
        self.log = log
        self.sizes: dict[str, int] = {}
        self.used: dict[str, float] = {}
        self.total = 0
        self._heap: list[tuple[float, str]] = []  # (last use, key), stale items skipped when popped
        self._file_id: tuple[int, int] | None = None  # the journal generation read so far
        self._offset = 0  # bytes of it applied
        self._lines = 0  # event lines in it
        self.scanned: float | None = None  # when its snapshot was scanned (None: no valid snapshot)

    # ------------------------------------------------------------ in-memory state

    def _reset(self) -> None:
        self.sizes.clear()
        self.used.clear()
        self._heap.clear()
        self.total = 0
        self._lines = 0
        self.scanned = None

    def set(self, key: str, size: int, used: float) -> None:
        self.total += size - self.sizes.get(key, 0)
        self.sizes[key] = size
        self.used[key] = used
        heapq.heappush(self._heap, (used, key))
        if len(self._heap) > 2 * len(self.sizes) + _INDEX_SLACK_LINES:  # too many stale items: rebuild
            self._heap = [(t, k) for k, t in self.used.items()]
            heapq.heapify(self._heap)

    def drop(self, key: str) -> None:
        self.total -= self.sizes.pop(key, 0)
        self.used.pop(key, None)

    def touch(self, key: str, used: float) -> None:
        """A hit in this process: move `key` to the recent end of the LRU order (not journaled: other
        processes learn of it from the entry's mtime when they would evict it)."""
        if key in self.sizes:
            self.set(key, self.sizes[key], used)

    def pop_lru(self) -> str | None:
        """The least recently used key (ties by key), taken out of the order (not out of the index)."""
        while self._heap:
            used, key = heapq.heappop(self._heap)
            if self.used.get(key) == used:
                return key
        return None

    # ------------------------------------------------------------ the journal

    def _apply(self, data: bytes) -> None:
        end = data.rfind(b"\n") + 1  # a trailing partial line is someone's append in progress
        self._offset += end
        for raw in data[:end].splitlines():
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if line.startswith(_INDEX_HEADER):
                try:
                    self.scanned = float(line[len(_INDEX_HEADER):])
                except ValueError:
                    pass
                continue
            parts = line.split()
            if len(parts) == 4 and parts[0] == "+" and _KEY_RE.match(parts[1]):
                self._lines += 1
                try:
                    size, used = int(parts[2]), float(parts[3])
                except ValueError:
                    continue
                if size >= 0 and math.isfinite(used):
                    self.set(parts[1], size, used)
            elif len(parts) == 2 and parts[0] == "-" and _KEY_RE.match(parts[1]):
                self._lines += 1
                self.drop(parts[1])

    def _read(self) -> bool:
        """Apply what the journal gained since the last read; False when there is no journal."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            st = os.fstat(fd)
            if _file_id(st) != self._file_id or st.st_size < self._offset:
                self._reset()  # a new snapshot: start over from it
                self._file_id, self._offset = _file_id(st), 0
            if st.st_size > self._offset:
                self._apply(os.pread(fd, st.st_size - self._offset, self._offset))
        finally:
            os.close(fd)
        return True

    def append(self, line: str) -> None:
        """Append one event line; best effort (no journal, or an unwritable one: the next scan corrects it).
        Never creates the file: a journal without its snapshot header would be taken for a complete one."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError:
            return
        try:
            os.write(fd, line.encode("utf-8"))
        except OSError:
            pass
        finally:
            os.close(fd)

    def refresh(self, scan: Any, remove_stale: Any) -> None:
        """Bring the index up to date: read the journal's new lines, or rebuild it by a full `scan()` when it
        is missing, has no valid snapshot, is older than `rescan_s` or too long."""
        had_file = self._file_id is not None
        try:
            present = self._read()
        except OSError as e:
            self.log.warning("inversion cache: cannot read the size index %s (%s); rescanning", self.path, e)
            present = False
        if not present and had_file:
            self._reset()  # removed under us
        now = time.time()
        stale = self.scanned is None or now - self.scanned > self.rescan_s
        if stale or self._lines > 2 * len(self.sizes) + _INDEX_SLACK_LINES:
            self._rebuild(scan, remove_stale, now)

    def _rebuild(self, scan: Any, remove_stale: Any, now: float) -> None:
        remove_stale()
        entries = scan()
        lines = [f"{_INDEX_HEADER}{now:.6f}\n"]
        lines += [f"+ {e.key} {e.size_bytes} {e.last_used:.6f}\n" for e in entries]
        try:
            atomic_write(self.path, "".join(lines))
        except OSError as e:
            self.log.warning("inversion cache: cannot write the size index %s (%s); keeping it in memory",
                             self.path, e)
        self._reset()
        self._file_id, self._offset = None, 0
        try:
            present = self._read()  # the snapshot just written, or a newer one another process wrote
        except OSError:
            present = False
        if not present or self.scanned is None:
            self._reset()  # no usable journal: this process's own view, rescanned after rescan_s
            self._file_id = None
            for e in entries:
                self.set(e.key, e.size_bytes, e.last_used)
            self.scanned = now


class InversionCache:
    """Content-addressed store of inversion results, safe to share between processes and nodes.

    Args:
        root: the cache directory (created if missing).
        max_bytes: if set, each `store` evicts least-recently-used entries until the entries total at
            most this many bytes (the entry just stored is never evicted by its own store). The total
            comes from the size index (module docstring), so a store does not list the cache.
        logger: where warnings about bad entries go; defaults to this module's logger.
        rescan_s: the size index is rebuilt by a full scan when its snapshot is older than this.
    """

    def __init__(
        self,
        root: str | Path,
        max_bytes: int | None = None,
        logger: logging.Logger | None = None,
        rescan_s: float = INDEX_RESCAN_S,
    ) -> None:
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise ConfigError(f"inversion cache max_bytes must be None or an int >= 0, got {max_bytes!r}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.log = logger if logger is not None else logging.getLogger(__name__)
        self.root.mkdir(parents=True, exist_ok=True)
        self._index = _SizeIndex(self.root, rescan_s, self.log)
        self._index_lock = threading.Lock()  # the index is plain Python state: one thread updates it at a time

    # ---------------------------------------------------------------- paths

    def _check_key(self, key: str) -> None:
        # Keys become file names: accept only hex digests (also rules out path traversal).
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"invalid inversion cache key {key!r}: expected 16-128 lowercase hex characters")

    def path_for(self, key: str) -> Path:
        """The entry file of `key` (whether or not it exists): `root/<key[:2]>/<key>.safetensors`."""
        self._check_key(key)
        return self.root / key[:2] / (key + _ENTRY_SUFFIX)

    def _hits_path(self, key: str) -> Path:
        return self.root / key[:2] / (key + _HITS_SUFFIX)

    def _fanout_dirs(self) -> Iterator[Path]:
        try:
            with os.scandir(self.root) as it:
                for d in it:
                    if len(d.name) == 2 and d.is_dir(follow_symlinks=False):
                        yield Path(d.path)
        except FileNotFoundError:
            return

    # ---------------------------------------------------------------- load / store

    def load(self, key: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor] | None:
        """The tensors stored under `key`, on `device`, or None on a miss.

        A corrupt, truncated or mismatching entry is logged (one warning naming the entry and the
        cause), deleted and reported as a miss; an entry that cannot be read for an I/O reason is
        reported as a miss (with a warning) and left alone. Never raises for bad entries.
        On a hit, refreshes the entry's mtime (LRU) and counts the hit.
        """
        path = self.path_for(key)
        try:
            st0 = path.stat()
        except FileNotFoundError:
            return None
        except OSError as e:
            self.log.warning("inversion cache: cannot stat entry %s (%s); treating it as a miss", path, e)
            return None
        try:
            tensors = _read_entry(path, key, keep=True)
        except FileNotFoundError:
            return None  # removed between stat and open (pruned, or dropped by another reader)
        except OSError as e:
            if self._replaced_since(path, st0):
                return None
            self.log.warning("inversion cache: cannot read entry %s (%s); treating it as a miss", path, e)
            return None
        except _BadEntry as e:
            if self._replaced_since(path, st0):
                # Another process replaced (or removed) the file while we read it: what we saw is not
                # what is there now, so neither warn nor delete.
                return None
            self.log.warning("inversion cache: dropping corrupt entry %s: %s", path, e)
            self._remove_if_same(path, st0)
            return None
        self._record_hit(key, path)
        if torch.device(device).type != "cpu":
            for name in list(tensors):  # move one at a time so only one CPU copy is alive at once
                tensors[name] = tensors[name].to(device)
        return tensors

    @staticmethod
    def _replaced_since(path: Path, st0: os.stat_result) -> bool:
        try:
            return _file_id(path.stat()) != _file_id(st0)
        except OSError:
            return True

    def _remove_if_same(self, path: Path, st0: os.stat_result) -> None:
        # Narrow (not closed) race: a writer could replace the file between this check and the unlink;
        # the cost is one recomputation, never a wrong result.
        try:
            if _file_id(path.stat()) == _file_id(st0):
                path.unlink()
        except OSError:
            pass

    def _record_hit(self, key: str, path: Path) -> None:
        """Refresh the LRU clock and count the hit; failures (races, read-only caches) are ignored."""
        try:
            os.utime(path)
            with self._index_lock:
                self._index.touch(key, time.time())
        except OSError:
            pass
        try:
            # One byte per hit with O_APPEND: cheap, no read-modify-write; concurrent appends from
            # several NFS clients can overwrite each other, which only loses increments.
            fd = os.open(self._hits_path(key), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, b"\n")
            finally:
                os.close(fd)
        except OSError:
            pass

    def store(
        self,
        key: str,
        tensors: Mapping[str, torch.Tensor],
        parts: Mapping[str, Any] | None = None,
    ) -> Path:
        """Store `tensors` under `key` atomically and return the entry path; then enforce `max_bytes`.

        Tensors may live on any device, in any dtype safetensors supports (fp32/fp16/bf16...), and need
        not be contiguous: they are moved/packed here (no copy for CPU contiguous tensors). `parts` (the
        key's inputs) are recorded in the metadata for `cache ls`; they are not checked against `key`.
        """
        path = self.path_for(key)
        if not tensors:
            raise ValueError("InversionCache.store: no tensors to store")
        parts_json = canonical_json(parts) if parts is not None else "null"
        cpu = _prepare_for_save(tensors)
        metadata = {
            "format": "pt",
            "vidbatch_format": FORMAT_VERSION,
            "key": key,
            "created": f"{time.time():.6f}",
            "parts": parts_json,
            "checksum": tensor_checksum(cpu),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique temporary beside the final name (so the rename is atomic), fsynced, renamed, the folder
        # fsynced; removed if saving fails.
        with atomic_path(path) as tmp:
            save_file(cpu, str(tmp), metadata=metadata)
            del cpu
        if self.max_bytes is not None:
            with self._index_lock:
                self._enforce_limit(self.max_bytes, key, path)
        return path

    def _enforce_limit(self, max_bytes: int, keep: str, path: Path) -> None:
        """Record the entry just stored in the size index, then evict least recently used entries (never
        `keep`) until the index's total is at most `max_bytes`.

        Costs O(1) amortised file operations: one stat of the new entry, one journal append and read of
        its new tail, and one stat and unlink per eviction (a full scan only when the index is rebuilt).
        """
        index = self._index
        index.refresh(lambda: self._scan(with_metadata=False), self._remove_stale_files)
        try:
            st = path.stat()
        except OSError:
            st = None  # already evicted by another process: nothing to record
        if st is not None:
            index.set(keep, st.st_size, st.st_mtime)
            index.append(f"+ {keep} {st.st_size} {st.st_mtime:.6f}\n")
        put_back: list[str] = []
        while index.total > max_bytes:
            key = index.pop_lru()
            if key is None:
                break
            victim = self.path_for(key)
            if key == keep:
                put_back.append(key)
                continue
            try:
                vst = victim.stat()
            except FileNotFoundError:  # removed by someone else (evicted, dropped as corrupt, deleted by hand)
                index.drop(key)
                index.append(f"- {key}\n")
                continue
            except OSError as e:
                self.log.warning("inversion cache: cannot evict %s (%s)", victim, e)
                put_back.append(key)
                continue
            if vst.st_mtime > index.used[key] + _MTIME_SLACK_S or vst.st_size != index.sizes[key]:
                # Used (or rewritten) by another process since the index saw it: not the LRU entry after all.
                index.set(key, vst.st_size, vst.st_mtime)
                continue
            try:
                _unlink_quiet(victim)
                _unlink_quiet(self._hits_path(key))
            except OSError as e:  # e.g. another user's entry in a shared cache: skip it, keep going
                self.log.warning("inversion cache: cannot evict %s (%s)", victim, e)
                put_back.append(key)
                continue
            index.drop(key)
            index.append(f"- {key}\n")
        for key in put_back:
            index.set(key, index.sizes[key], index.used[key])
        if index.total > max_bytes and keep in index.sizes:
            self.log.warning(
                "inversion cache: %s holds %d bytes, over its limit of %d, because the entry just stored "
                "(%s) is kept even though it does not fit; raise the cache size limit",
                self.root, index.total, max_bytes, keep,
            )

    # ---------------------------------------------------------------- listing and maintenance

    def _scan(self, with_metadata: bool) -> list[CacheEntry]:
        """Every entry, least recently used first (ties by key). Vanished files are skipped."""
        found: list[CacheEntry] = []
        for d in self._fanout_dirs():
            try:
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            for name in names:
                if not name.endswith(_ENTRY_SUFFIX) or name.startswith("."):
                    continue
                key = name[: -len(_ENTRY_SUFFIX)]
                if not _KEY_RE.match(key) or key[:2] != d.name:
                    continue
                entry = self._entry(d / name, key, with_metadata)
                if entry is not None:
                    found.append(entry)
        found.sort(key=lambda e: (e.last_used, e.key))
        return found

    def _entry(self, path: Path, key: str, with_metadata: bool) -> CacheEntry | None:
        try:
            st = path.stat()
        except OSError:
            return None
        try:
            hits = self._hits_path(key).stat().st_size
        except OSError:
            hits = 0
        created: float | None = None
        parts: dict[str, Any] | None = None
        if with_metadata:
            try:
                meta = _read_metadata_header(path)
                created, parts = _parse_created(meta), _parse_parts(meta)
            except (OSError, _BadEntry):
                pass
        return CacheEntry(
            key=key,
            path=path,
            size_bytes=st.st_size,
            last_used=st.st_mtime,
            created=created,
            hits=hits,
            parts=parts,
        )

    def entries(self) -> list[CacheEntry]:
        """Every entry with its size, last use, creation time, hits and parts; least recently used first."""
        return self._scan(with_metadata=True)

    def total_bytes(self) -> int:
        """Total size of the entry files (hit sidecars and temp files are not counted)."""
        return sum(e.size_bytes for e in self._scan(with_metadata=False))

    def verify(self) -> list[tuple[CacheEntry, str | None]]:
        """Check every entry fully (header, format, key, checksum); deletes nothing, counts no hits.

        Returns `(entry, None)` for a good entry and `(entry, cause)` for a bad one. Entries removed by
        another process while verifying are left out.
        """
        results: list[tuple[CacheEntry, str | None]] = []
        for entry in self._scan(with_metadata=True):
            try:
                _read_entry(entry.path, entry.key, keep=False)
            except FileNotFoundError:
                continue
            except OSError as e:
                results.append((entry, f"unreadable ({e})"))
                continue
            except _BadEntry as e:
                results.append((entry, str(e)))
                continue
            results.append((entry, None))
        return results

    def prune(self, max_bytes: int) -> list[CacheEntry]:
        """Evict least-recently-used entries until the entries total at most `max_bytes`.

        Also removes temp files older than an hour (writers that died) and hit counters whose entry is
        gone; younger temp files may belong to live writers and are left alone. Returns the entries this
        call removed (another process pruning at the same time may remove some of the others).
        """
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"prune: max_bytes must be an int >= 0, got {max_bytes!r}")
        return self._prune(max_bytes)

    def _prune(self, max_bytes: int) -> list[CacheEntry]:
        self._remove_stale_files()
        entries = self._scan(with_metadata=False)
        total = sum(e.size_bytes for e in entries)
        evicted: list[CacheEntry] = []
        for entry in entries:
            if total <= max_bytes:
                break
            full = self._entry(entry.path, entry.key, with_metadata=True) or entry
            try:
                if _unlink_quiet(entry.path):
                    evicted.append(full)
                _unlink_quiet(self._hits_path(entry.key))
            except OSError as e:  # e.g. another user's entry in a shared cache: skip it, keep going
                self.log.warning("inversion cache: cannot evict %s (%s)", entry.path, e)
                continue
            total -= entry.size_bytes
            with self._index_lock:
                self._index.drop(entry.key)
                self._index.append(f"- {entry.key}\n")
        return evicted

    def _remove_stale_files(self) -> None:
        """Remove temp files older than an hour and hit counters without an entry."""
        now = time.time()
        for d in self._fanout_dirs():
            try:
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            present = set(names)
            for name in names:
                p = d / name
                if name.startswith(".") and name.endswith(TMP_SUFFIX):  # core.atomic temporaries
                    try:
                        if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                            _unlink_quiet(p)
                    except OSError:
                        pass
                elif name.endswith(_HITS_SUFFIX):
                    if name[: -len(_HITS_SUFFIX)] + _ENTRY_SUFFIX not in present:
                        try:
                            _unlink_quiet(p)
                        except OSError:
                            pass

    def stats(self) -> dict[str, Any]:
        """Summary for `vidbatch cache ls` and the run summary.

        Keys: root, entries, bytes, hits (sum over entries), max_bytes, oldest_use / newest_use (epoch
        seconds of the least / most recent use, None when empty).
        """
        entries = self._scan(with_metadata=False)
        return {
            "root": str(self.root),
            "entries": len(entries),
            "bytes": sum(e.size_bytes for e in entries),
            "hits": sum(e.hits for e in entries),
            "max_bytes": self.max_bytes,
            "oldest_use": entries[0].last_used if entries else None,
            "newest_use": entries[-1].last_used if entries else None,
        }


def inversion_cache_dir(configured: str | None = None, local: str | None = None) -> Path:
    """`inversion.cache_dir` when set, else `vidbatch-inversions` in the node-local scratch folder
    (`runtime.local_dir`, given as `local`; see `vidbatch.core.local_dir`)."""
    return Path(configured).expanduser() if configured else local_dir(local) / "vidbatch-inversions"


def cache_max_bytes(max_gb: float | None) -> int | None:
    """Convert a size limit in GB (10**9 bytes, as in the config and `--max-gb`) to bytes; None = no limit.

    Raises:
        ConfigError: the value is negative, not a number, or not finite.
    """
    if max_gb is None:
        return None
    if isinstance(max_gb, bool) or not isinstance(max_gb, (int, float)) or not math.isfinite(max_gb) or max_gb < 0:
        raise ConfigError(
            f"inversion cache size limit must be a number of GB >= 0 (or unset for no limit), got {max_gb!r}"
        )
    return int(max_gb * 1e9)
