"""Output shards: written under temporary names, renamed when complete, done marker written last.

Layout under the output folder (the output contract other tools read):
- `shards/{stem}.tar`: one WebDataset sample per input video: `{name}.{edit}.mp4` per edit, `{name}.json`,
  where `name` is the key made safe (`core.names`: a plain relative name, unique in the shard) and
  the json keeps the original key;
- `stats/{stem}.jsonl`: one row per (video, edit);
- `stats/{stem}.json`: the shard's done marker, written only after both files above are complete,
  with their sizes and sha256 (hashed as they are written).

A commit may be fenced (`ShardOutput.commit(marker, fence)`): the fence is checked just before the
renames and raises (`core.faults.LeaseLost`) when the attempt no longer owns the shard; see `commit`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Any, BinaryIO, Callable

import webdataset as wds

from vidbatch.core.atomic import TMP_SUFFIX, atomic_write, publish, temporary_path
from vidbatch.core.names import MemberStems, safe_member_stem
from vidbatch.core.rows import DoneMarker, EditRow
from vidbatch.core.errors import ConfigError
from vidbatch.io.object_store import ObjectStore, commit_shard, store_of


def shard_path(out_dir: Path, stem: str) -> Path:
    return Path(out_dir) / "shards" / f"{stem}.tar"


def rows_path(out_dir: Path, stem: str) -> Path:
    return Path(out_dir) / "stats" / f"{stem}.jsonl"


def marker_path(out_dir: Path, stem: str) -> Path:
    return Path(out_dir) / "stats" / f"{stem}.json"


def is_done(out_dir: Path, stem: str) -> bool:
    """True when the shard has a done marker (its outputs are complete); resuming skips it."""
    return read_done_marker(out_dir, stem) is not None


def read_done_marker(out_dir: Path, stem: str) -> DoneMarker | None:
    """The shard's done marker, or None when it has none; a ConfigError if the file is not a marker."""
    path = marker_path(out_dir, stem)
    if not path.is_file():
        return None
    try:
        return DoneMarker.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{path} is not a done marker vidbatch can read ({exc}); delete it to redo the shard, "
                          "or rerun with --overwrite") from exc


