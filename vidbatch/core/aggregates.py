"""What the run summary needs from a shard's rows, small enough to carry in its done marker.

A summary over a million rows cannot hold them all; it merges per-shard aggregates instead:

- `Dist`: one figure's values (a metric, a stage's seconds, the peak memory) as count, sum, min and max
  plus either the values themselves (while there are few: `MARKER_EXACT` in a marker, `SUMMARY_EXACT`
  in a merged summary) or a log-scale histogram whose buckets are 2% wide, so a quantile read from it
  is within 1% of a value of the data. Merging two is adding their counts: the order of the shards does
  not change the result beyond float rounding of the sum.
- `ShardAggregates`: per editing method the edits ok and failed and every figure's `Dist`; the videos
  with an ok edit, the failures by cause, what produced the metrics, the weights fingerprints and the
  metric errors. `ShardAggregates.from_rows` is how both the writer (into the marker) and the summary
  (for an older marker that has none) make one, so the two agree.

The JSON of these is part of the done marker (`DoneMarker.aggregates`); `AGGREGATES_VERSION` names its
layout, and a reader that meets another version falls back to the rows.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

AGGREGATES_VERSION = 1
# Values kept as they are (exact quantiles): up to this many per figure in a marker, and in a merged summary.
MARKER_EXACT = 64
SUMMARY_EXACT = 4096
# Bucket i of the histogram holds the values v with GAMMA**(i-1) < |v| <= GAMMA**i.
GAMMA = 1.02
_LOG_GAMMA = math.log(GAMMA)
# Stage times of a row (`core.rows.EditRow.seconds`, which imports this module), in the order they are
# written; `total` is the sum of the others (including any stage an editing method adds) and stays last.
STAGES = ("decode", "invert", "edit", "encode", "metrics", "total")


def _nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The `q` quantile of sorted values, nearest rank."""
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _bucket(value: float) -> int:
    return math.ceil(math.log(abs(value)) / _LOG_GAMMA)


def _bucket_value(index: int) -> float:
    """The value a bucket stands for: the middle of its range in relative terms (within 1% of any value in it)."""
    return 2 * GAMMA ** index / (GAMMA + 1)


