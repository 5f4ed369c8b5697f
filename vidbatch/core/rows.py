"""The records of the output contract (README, "Output"): edit rows, sample records, done markers.

Other tools read these files, so their JSON is fixed: `to_json()` gives exactly the keys below, in
this order (the dataclass field order), with the values as written since the first release.

- `EditRow`: one per (video, edit), a line of `stats/{stem}.jsonl` and an item of `{key}.json`'s rows.
  A sample that failed (bad video, missing prompt, an editing error) is an `EditRow` with status
  `failed` and `error` naming the cause: there is no separate per-sample failure record.
- `SampleRecord`: `{key}.json` in the output shard, the rows of one video.
- `DoneMarker`: `stats/{stem}.json`, written last; its presence means the shard is complete. It
  records the hash of the config that shaped the output and each output file's size and sha256, so a
  rerun can tell a complete shard from a damaged one or one made with another config, and the
  aggregates of its rows that the run summary merges (`core.aggregates`).

`from_json` refuses keys it does not know (a reader and a writer out of step should fail loudly,
not drop a field) and fills fields that are missing with their defaults (rows written before a
field existed still read).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from vidbatch.core.aggregates import STAGES, ShardAggregates

STATUS_OK = "ok"
STATUS_FAILED = "failed"
RowStatus = Literal["ok", "failed"]
# How the inversion of a row was obtained: from the cache ("hit"), computed and stored ("miss"),
# computed without a cache ("off"), or made for an earlier edit of the same video ("shared");
# null on a failed row that never got that far.
InversionCacheUse = Literal["hit", "miss", "off", "shared"]

_Record = TypeVar("_Record")


def _from_json(cls: type[_Record], data: Mapping[str, Any], copy: bool = True) -> _Record:
    """`cls(**data)`, refusing unknown keys and naming the missing required ones. `copy=False` when
    `data` was just parsed and is the caller's alone (a deep copy of a marker's aggregates costs more
    than reading it)."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    required = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{cls.__name__}: missing field(s) {', '.join(missing)}")
    return cls(**{name: _copy(data[name]) if copy else data[name] for name in names if name in data})