def read_rows(out_dir: Path, stem: str) -> list[EditRow]:
    """The shard's edit rows (`stats/{stem}.jsonl`), in written order; [] when it has none."""
    path = rows_path(out_dir, stem)
    if not path.is_file():
        return []
    return [EditRow.from_json(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes `data` as indented JSON atomically: readers see the old file or the whole new one."""
    atomic_write(path, json.dumps(data, indent=2))


def remove_stale_temporaries(out_dir: Path, stem: str) -> None:
    """Deletes the temporary files an interrupted attempt at this shard left behind.

    Matches the names `core.atomic.temporary_path` gives: `.{name}.{pid}.{random}.tmp`.
    """
    for folder, name in (("shards", f"{stem}.tar"), ("stats", f"{stem}.jsonl"), ("stats", f"{stem}.json")):
        for tmp in (Path(out_dir) / folder).glob(f".{name}.*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)


class _HashingFile:
    """A file opened for writing that keeps the sha256 and the size of what went through it."""

    def __init__(self, path: Path):
        self._file: BinaryIO = open(path, "xb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def sync(self) -> None:
        """Flushes and fsyncs through the open file (its name may be gone: a takeover removes it)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def record(self) -> dict[str, Any]:
        """What the done marker keeps of the file: `{"bytes", "sha256"}`."""
        return {"bytes": self.size, "sha256": self._hash.hexdigest()}


def relative_name(out_dir: Path, path: Path) -> str:
    """`path` relative to the output folder, with `/`: how a done marker names its files."""
    return path.relative_to(out_dir).as_posix()


class ShardOutput:
    """Appends samples to one output shard; `commit` makes it visible, `abort` throws it away.

    Samples are written under safe member names (`core.names.MemberStems`): a key that is not a plain
    name, or one that appears twice, never decides a path in the tar.
    """

    def __init__(self, out_dir: str | Path, stem: str):
        self.out_dir = Path(out_dir)
        self.stem = stem
        for folder in ("shards", "stats"):
            (self.out_dir / folder).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out_dir, stem)
        # Streamed into unique temporaries (a retry racing this attempt never shares them), published in `commit`.
        self._tar_tmp = temporary_path(shard_path(self.out_dir, stem))
        self._rows_tmp = temporary_path(rows_path(self.out_dir, stem))
        self._tar_file = _HashingFile(self._tar_tmp)
        self._tar = wds.TarWriter(self._tar_file, encoder=False)
        self._rows_file = _HashingFile(self._rows_tmp)
        self._stems = MemberStems()
        self.keys: list[str] = []
        self.rows: list[EditRow] = []

    def add(self, key: str, members: dict[str, bytes], rows: list[EditRow]) -> str:
        """One sample: `members` maps extensions (`{edit}.mp4`, `json`) to bytes; `rows` go to the jsonl.

        Returns the member name stem the sample was written under."""
        stem = self._stems.assign(key)
        self._tar.write({"__key__": stem, **members})
        for row in rows:
            self._rows_file.write((json.dumps(row.to_json()) + "\n").encode())
        self._rows_file.flush()
        self.keys.append(key)
        self.rows.extend(rows)
        return stem

    def commit(self, marker: DoneMarker, fence: Callable[[], None] | None = None) -> DoneMarker:
        """Closes and renames the shard and its rows, then writes the done marker (last), with the
        files' sizes and checksums.

        `fence` (from the dispatcher: does this attempt still hold the shard's lease?) is called after
        the files are complete and on disk and just before the first rename; when it raises (a
        `core.faults.LeaseLost`) nothing is published and the caller's `abort` removes the temporaries.
        A rename that finds its temporary gone (a taker of the lease removed it) asks the fence again,
        so that case is reported as the lost lease it is.

        The window that remains: the check and the renames are separate steps (a POSIX filesystem has
        no "rename if the lease is still mine"), so an attempt that passes the fence and then stalls
        longer than its lease's remaining time (at least two thirds of `runtime.lease_s` while its driver
        renews) may still rename after another driver took the shard over. That is safe because both
        attempts publish complete, equivalent shards of the same input and config, each by renames of
        whole files with its marker written last: a reader sees one attempt's complete files, and the
        last marker written describes files of one attempt (a `verify` of the sizes and sha256 tells in
        the unlikely interleaving where it does not, and a rerun redoes that shard). There is no second
        check between the files and the marker: once this attempt's files stand under the final names,
        the marker that describes them must follow, as stopping there could leave the taker's marker
        beside this attempt's files.
        """
        self._tar.close()  # writes the tar's end blocks; leaves the file open
        for file in (self._tar_file, self._rows_file):
            file.sync()  # on disk before the fence: the fence-to-rename window is the renames alone
            file.close()
        tar, rows = shard_path(self.out_dir, self.stem), rows_path(self.out_dir, self.stem)
        files = {relative_name(self.out_dir, tar): self._tar_file.record(),
                 relative_name(self.out_dir, rows): self._rows_file.record()}
        marker = dataclasses.replace(marker, files=files)
        if fence is not None:
            fence()
        store = store_of(self.out_dir)
        if store is not None:
            return self._commit_to_store(store, marker)
        try:
            publish(self._tar_tmp, tar)
            publish(self._rows_tmp, rows)
        except FileNotFoundError:
            if fence is not None:
                fence()
            raise
        write_json_atomic(marker_path(self.out_dir, self.stem), marker.to_json())
        return marker

    def _commit_to_store(self, store: ObjectStore, marker: DoneMarker) -> DoneMarker:
        """The commit of a staged shard (the output is an object store URL; see `io.object_store`): tar and
        jsonl uploaded, the marker put last and conditionally; then the staged copies of the jsonl and
        the marker take their final local names (the summary and resume read them) and the tar is
        dropped from the staging folder (the store has it; its size is in the receipt)."""
        tar, rows = shard_path(self.out_dir, self.stem), rows_path(self.out_dir, self.stem)
        mark = marker_path(self.out_dir, self.stem)
        tar_name, rows_name = relative_name(self.out_dir, tar), relative_name(self.out_dir, rows)
        commit_shard(self.out_dir, store, self.stem, [(self._tar_tmp, tar_name), (self._rows_tmp, rows_name)],
                     relative_name(self.out_dir, mark), marker.to_json(), store_only=(tar_name,))
        publish(self._rows_tmp, rows)
        self._tar_tmp.unlink(missing_ok=True)
        tar.unlink(missing_ok=True)
        write_json_atomic(mark, marker.to_json())
        return marker

    def abort(self) -> None:
        for closer in (self._tar.close, self._tar_file.close, self._rows_file.close):
            try:
                closer()
            except Exception:  # the files are being thrown away; a failed close changes nothing
                pass
        self._tar_tmp.unlink(missing_ok=True)
        self._rows_tmp.unlink(missing_ok=True)


class CommittedShard:
    """The samples of a committed shard whose every edit is ok, to be copied unchanged into its redo
    (`vidbatch run --retry-failed`). Opens the old tar before the redo replaces it (the open file keeps
    the old content whatever is renamed over it); `take` returns a sample's members and rows."""

    def __init__(self, out_dir: str | Path, stem: str):
        rows_by_key: dict[str, list[EditRow]] = defaultdict(list)
        for row in read_rows(Path(out_dir), stem):
            rows_by_key[row.key].append(row)
        self.rows = {key: rows for key, rows in rows_by_key.items() if all(row.ok for row in rows)}
        path = shard_path(Path(out_dir), stem)
        self._download: Path | None = None
        store = store_of(out_dir)
        if store is not None and not path.is_file():   # a staged output: the committed tar is in the store
            self._download = temporary_path(path)
            store.download(relative_name(Path(out_dir), path), self._download)
            path = self._download
        self._tar = tarfile.open(path)
        # The tar names samples by their safe member stems (`core.names`), which differ from keys that are
        # not plain names (`train/001`, `clip.1`): map each stem back to its key.
        key_of_stem = {safe_member_stem(key): key for key in self.rows}
        self._members: dict[str, list[tarfile.TarInfo]] = defaultdict(list)
        for info in self._tar.getmembers():
            stem, _ = _split_member(info.name)
            if stem in key_of_stem:
                self._members[key_of_stem[stem]].append(info)

    @property
    def ok_keys(self) -> set[str]:
        return set(self.rows)

    def take(self, key: str) -> tuple[dict[str, bytes], list[EditRow]]:
        """The members (extension -> bytes, as written) and rows of the ok sample `key`."""
        members = {}
        for info in self._members[key]:
            stream = self._tar.extractfile(info)
            members[_split_member(info.name)[1]] = stream.read() if stream is not None else b""
        return members, self.rows[key]

    def close(self) -> None:
        self._tar.close()
        if self._download is not None:
            self._download.unlink(missing_ok=True)


def _split_member(name: str) -> tuple[str, str]:
    """A member name of a committed shard -> (stem, extension): `{stem}.{edit}.mp4` -> (stem, `{edit}.mp4`).
    The stems ShardOutput writes are safe names (`core.names`: no folder, no dot), so the first dot ends
    the stem, as WebDataset splits it."""
    stem, _, ext = name.partition(".")
    return stem, ext
