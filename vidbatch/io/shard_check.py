"""Is an output shard done and intact? Its done marker checked against the files it describes.

A shard is `done` when its marker reads and every file the marker lists is there with the recorded
size (and, with `checksums=True`, the recorded sha256). It is `absent` without a marker, and
`damaged` when the marker cannot be read or a file is missing or differs; a damaged shard is redone
by the next run. A marker of an older release has no file list: it is trusted, as it was then.

Checking many shards (planning, the summary) takes one `list_output` first: a listing of `stats/`,
`shards/` and the receipts instead of a `stat` per shard file, and a marker is read only where the
listing has one (a shard without one is `absent` at no cost).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from vidbatch.core.errors import VidbatchError
from vidbatch.core.rows import DoneMarker
from vidbatch.io.object_store import RECEIPTS_DIR, receipt_sizes
from vidbatch.io.output_shards import marker_path, relative_name

ShardState = Literal["done", "absent", "damaged"]


@dataclass(frozen=True)
class ShardCheck:
    stem: str
    state: ShardState
    marker: DoneMarker | None = None
    problem: str | None = None      # why the shard is damaged (or not done), for the user


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class OutputListing:
    """The files under an output's `stats/`, `shards/` and receipts folders, by name relative to OUT, as
    one `os.scandir` of each saw them (names only: 100k shards keep a few MB). A size is read only when a
    check asks for it (a `stat` of that file: on Linux a directory entry carries no size anyway)."""

    out_dir: Path
    names: set[str] = field(default_factory=set)

    def has(self, name: str) -> bool:
        return name in self.names

    def size(self, name: str) -> int:
        return os.stat(self.out_dir / name).st_size

    def stems(self, folder: str, suffix: str) -> set[str]:
        """The names under `folder` ending in `suffix`, without it (hidden temporaries left out)."""
        start = folder + "/"
        return {name[len(start):-len(suffix)] for name in self.names
                if name.startswith(start) and name.endswith(suffix) and not name[len(start):].startswith(".")}


def list_output(out_dir: Path) -> OutputListing:
    """One listing of the folders a shard check reads (a missing folder lists as empty; files only)."""
    listing = OutputListing(Path(out_dir))
    for folder in ("stats", "shards", RECEIPTS_DIR):
        try:
            with os.scandir(Path(out_dir) / folder) as it:
                listing.names.update(f"{folder}/{entry.name}" for entry in it if entry.is_file())
        except (FileNotFoundError, NotADirectoryError):
            continue
    return listing


def _file_problem(out_dir: Path, name: str, record: object, checksums: bool,
                  stored: dict[str, int] | None = None, listing: OutputListing | None = None) -> str | None:
    """Why the file `name` (relative to OUT) does not match its marker record, or None. `stored`: the
    files of a staged output that live only in its object store, with their sizes there. `listing`: the
    output as listed (sizes from it, not a `stat` of each path)."""
    if not isinstance(record, dict) or not isinstance(record.get("bytes"), int):
        return f"the marker's record of {name} is not {{bytes, sha256}}"
    if stored and name in stored:
        if stored[name] != record["bytes"]:
            return f"{name} has {stored[name]} bytes in the object store, the marker says {record['bytes']}"
        if checksums:
            return f"{name} is in the object store only: its sha256 is not checked here"
        return None
    path = out_dir / name
    if listing is not None and name.count("/") == 1:
        if not listing.has(name):
            return f"{name} is missing"
        try:
            size = listing.size(name)
        except FileNotFoundError:   # removed since the listing
            return f"{name} is missing"
    else:
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
    if size != record["bytes"]:
        return f"{name} has {size} bytes, the marker says {record['bytes']}"
    if checksums and file_sha256(path) != record.get("sha256"):
        return f"{name} does not match its sha256 in the marker (damaged)"
    return None


def shard_checker(out_dir: Path) -> Callable[[str], ShardCheck]:
    """`check_shard` of many shards against one listing of the output (`list_output`): a shard without a
    done marker costs nothing, and only the markers there are read (100k shards: no 200k `stat`s). The
    checks are made one at a time, not kept: a marker carries its rows' aggregates."""
    out_dir = Path(out_dir)
    listing = list_output(out_dir)
    with_marker = listing.stems("stats", ".json")

    def check(stem: str) -> ShardCheck:
        if stem not in with_marker:
            return ShardCheck(stem, "absent", problem="no done marker")
        return check_shard(out_dir, stem, listing=listing)

    return check