def _copy(value: Any) -> Any:
    """A copy of nested dicts and lists, so a record never shares mutable state with its source."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def zero_seconds() -> dict[str, float]:
    """Every stage at 0.0, in the written order."""
    return dict.fromkeys(STAGES, 0.0)


@dataclass
class EditRow:
    """One (video, edit): what was done, how long each stage took, and the quality metrics.

    Built by `EditRow.pending` (in the worker's module) before the edit runs, then filled in.
    """

    key: str                                  # the sample's WebDataset key
    edit: str                                 # the edit's name (the `{edit}.mp4` member)
    status: RowStatus = STATUS_FAILED         # `ok` only once the edited video is encoded
    error: str | None = None                  # the cause when failed, else null
    frames: int | None = None                 # decoded (edited) frames; null when decoding failed
    width: int | None = None
    height: int | None = None
    fps: float | None = None                  # of the decoded frames (source fps / stride)
    prompt: str | None = None                 # the edit prompt as used ({prompt} filled in); null if failed
    inversion_cache: InversionCacheUse | None = None
    seconds: dict[str, float] = field(default_factory=zero_seconds)  # keys: STAGES (+ any method stage)
    peak_memory_mb: float | None = None       # CUDA max allocated, or the process's peak RSS on a CPU
    metrics: dict[str, float | None] = field(default_factory=dict)  # metric name -> value, null if off
    metrics_by: dict[str, str | None] | None = None  # {flow, clip, clip_off}: what produced the metrics
    model_fingerprint: str | None = None      # weights fingerprint (computed for the inversion cache)
    metrics_error: str | None = None          # a metric that raised (the edit itself is kept)
    method: str | None = None                 # the edit's edit.method (an edit may have its own)
    settings: dict[str, Any] | None = None    # what the edit ran with: edit.*, inversion, method/control sections

    @classmethod
    def pending(cls, key: str, edit: str, *, metric_names: Iterable[str], error: str | None = None,
                frames: int | None = None, width: int | None = None, height: int | None = None,
                fps: float | None = None) -> EditRow:
        """The row of an edit about to run: `failed` (with `error`, if any) until the edit succeeds, every
        stage at 0 and every metric null, so a row that fails at any point is still complete."""
        return cls(key=key, edit=edit, status=STATUS_FAILED, error=error, frames=frames, width=width,
                   height=height, fps=fps, metrics=dict.fromkeys(metric_names))

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def close_seconds(self) -> None:
        """Sets `seconds.total` to the sum of the other stages and rounds every time to 0.1 ms."""
        self.seconds["total"] = sum(v for k, v in self.seconds.items() if k != "total")
        self.seconds = {k: round(v, 4) for k, v in self.seconds.items()}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EditRow:
        return _from_json(cls, data)


@dataclass
class SampleRecord:
    """`{key}.json` in an output shard: the sample's key and its rows (the same as in the jsonl)."""

    key: str
    rows: list[EditRow]

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "rows": [row.to_json() for row in self.rows]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SampleRecord:
        unknown = sorted(set(data) - {"key", "rows"})
        if unknown or "key" not in data or "rows" not in data:
            raise ValueError(f"SampleRecord: want the fields key and rows, got {', '.join(sorted(data))}")
        return cls(key=data["key"], rows=[EditRow.from_json(row) for row in data["rows"]])


@dataclass
class DoneMarker:
    """`stats/{stem}.json`: the shard is complete (its tar and jsonl are under their final names).

    Runs resume by skipping shards that have one whose files still match it (`files`) and whose
    `config_hash` is the run's; the Ray driver takes its counts as the truth. Markers written before
    `config_hash` and `files` existed read with null / {} there.
    """

    shard: str           # the input shard's URL
    stem: str            # the output name: shards/{stem}.tar, stats/{stem}.jsonl
    samples: int         # videos in the shard
    samples_ok: int      # videos whose every edit is ok
    samples_failed: int  # videos with at least one failed edit
    rows_ok: int
    rows_failed: int
    frames: int          # edited frames over the ok rows
    seconds: float       # wall time of the shard, writer start to commit
    started_at: str      # ISO 8601, UTC, whole seconds
    finished_at: str
    config_hash: str | None = None   # hash of the output-shaping config (config.output_hash)
    # Output files by path relative to OUT (`shards/{stem}.tar`, `stats/{stem}.jsonl`): {"bytes", "sha256"}.
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    # What the run summary needs from the rows (`core.aggregates.ShardAggregates`), so a summary over many
    # shards reads the markers only; null in markers written before it existed (the summary reads their rows).
    aggregates: dict[str, Any] | None = None

    @classmethod
    def for_shard(cls, *, shard: str, stem: str, keys: Sequence[str], rows: Sequence[EditRow], seconds: float,
                  started_at: str, finished_at: str, config_hash: str | None = None) -> DoneMarker:
        """The marker of a shard whose samples are `keys` and whose rows are `rows` (`files` are
        filled in by the commit, once the files are closed)."""
        failed_keys = {row.key for row in rows if not row.ok}
        return cls(shard=shard, stem=stem, samples=len(keys), samples_ok=len(keys) - len(failed_keys),
                   samples_failed=len(failed_keys), rows_ok=sum(row.ok for row in rows),
                   rows_failed=sum(not row.ok for row in rows),
                   frames=sum(row.frames or 0 for row in rows if row.ok),
                   seconds=round(seconds, 3), started_at=started_at, finished_at=finished_at,
                   config_hash=config_hash, aggregates=ShardAggregates.from_rows(rows).to_json())

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], copy: bool = True) -> DoneMarker:
        return _from_json(cls, data, copy)
