"""Output shards: written under temporary names, renamed when complete, done marker written last.

Layout under the output folder (the output contract other tools read):
- `shards/{stem}.tar`: one WebDataset sample per input video: `{key}.{edit}.mp4` per edit, `{key}.json`;
- `stats/{stem}.jsonl`: one row per (video, edit);
- `stats/{stem}.json`: the shard's done marker, written only after both files above are complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import webdataset as wds

from vidbatch.core.atomic import TMP_SUFFIX, atomic_write, publish, temporary_path


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
    """Writes `data` as indented JSON atomically: readers see the old file or the whole new one."""
    atomic_write(path, json.dumps(data, indent=2))


def remove_stale_temporaries(out_dir: Path, stem: str) -> None:
    """Deletes the temporary files an interrupted attempt at this shard left behind.

    Matches the names `core.atomic.temporary_path` gives: `.{name}.{pid}.{random}.tmp`.
    """
    for folder, name in (("shards", f"{stem}.tar"), ("stats", f"{stem}.jsonl"), ("stats", f"{stem}.json")):
        for tmp in (Path(out_dir) / folder).glob(f".{name}.*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)


class ShardOutput:
    """Appends samples to one output shard; `commit` makes it visible, `abort` throws it away."""

    def __init__(self, out_dir: str | Path, stem: str):
        self.out_dir = Path(out_dir)
        self.stem = stem
        (self.out_dir / "shards").mkdir(parents=True, exist_ok=True)
        (self.out_dir / "stats").mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out_dir, stem)
        # Streamed into unique temporaries (a retry racing this attempt never shares them), published in `commit`.
        self._tar_tmp = temporary_path(shard_path(self.out_dir, stem))
        self._rows_tmp = temporary_path(rows_path(self.out_dir, stem))
        self._tar_file = open(self._tar_tmp, "xb")
        self._tar = wds.TarWriter(self._tar_file, encoder=False)
        self._rows_file = open(self._rows_tmp, "x")
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
        self._tar.close()  # writes the tar's end blocks; leaves the file open
        self._tar_file.close()
        self._rows_file.close()
        publish(self._tar_tmp, shard_path(self.out_dir, self.stem))
        publish(self._rows_tmp, rows_path(self.out_dir, self.stem))
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
