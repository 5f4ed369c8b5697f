"""The run summary: `OUT/summary.json` built from the shards' done markers, its rich table, and
reading a finished run back (its summary and rows) for the report.

The summary streams: it merges each done shard's aggregates (`core.aggregates`, carried in its marker;
for a marker of an earlier release, made from that shard's rows) and never holds the rows of more than
one shard, so its memory does not grow with the rows. Quantiles are exact while a figure has at most
`SUMMARY_EXACT` values (`"quantiles": "exact"`), within 1% above that (`"within 1%"`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Sequence

import cv2
from rich.console import Console
from rich.table import Table

from vidbatch.core.version import __version__
from vidbatch.config.schema import Config, resolve_control_name
from vidbatch.core.atomic import atomic_write
from vidbatch.core.errors import VidbatchError
from vidbatch.metrics import get_metric, metric_keys
from vidbatch.core.errors import ConfigError
from vidbatch.dispatch.plan import read_plan_file
from vidbatch.io.input_shards import shard_stem
from vidbatch.core.aggregates import Dist, MethodAggregates, ShardAggregates, failure_cause
from vidbatch.core.rows import STAGES, EditRow
from vidbatch.io.output_shards import read_rows
from vidbatch.io.shard_check import list_output, shard_checker

__all__ = ["failure_cause", "build_summary", "scan_output", "OutputScan", "iter_rows", "ShardRow"]

FLOW_NAMES = {"dis": "DIS (medium preset)", "farneback": "Farneback"}
PACKAGES = ("torch", "diffusers", "transformers", "lightning", "webdataset", "opencv-python-headless")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def metrics_by(agg: ShardAggregates, config: Config) -> dict:
    """Which flow and CLIP produced the metrics, or why CLIP is off, stated once for the run.

    Read from the rows (each worker records what it loaded), falling back to the config when no
    edit succeeded. Several workers that disagree are listed, joined by '; '.
    """
    m = config.metrics
    if agg.metrics_by_rows:
        flows, clips, reasons = agg.flows, agg.clips, agg.clip_off
    else:
        flows = [m.flow] if m.warp_error else []
        clips, reasons = [], []
        if m.clip_model is None or str(m.clip_model).strip().lower() in ("", "none"):
            reasons = ["disabled"]
    flow = "; ".join(flows) or None
    return {
        "flow": flow,
        "flow_impl": (f"OpenCV {cv2.__version__} " + "; ".join(FLOW_NAMES.get(f, f) for f in flows) +
                      " optical flow on the source frames") if flows else None,
        "clip_model": "; ".join(clips) or None,
        "clip_off": "; ".join(reasons) or None,
    }


@dataclass
class OutputScan:
    """What one pass over the done shards of a run gathers: which are done, their markers' counts and
    times, and their merged aggregates. Nothing in it grows with the rows."""

    done: set[str] = field(default_factory=set)
    samples: int = 0
    samples_ok: int = 0
    samples_failed: int = 0
    frames: int = 0
    shard_seconds: float = 0.0
    first_start: datetime | None = None
    last_finish: datetime | None = None
    aggregates: ShardAggregates = field(default_factory=ShardAggregates)
    from_rows: int = 0        # done shards whose marker had no aggregates (their rows were read)

    @property
    def span_seconds(self) -> float:
        """From the first shard's start to the last one's end (every driver's shards)."""
        if self.first_start is None or self.last_finish is None:
            return 0.0
        return (self.last_finish - self.first_start).total_seconds()


def scan_output(out_dir: Path, stems: Sequence[str]) -> OutputScan:
    """One pass over the shards of `stems` that are done (a readable marker whose files are all there, at
    their recorded sizes; a damaged shard counts as not done), against one listing of the output."""
    out_dir = Path(out_dir)
    check_one = shard_checker(out_dir)
    scan = OutputScan()
    for stem in stems:
        check = check_one(stem)
        marker = check.marker
        if check.state != "done" or marker is None:
            continue
        scan.done.add(stem)
        scan.samples += marker.samples
        scan.samples_ok += marker.samples_ok
        scan.samples_failed += marker.samples_failed
        scan.frames += marker.frames
        scan.shard_seconds += marker.seconds
        start, finish = datetime.fromisoformat(marker.started_at), datetime.fromisoformat(marker.finished_at)
        scan.first_start = start if scan.first_start is None else min(scan.first_start, start)
        scan.last_finish = finish if scan.last_finish is None else max(scan.last_finish, finish)
        agg = ShardAggregates.from_json(marker.aggregates) if marker.aggregates is not None else None
        if agg is None:   # a marker of an earlier release: its rows, this once
            agg = ShardAggregates.from_rows(read_rows(out_dir, stem))
            scan.from_rows += 1
        scan.aggregates.merge(agg)
    return scan


def _metric_distributions(series: dict[str, Dist] | ShardAggregates) -> dict[str, dict[str, float] | None]:
    """Each registered metric's distribution over the successful edits that have a value for it."""
    get = series.series if isinstance(series, ShardAggregates) else (lambda name: series.get(name, Dist()))
    return {key: get(f"metric:{key}").distribution() for key in metric_keys()}


def _by_method(agg: ShardAggregates, default_method: str) -> dict[str, dict]:
    """Per editing method (rows written before rows named theirs count as `default_method`): edits ok and
    failed, every metric's distribution, seconds per frame of the edit (its own denoising and decoding) and
    of the whole row (`total`, which carries the inversion on the row that made it), peak memory."""
    grouped: dict[str, MethodAggregates] = {}   # rows without a method and rows naming the run's are one
    for name, method in agg.methods.items():
        grouped.setdefault(name or default_method, MethodAggregates()).merge(method)
    return {name: {"edits": {"ok": g.ok, "failed": g.failed},
                   "metrics": _metric_distributions(g.series),
                   "seconds_per_frame": {"edit": g.figure("spf:edit").distribution(),
                                         "total": g.figure("spf:total").distribution()},
                   "peak_memory_mb": g.figure("memory").percentiles()}
            for name, g in grouped.items()}


# The figures `summary.json` gives a histogram of (`distributions`): for the report's charts.
HISTOGRAMS = ("stage:total", "stage:invert", "stage:edit", "memory")


def _histograms(agg: ShardAggregates) -> dict[str, dict | None]:
    names = [*HISTOGRAMS, *(f"metric:{key}" for key in metric_keys())]
    return {name: agg.series(name).histogram() for name in names}


def _all_exact(agg: ShardAggregates) -> bool:
    return all(dist.exact for method in agg.methods.values() for dist in method.series.values()) and \
        all(agg.series(name).exact for name in ("stage:total", "memory"))


def build_summary(out_dir: Path, config: Config, stems: Sequence[str], urls: Sequence[str],
                  failed_shards: dict[str, str], wall_seconds: float, scan: OutputScan | None = None) -> dict:
    """Summarises every shard of the run (this invocation's and earlier ones' done shards), from their
    markers' aggregates (`scan`, made by `scan_output` when None)."""
    scan = scan if scan is not None else scan_output(out_dir, stems)
    agg = scan.aggregates
    shard_seconds = scan.shard_seconds
    ok = sum(m.ok for m in agg.methods.values())
    failed = sum(m.failed for m in agg.methods.values())
    frames = scan.frames
    videos = agg.videos_ok
    stage_seconds = {stage: agg.series(f"stage:{stage}").percentiles() for stage in STAGES}
    metric_seconds = agg.series("stage:metrics").sum
    total_seconds = agg.series("stage:total").sum
    fingerprints = agg.fingerprints
    methods = _by_method(agg, config.edit.method)
    return {
        "vidbatch_version": __version__,
        "model": config.model.id,
        "loras": [{"path": l.path, "scale": l.scale} for l in config.model.loras],
        "method": config.edit.method,
        "control": resolve_control_name(config.edit.method, config.edit.control),   # "auto" resolved
        "methods": list(methods),          # every method the rows ran with (several: a comparison run)
        "config_hash": config.digest(),
        "model_version": {
            "id": config.model.id,
            # From the workers' rows; null when no worker computed it (it is computed for the inversion cache).
            "fingerprint": fingerprints[0] if len(fingerprints) == 1 else None,
            "fingerprints": fingerprints,
        },
        "packages": package_versions(),
        "shards": {"total": len(stems), "done": len(scan.done), "failed": len(failed_shards),
                   "failed_shards": failed_shards},
        "samples": {"total": scan.samples, "ok": scan.samples_ok, "failed": scan.samples_failed},
        "edits": {"ok": ok, "failed": failed},
        "failures_by_cause": dict(Counter(agg.failures).most_common()),
        "frames_edited": frames,
        "throughput": {
            "videos_per_hour": videos / shard_seconds * 3600 if shard_seconds else None,
            "frames_per_second": frames / shard_seconds if shard_seconds else None,
        },
        "device_hours": shard_seconds / 3600,
        "wall_seconds": round(wall_seconds, 3),
        "seconds_per_edit": stage_seconds,
        "peak_memory_mb": agg.series("memory").percentiles(),
        "metrics": _metric_distributions(agg),
        "metrics_by": metrics_by(agg, config),
        "by_method": methods,
        "metrics_cost": {"seconds": round(metric_seconds, 4),
                         "share_of_total": metric_seconds / total_seconds if total_seconds else None,
                         "failed": agg.metrics_errors},
        "quantiles": "exact" if _all_exact(agg) else "within 1%",
        "distributions": _histograms(agg),
        "inputs": list(dict.fromkeys(urls)),   # the input shards (a shard's work items share its URL)
    }


def write_summary(out_dir: Path, summary: dict) -> Path:
    """Writes `OUT/summary.json` atomically; returns its path."""
    path = Path(out_dir) / "summary.json"
    atomic_write(path, json.dumps(summary, indent=2))
    return path


def load_summary(out_dir: Path) -> dict:
    """`OUT/summary.json` of a finished run; VidbatchError naming the folder when there is none."""
    path = Path(out_dir) / "summary.json"
    if not path.is_file():
        raise VidbatchError(f"no summary.json in {out_dir}: not the output folder of a finished "
                            "`vidbatch run` (run it first, or give the folder you passed to --output)")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class ShardRow:
    """An edit row as the report lists it: with the stem of the shard it came from."""

    shard: str
    row: EditRow


def run_items(out_dir: Path, summary: dict) -> list[tuple[str, str]]:
    """(output stem, input URL) of every work item of the run, in order: from `OUT/plan.json` (work items
    of `runtime.samples_per_task` are named apart from their shards), else one per input of the summary."""
    inputs = summary.get("inputs") or []
    try:
        urls, stems = read_plan_file(Path(out_dir))
    except ConfigError:
        urls, stems = [], []
    if set(urls) == set(inputs) and len(urls) == len(stems):
        return list(zip(stems, urls))
    return [(shard_stem(u), u) for u in inputs]


def run_stems(out_dir: Path, summary: dict) -> list[str]:
    """The output stems of the run's work items, in input order (a summary without inputs: every shard in
    the folder)."""
    stems = [stem for stem, _ in run_items(out_dir, summary)]
    if not stems:
        stems = sorted(list_output(Path(out_dir)).stems("stats", ".jsonl"))
    return stems


def iter_rows(out_dir: Path, summary: dict) -> Iterator[ShardRow]:
    """The rows of the run's work items, in input order, each with its output stem; one item read at a time."""
    for stem in run_stems(out_dir, summary):
        for row in read_rows(Path(out_dir), stem):
            yield ShardRow(stem, row)


def load_rows(out_dir: Path, summary: dict) -> list[ShardRow]:
    """Every row of the run at once: for small outputs and tests; the report streams (`iter_rows`)."""
    return list(iter_rows(out_dir, summary))


def _table_label(key: str) -> str:
    """A metric's row label in the run table: its name, and the direction when lower is better."""
    metric = get_metric(key)
    if metric is None:  # a key of an older run's rows that is no longer registered
        return key
    return f"{metric.label} (lower is better)" if metric.lower_is_better else metric.label


def print_summary(summary: dict, console: Console, out_dir: Path) -> None:
    table = Table(title=f"vidbatch run: {out_dir}", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    s = summary
    table.add_row("shards done / failed / total",
                  f"{s['shards']['done']} / {s['shards']['failed']} / {s['shards']['total']}")
    table.add_row("videos ok / failed", f"{s['samples']['ok']} / {s['samples']['failed']}")
    table.add_row("edits ok / failed", f"{s['edits']['ok']} / {s['edits']['failed']}")
    table.add_row("frames edited", str(s["frames_edited"]))
    fps = s["throughput"]["frames_per_second"]
    table.add_row("frames / s", f"{fps:.2f}" if fps else "-")
    total = s["seconds_per_edit"]["total"]
    table.add_row("seconds per edit (mean)", f"{total['mean']:.2f}" if total else "-")
    memory = s["peak_memory_mb"]
    table.add_row("peak memory MB (max)", f"{memory['max']:.0f}" if memory else "-")
    metric_s = (s.get("seconds_per_edit") or {}).get("metrics")
    if metric_s:
        share = s["metrics_cost"]["share_of_total"]
        table.add_row("metric seconds per edit (mean)",
                      f"{metric_s['mean']:.3f}" + (f" ({share:.0%} of total)" if share is not None else ""))
    for key, stats in (s.get("metrics") or {}).items():
        if stats is not None:
            table.add_row(f"mean {_table_label(key)}", f"{stats['mean']:.4g}")
    by = s.get("metrics_by") or {}
    if by.get("flow_impl"):
        table.add_row("warp error flow", by["flow_impl"])
    if by.get("clip_model"):
        table.add_row("CLIP model", by["clip_model"])
    if by.get("clip_off") and by["clip_off"] != "disabled":
        table.add_row("[yellow]CLIP scores off[/yellow]", by["clip_off"])
    for cause, count in s["failures_by_cause"].items():
        table.add_row(f"[red]failed: {cause}[/red]", str(count))
    console.print(table)
    if len(s.get("methods") or []) > 1:
        console.print(_methods_table(s))


def _methods_table(summary: dict) -> Table:
    """A comparison run's methods side by side: medians of the metrics, edit time per frame, peak memory."""
    by = summary["by_method"]
    table = Table(title="methods compared (medians)", show_header=True)
    table.add_column("what")
    for method in by:
        table.add_column(method, justify="right")

    def median(d: dict | None, digits: str = ".4g") -> str:
        return format(d["p50"], digits) if d else "-"

    table.add_row("edits ok / failed", *(f"{v['edits']['ok']} / {v['edits']['failed']}" for v in by.values()))
    for key in metric_keys():
        if any((v.get("metrics") or {}).get(key) for v in by.values()):
            table.add_row(_table_label(key), *(median((v.get("metrics") or {}).get(key)) for v in by.values()))
    table.add_row("edit s / frame", *(median(v["seconds_per_frame"]["edit"], ".3f") for v in by.values()))
    table.add_row("peak memory MB", *(median(v["peak_memory_mb"], ".0f") for v in by.values()))
    return table
