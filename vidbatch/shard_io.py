"""Output shards: written under temporary names, renamed when complete, done marker written last.

Layout under the output folder (the output contract other tools read):
- `shards/{stem}.tar`: one WebDataset sample per input video: `{key}.{edit}.mp4` per edit, `{key}.json`;
- `stats/{stem}.jsonl`: one row per (video, edit);
- `stats/{stem}.json`: the shard's done marker, written only after both files above are complete.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import webdataset as wds


def shard_path(out_dir: Path, stem: str) -> Path:
    return Path(out_dir) / "shards" / f"{stem}.tar"


def rows_path(out_dir: Path, stem: str) -> Path:
    return Path(out_dir) / "stats" / f"{stem}.jsonl"


def marker_path(out_dir: Path, stem: str) -> Path:
    return Path(out_dir) / "stats" / f"{stem}.json"


def is_done(out_dir: Path, stem: str) -> bool:
    return marker_path(out_dir, stem).is_file()


def read_marker(out_dir: Path, stem: str) -> dict | None:
    path = marker_path(out_dir, stem)
    return json.loads(path.read_text()) if path.is_file() else None


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes JSON to a temporary sibling, fsyncs, renames: readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_stale_temporaries(out_dir: Path, stem: str) -> None:
    """Deletes the temporary files an interrupted attempt at this shard left behind."""
    for folder, name in (("shards", f"{stem}.tar"), ("stats", f"{stem}.jsonl"), ("stats", f"{stem}.json")):
        for tmp in (Path(out_dir) / folder).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


class ShardOutput:
    """Appends samples to one output shard; `commit` makes it visible, `abort` throws it away."""

    def __init__(self, out_dir: str | Path, stem: str):
        self.out_dir = Path(out_dir)
        self.stem = stem
        (self.out_dir / "shards").mkdir(parents=True, exist_ok=True)
        (self.out_dir / "stats").mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out_dir, stem)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tar_tmp = self.out_dir / "shards" / f".{stem}.tar.{tag}.tmp"
        self._rows_tmp = self.out_dir / "stats" / f".{stem}.jsonl.{tag}.tmp"
        self._tar_file = open(self._tar_tmp, "wb")
        self._tar = wds.TarWriter(self._tar_file, encoder=False)
        self._rows_file = open(self._rows_tmp, "w")
        self.keys: list[str] = []
        self.rows: list[dict] = []

    def add(self, key: str, members: dict[str, bytes], rows: list[dict]) -> None:
        """One sample: `members` maps extensions (`{edit}.mp4`, `json`) to bytes; `rows` go to the jsonl."""
        if key in self.keys:
            raise ValueError(f"sample key {key!r} appears twice in shard {self.stem}")
        self._tar.write({"__key__": key, **members})
        for row in rows:
            self._rows_file.write(json.dumps(row) + "\n")
        self._rows_file.flush()
        self.keys.append(key)
        self.rows.extend(rows)

    def commit(self, marker: dict) -> dict:
        """Closes and renames the shard and its rows, then writes the done marker (last)."""
        self._tar.close()
        for f in (self._tar_file, self._rows_file):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        os.replace(self._tar_tmp, shard_path(self.out_dir, self.stem))
        os.replace(self._rows_tmp, rows_path(self.out_dir, self.stem))
        write_json_atomic(marker_path(self.out_dir, self.stem), marker)
        return marker

    def abort(self) -> None:
        for closer in (self._tar.close, self._tar_file.close, self._rows_file.close):
            try:
                closer()
            except Exception:  # the files are being thrown away; a failed close changes nothing
                pass
        self._tar_tmp.unlink(missing_ok=True)
        self._rows_tmp.unlink(missing_ok=True)