@dataclass
class Dist:
    """The values of one figure, mergeable; see the module docstring."""

    n: int = 0
    total: float = 0.0                      # the sum (kept separately only once `values` is dropped)
    low: float = math.inf
    high: float = -math.inf
    values: list[float] | None = field(default_factory=list)   # every value, while there are few
    positive: dict[int, int] = field(default_factory=dict)     # bucket -> count, once `values` is None
    negative: dict[int, int] = field(default_factory=dict)
    zeros: int = 0
    other: int = 0                           # non-finite values: counted, not bucketed

    def add(self, value: float, exact_limit: int = SUMMARY_EXACT) -> None:
        value = float(value)
        self.n += 1
        self.total += value
        self.low = min(self.low, value)
        self.high = max(self.high, value)
        if self.values is not None:
            self.values.append(value)
            if len(self.values) > exact_limit:
                self._to_buckets()
        else:
            self._bucket_add(value, 1)

    def _bucket_add(self, value: float, count: int) -> None:
        if not math.isfinite(value):
            self.other += count
        elif value == 0:
            self.zeros += count
        else:
            side = self.positive if value > 0 else self.negative
            index = _bucket(value)
            side[index] = side.get(index, 0) + count

    def _to_buckets(self) -> None:
        values, self.values = self.values or [], None
        for value in values:
            self._bucket_add(value, 1)

    def merge(self, other: Dist, exact_limit: int = SUMMARY_EXACT) -> None:
        """Adds `other`'s values to these (`other` is left as it was)."""
        if other.n == 0:
            return
        self.n += other.n
        self.total = self.sum + other.sum
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)
        if self.values is not None and other.values is not None and len(self.values) + len(other.values) <= exact_limit:
            self.values.extend(other.values)
            return
        if self.values is not None:
            self._to_buckets()
        if other.values is not None:
            for value in other.values:
                self._bucket_add(value, 1)
        else:
            for index, count in other.positive.items():
                self.positive[index] = self.positive.get(index, 0) + count
            for index, count in other.negative.items():
                self.negative[index] = self.negative.get(index, 0) + count
            self.zeros += other.zeros
            self.other += other.other

    @property
    def exact(self) -> bool:
        return self.values is not None

    @property
    def sum(self) -> float:
        # With the values at hand, their sum in written order: what a sum over the rows gives.
        return sum(self.values) if self.values is not None else self.total

    def quantile(self, q: float) -> float:
        """The `q` quantile, nearest rank: exact while the values are kept, else a bucket's value (clamped
        to the min and max) within 1% of the value of that rank."""
        if self.values is not None:
            return _nearest_rank(sorted(self.values), q)
        rank = min(self.n - 1, int(round(q * (self.n - 1))))
        seen = 0
        # Ascending order: the negative buckets from the largest magnitude, zeros, the positive ones.
        for value, count in ([(-_bucket_value(i), c) for i, c in sorted(self.negative.items(), reverse=True)]
                             + [(0.0, self.zeros)]
                             + [(_bucket_value(i), c) for i, c in sorted(self.positive.items())]):
            seen += count
            if rank < seen:
                return min(max(value, self.low), self.high)
        return self.high   # the rank falls among the non-finite values

    def mean(self) -> float:
        if self.values is not None:
            return sum(sorted(self.values)) / self.n
        return self.total / self.n

    def distribution(self) -> dict[str, float] | None:
        """Count, mean, min, p10, p50, p90 and max; None when empty (the summary's metric statistics)."""
        if self.n == 0:
            return None
        return {"n": self.n, "mean": self.mean(), "min": self.low, "p10": self.quantile(0.1),
                "p50": self.quantile(0.5), "p90": self.quantile(0.9), "max": self.high}

    def percentiles(self) -> dict[str, float] | None:
        """Mean, median, p90 and maximum; None when empty (the summary's time and memory figures)."""
        if self.n == 0:
            return None
        return {"mean": self.mean(), "p50": self.quantile(0.5), "p90": self.quantile(0.9), "max": self.high}

    def histogram(self, bins: int = 20) -> dict[str, Any] | None:
        """Counts in `bins` equal-width bins from the min to the max: {"edges": [bins + 1], "counts": [bins]}.
        From the bucket values once the values are dropped (a count may then sit one bin off)."""
        if self.n == 0 or not (math.isfinite(self.low) and math.isfinite(self.high)):
            return None
        width = (self.high - self.low) / bins or 1.0
        counts = [0] * bins

        def put(value: float, count: int) -> None:
            if math.isfinite(value):
                counts[min(bins - 1, max(0, int((value - self.low) / width)))] += count

        if self.values is not None:
            for value in self.values:
                put(value, 1)
        else:
            for index, count in self.positive.items():
                put(min(max(_bucket_value(index), self.low), self.high), count)
            for index, count in self.negative.items():
                put(min(max(-_bucket_value(index), self.low), self.high), count)
            put(0.0, self.zeros)
        return {"edges": [self.low + width * i for i in range(bins + 1)], "counts": counts}

    def to_json(self) -> dict[str, Any]:
        if self.values is not None:   # the rest follows from the values (a marker stays small to read)
            return {"values": list(self.values)}
        # JSON keys are strings: the bucket index as text.
        return {"n": self.n, "sum": self.sum, "min": self.low, "max": self.high,
                "pos": {str(k): v for k, v in self.positive.items()},
                "neg": {str(k): v for k, v in self.negative.items()}, "zeros": self.zeros, "other": self.other}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Dist:
        if "values" in data:
            values = [float(v) for v in data["values"]]
            return cls(n=len(values), total=sum(values), low=min(values, default=math.inf),
                       high=max(values, default=-math.inf), values=values)
        return cls(n=int(data["n"]), total=float(data["sum"]), low=float(data["min"]), high=float(data["max"]),
                   values=None, positive={int(k): int(v) for k, v in data.get("pos", {}).items()},
                   negative={int(k): int(v) for k, v in data.get("neg", {}).items()},
                   zeros=int(data.get("zeros", 0)), other=int(data.get("other", 0)))