def check_shard(out_dir: Path, stem: str, *, checksums: bool = False,
                listing: OutputListing | None = None) -> ShardCheck:
    """The state of shard `stem` under `out_dir`; see the module docstring. Never raises for a bad marker.
    With `listing` (`list_output`), what it saw stands for the folders: no `stat` per file."""
    out_dir = Path(out_dir)
    path = marker_path(out_dir, stem)
    if not (listing.has(f"stats/{stem}.json") if listing is not None else path.is_file()):
        return ShardCheck(stem, "absent", problem="no done marker")
    try:
        marker = DoneMarker.from_json(json.loads(path.read_text()), copy=False)
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError, AttributeError) as exc:
        return ShardCheck(stem, "damaged", problem=f"{relative_name(out_dir, path)} is not a readable done marker ({exc})")
    if not isinstance(marker.files, dict):
        return ShardCheck(stem, "damaged", problem=f"{relative_name(out_dir, path)} lists its files wrongly")
    has_receipt = listing is None or listing.has(f"{RECEIPTS_DIR}/{stem}.json")
    stored = receipt_sizes(out_dir, stem) if has_receipt else {}
    for name, record in marker.files.items():
        problem = _file_problem(out_dir, name, record, checksums, stored, listing)
        if problem is not None:
            return ShardCheck(stem, "damaged", marker, problem)
    return ShardCheck(stem, "done", marker)


def output_stems(out_dir: Path) -> list[str]:
    """Every shard stem that has a tar, a jsonl or a marker under `out_dir`, sorted."""
    out_dir = Path(out_dir)
    stems = {p.name[: -len(".tar")] for p in (out_dir / "shards").glob("*.tar")}
    stems |= {p.stem for p in (out_dir / "stats").glob("*.jsonl")}
    stems |= {p.stem for p in (out_dir / "stats").glob("*.json")}
    return sorted(s for s in stems if not s.startswith("."))


def verify_output(out_dir: Path) -> list[ShardCheck]:
    """Every shard of an output folder checked with checksums. When the done shards were made with
    more than one config, those outside the most common one are `damaged` (the output mixes configs)."""
    out_dir = Path(out_dir)
    if not (out_dir / "shards").is_dir() and not (out_dir / "stats").is_dir():
        raise VidbatchError(f"{out_dir} has no shards/ or stats/ folder: not the output folder of a `vidbatch run` "
                            "(give the folder you passed to --output)")
    checks = [check_shard(out_dir, stem, checksums=True) for stem in output_stems(out_dir)]
    hashes: dict[str, list[str]] = {}
    for check in checks:
        if check.state == "done" and check.marker is not None and check.marker.config_hash is not None:
            hashes.setdefault(check.marker.config_hash, []).append(check.stem)
    if len(hashes) <= 1:
        return checks
    majority = max(hashes, key=lambda h: len(hashes[h]))
    mixed = {stem: h for h, stems in hashes.items() if h != majority for stem in stems}
    return [ShardCheck(c.stem, "damaged", c.marker,
                       f"made with config {mixed[c.stem]}, most shards with {majority}: the output mixes configs")
            if c.stem in mixed else c for c in checks]


def intact_marker(out_dir: Path, stem: str) -> DoneMarker | None:
    """The shard's done marker when the shard is done and its files are whole (`check_shard`); None when it
    is not done, or its marker cannot be read, or a file is missing or of the wrong size (it is redone)."""
    check = check_shard(out_dir, stem)
    return check.marker if check.state == "done" else None


def is_intact(out_dir: Path, stem: str) -> bool:
    """Whether the shard is done and its files are whole: what resuming, leases and the finaliser count as done."""
    return intact_marker(out_dir, stem) is not None
