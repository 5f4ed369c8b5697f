"""The run summary: `OUT/summary.json` built from the shards' stats files, its rich table, and
reading a finished run back (its summary and rows) for the report."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
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
from vidbatch.core.rows import DoneMarker, EditRow
from vidbatch.io.output_shards import read_rows
from vidbatch.io.shard_check import check_shard

FLOW_NAMES = {"dis": "DIS (medium preset)", "farneback": "Farneback"}
STAGES = ("decode", "invert", "edit", "encode", "metrics", "total")
PACKAGES = ("torch", "diffusers", "transformers", "lightning", "webdataset", "opencv-python-headless")


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



def _nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The `q` quantile of sorted values, nearest rank."""
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    """Mean, median, p90 and maximum (nearest rank) of a time or memory figure; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return {"mean": sum(ordered) / len(ordered), "p50": _nearest_rank(ordered, 0.5),
            "p90": _nearest_rank(ordered, 0.9), "max": ordered[-1]}


def distribution(values: Sequence[float]) -> dict[str, float] | None:
    """Count, mean and percentiles (nearest rank) of a metric's values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return {"n": len(ordered), "mean": sum(ordered) / len(ordered), "min": ordered[0],
            "p10": _nearest_rank(ordered, 0.1), "p50": _nearest_rank(ordered, 0.5),
            "p90": _nearest_rank(ordered, 0.9), "max": ordered[-1]}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _distinct(values: Sequence) -> list:
    return sorted({v for v in values if v is not None}, key=str)


def metrics_by(ok_rows: Sequence[EditRow], config: Config) -> dict:
    """Which flow and CLIP produced the metrics, or why CLIP is off, stated once for the run.

    Read from the rows (each worker records what it loaded), falling back to the config when no
    edit succeeded. Several workers that disagree are listed, joined by '; '.
    """
    by = [r.metrics_by for r in ok_rows if r.metrics_by]
    m = config.metrics
    if by:
        flows = _distinct([b["flow"] for b in by])
        clips = _distinct([b["clip"] for b in by])
        reasons = _distinct([b["clip_off"] for b in by])
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


def _read_done_shards(out_dir: Path, stems: Sequence[str]) -> tuple[list[EditRow], list[DoneMarker]]:
    """The rows and done markers of the shards of `stems` that are done (a readable marker whose files
    are all there, at their recorded sizes): a damaged shard counts as not done."""
    rows: list[EditRow] = []
    markers: list[DoneMarker] = []
    for stem in stems:
        check = check_shard(out_dir, stem)
        if check.state != "done" or check.marker is None:
            continue
        markers.append(check.marker)
        rows.extend(read_rows(out_dir, stem))
    return rows, markers


def metric_distributions(ok_rows: Sequence[EditRow]) -> dict[str, dict[str, float] | None]:
    """Each registered metric's distribution over the successful edits that have a value for it."""
    return {key: distribution([r.metrics[key] for r in ok_rows if r.metrics.get(key) is not None])
            for key in metric_keys()}


def _peak_memory(rows: Sequence[EditRow]) -> dict[str, float] | None:
    return percentiles([r.peak_memory_mb for r in rows if r.peak_memory_mb is not None])


def _per_frame(rows: Sequence[EditRow], stage: str) -> list[float]:
    return [r.seconds.get(stage, 0.0) / r.frames for r in rows if r.frames]


def by_method(rows: Sequence[EditRow], default_method: str) -> dict[str, dict]:
    """Per editing method (rows written before rows named theirs count as `default_method`): edits ok and
    failed, every metric's distribution, seconds per frame of the edit (its own denoising and decoding) and
    of the whole row (`total`, which carries the inversion on the row that made it), peak memory."""
    grouped: dict[str, list[EditRow]] = {}
    for row in rows:
        grouped.setdefault(row.method or default_method, []).append(row)
    out = {}
    for method, method_rows in grouped.items():
        ok = [r for r in method_rows if r.ok]
        out[method] = {
            "edits": {"ok": len(ok), "failed": len(method_rows) - len(ok)},
            "metrics": metric_distributions(ok),
            "seconds_per_frame": {"edit": distribution(_per_frame(ok, "edit")),
                                  "total": distribution(_per_frame(ok, "total"))},
            "peak_memory_mb": _peak_memory(ok),
        }
    return out


def build_summary(out_dir: Path, config: Config, stems: Sequence[str], urls: Sequence[str],
                  failed_shards: dict[str, str], wall_seconds: float) -> dict:
    """Summarises every shard of the run (this invocation's and earlier ones' done shards)."""
    rows, markers = _read_done_shards(out_dir, stems)
    ok = [r for r in rows if r.ok]
    failed = [r for r in rows if not r.ok]
    shard_seconds = sum(m.seconds for m in markers)
    frames = sum(r.frames or 0 for r in ok)
    videos = len({r.key for r in ok})
    # Rows of runs before metrics existed have no "metrics" stage: it cost them nothing.
    stage_seconds = {stage: percentiles([r.seconds.get(stage, 0.0) for r in ok]) for stage in STAGES}
    metric_seconds = sum(r.seconds.get("metrics", 0.0) for r in ok)
    total_seconds = sum(r.seconds["total"] for r in ok)
    fingerprints = _distinct([r.model_fingerprint for r in ok])
    methods = by_method(rows, config.edit.method)
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
        "shards": {"total": len(stems), "done": len(markers), "failed": len(failed_shards),
                   "failed_shards": failed_shards},
        "samples": {"total": sum(m.samples for m in markers),
                    "ok": sum(m.samples_ok for m in markers),
                    "failed": sum(m.samples_failed for m in markers)},
        "edits": {"ok": len(ok), "failed": len(failed)},
        "failures_by_cause": dict(Counter(failure_cause(r.error or "unknown", r.key) for r in failed).most_common()),
        "frames_edited": frames,
        "throughput": {
            "videos_per_hour": videos / shard_seconds * 3600 if shard_seconds else None,
            "frames_per_second": frames / shard_seconds if shard_seconds else None,
        },
        "device_hours": shard_seconds / 3600,
        "wall_seconds": round(wall_seconds, 3),
        "seconds_per_edit": stage_seconds,
        "peak_memory_mb": _peak_memory(ok),
        "metrics": metric_distributions(ok),
        "metrics_by": metrics_by(ok, config),
        "by_method": methods,
        "metrics_cost": {"seconds": round(metric_seconds, 4),
                         "share_of_total": metric_seconds / total_seconds if total_seconds else None,
                         "failed": sum(1 for r in ok if r.metrics_error)},
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


def load_rows(out_dir: Path, summary: dict) -> list[ShardRow]:
    """The rows of the run's work items (shards), in input order, each with its output stem."""
    stems = [stem for stem, _ in run_items(out_dir, summary)]
    if not stems:  # a summary without inputs: every shard in the folder
        stems = sorted(p.stem for p in (Path(out_dir) / "stats").glob("*.jsonl"))
    return [ShardRow(stem, row) for stem in stems for row in read_rows(Path(out_dir), stem)]


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