def failure_cause(error: str, key: str | None = None) -> str:
    """Groups error messages by cause: drops the sample-specific parts, never a word's own digits.

    The sample's key becomes `<key>`, quoted values `'…'`, and numbers standing alone (`12 frames`,
    `1.5 MB`, `640x480`) `N`; digits inside a word stay (`mp4`, `h264`, `x264`), so causes keep
    their text. Of `cannot decode KEY.EXT: cause`, only the cause is kept.
    """
    cause = error.split(": ", 1)[1] if error.startswith("cannot decode ") and ": " in error else error
    if key:
        cause = re.sub(rf"(?<![\w.]){re.escape(key)}(?![\w])", "<key>", cause)
    cause = re.sub(r"'[^']*'", "'…'", cause)
    return _NUMBER.sub(_number_to_n, cause)[:160]


# A number that starts a word: digits, a fraction, `x` and more digits (a size), then letters (a unit).
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:x\d+)?([A-Za-z]*)(?!\w|\.\d)")
_UNITS = {"", "s", "ms", "h", "B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB", "px", "fps", "k", "M", "G"}


def _number_to_n(match: re.Match) -> str:
    """`12` -> `N`, `1.5MB` -> `NMB`, `640x480` -> `N`; a word that only starts with digits (`3gp`,
    `2pass`...) is a name, kept whole."""
    unit = match.group(1)
    return "N" + unit if unit in _UNITS else match.group(0)


def _series_names(row: Any) -> Iterable[tuple[str, float]]:
    """The figures of an ok row: each metric with a value, each stage's seconds (a stage a row lacks, as
    in rows written before metrics existed, cost it nothing), seconds per frame, peak memory."""
    for key, value in (row.metrics or {}).items():
        if value is not None:
            yield f"metric:{key}", value
    for stage in STAGES:
        yield f"stage:{stage}", row.seconds.get(stage, 0.0)
    if row.frames:
        yield "spf:edit", row.seconds.get("edit", 0.0) / row.frames
        yield "spf:total", row.seconds.get("total", 0.0) / row.frames
    if row.peak_memory_mb is not None:
        yield "memory", row.peak_memory_mb


@dataclass
class MethodAggregates:
    """One editing method's edits: counts and every figure over its ok rows."""

    ok: int = 0
    failed: int = 0
    series: dict[str, Dist] = field(default_factory=dict)

    def merge(self, other: MethodAggregates, exact_limit: int = SUMMARY_EXACT) -> None:
        self.ok += other.ok
        self.failed += other.failed
        for name, dist in other.series.items():
            self.series.setdefault(name, Dist()).merge(dist, exact_limit)

    def figure(self, name: str) -> Dist:
        """The figure `name` (empty when no row had it)."""
        return self.series.get(name, Dist())


@dataclass
class ShardAggregates:
    """Everything the run summary reads from a shard's rows; see the module docstring.

    `methods` is keyed by the rows' `method` ("" for rows written before rows named theirs: the summary
    counts them as the run's method), in the order the rows first name them.
    """

    methods: dict[str, MethodAggregates] = field(default_factory=dict)
    videos_ok: int = 0                        # distinct keys with an ok edit (per shard, then summed)
    failures: dict[str, int] = field(default_factory=dict)     # cause -> edits, in order of first appearance
    metrics_by_rows: int = 0                  # ok rows that say what produced their metrics
    flows: list[str] = field(default_factory=list)
    clips: list[str] = field(default_factory=list)
    clip_off: list[str] = field(default_factory=list)
    fingerprints: list[str] = field(default_factory=list)
    metrics_errors: int = 0                   # ok rows whose metrics raised

    @classmethod
    def from_rows(cls, rows: Iterable[Any], exact_limit: int = MARKER_EXACT) -> ShardAggregates:
        """The aggregates of one shard's `EditRow`s."""
        agg = cls()
        keys: set[str] = set()
        failures: Counter[str] = Counter()
        flows: set[str] = set()
        clips: set[str] = set()
        reasons: set[str] = set()
        prints: set[str] = set()
        for row in rows:
            method = agg.methods.setdefault(row.method or "", MethodAggregates())
            if not row.ok:
                method.failed += 1
                failures[failure_cause(row.error or "unknown", row.key)] += 1
                continue
            method.ok += 1
            keys.add(row.key)
            for name, value in _series_names(row):
                method.series.setdefault(name, Dist()).add(value, exact_limit)
            if row.metrics_by:
                agg.metrics_by_rows += 1
                for values, name in ((flows, "flow"), (clips, "clip"), (reasons, "clip_off")):
                    if row.metrics_by.get(name) is not None:
                        values.add(row.metrics_by[name])
            if row.model_fingerprint is not None:
                prints.add(row.model_fingerprint)
            agg.metrics_errors += bool(row.metrics_error)
        agg.videos_ok = len(keys)
        agg.failures = dict(failures)
        agg.flows, agg.clips, agg.clip_off = sorted(flows, key=str), sorted(clips, key=str), sorted(reasons, key=str)
        agg.fingerprints = sorted(prints, key=str)
        return agg

    def merge(self, other: ShardAggregates, exact_limit: int = SUMMARY_EXACT) -> None:
        """Adds `other` (a later shard) to these."""
        for name, method in other.methods.items():
            self.methods.setdefault(name, MethodAggregates()).merge(method, exact_limit)
        self.videos_ok += other.videos_ok
        for cause, count in other.failures.items():
            self.failures[cause] = self.failures.get(cause, 0) + count
        self.metrics_by_rows += other.metrics_by_rows
        self.flows = sorted(set(self.flows) | set(other.flows), key=str)
        self.clips = sorted(set(self.clips) | set(other.clips), key=str)
        self.clip_off = sorted(set(self.clip_off) | set(other.clip_off), key=str)
        self.fingerprints = sorted(set(self.fingerprints) | set(other.fingerprints), key=str)
        self.metrics_errors += other.metrics_errors

    def series(self, name: str) -> Dist:
        """Figure `name` over every method's ok rows."""
        out = Dist()
        for method in self.methods.values():
            if name in method.series:
                out.merge(method.series[name])
        return out

    def to_json(self) -> dict[str, Any]:
        return {"version": AGGREGATES_VERSION,
                "methods": {name: {"ok": m.ok, "failed": m.failed,
                                   "series": {k: d.to_json() for k, d in m.series.items()}}
                            for name, m in self.methods.items()},
                "videos_ok": self.videos_ok, "failures": dict(self.failures),
                "metrics_by": {"rows": self.metrics_by_rows, "flow": self.flows, "clip": self.clips,
                               "clip_off": self.clip_off},
                "fingerprints": self.fingerprints, "metrics_errors": self.metrics_errors}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardAggregates | None:
        """The aggregates of a marker, or None when they are of another layout (then read the rows)."""
        if not isinstance(data, Mapping) or data.get("version") != AGGREGATES_VERSION:
            return None
        by = data["metrics_by"]
        return cls(methods={name: MethodAggregates(ok=int(m["ok"]), failed=int(m["failed"]),
                                                   series={k: Dist.from_json(d) for k, d in m["series"].items()})
                            for name, m in data["methods"].items()},
                   videos_ok=int(data["videos_ok"]), failures={str(k): int(v) for k, v in data["failures"].items()},
                   metrics_by_rows=int(by["rows"]), flows=list(by["flow"]), clips=list(by["clip"]),
                   clip_off=list(by["clip_off"]), fingerprints=list(data["fingerprints"]),
                   metrics_errors=int(data["metrics_errors"]))
