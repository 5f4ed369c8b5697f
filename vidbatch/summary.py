"""The run summary: `OUT/summary.json` built from the shards' stats files, and its rich table."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from vidbatch import __version__
from vidbatch.config import Config, resolve_control_name
from vidbatch.metrics import METRIC_KEYS
from vidbatch.shard_io import read_marker, rows_path, write_json_atomic

# Row labels of the run table.
METRIC_LABELS = {
    "warp_error": "warp error (lower is better)",
    "interp_psnr": "interpolation PSNR dB",
    "clip_text": "CLIP text alignment",
    "clip_frame": "CLIP frame consistency",
    "clip_dir": "directional CLIP",
}
FLOW_NAMES = {"dis": "DIS (medium preset)", "farneback": "Farneback"}
STAGES = ("decode", "invert", "edit", "encode", "metrics", "total")
PACKAGES = ("torch", "diffusers", "transformers", "lightning", "webdataset", "opencv-python-headless")


def failure_cause(error: str) -> str:
    """Groups error messages by cause: drops the sample-specific part (file names, numbers)."""
    cause = error.split(": ", 1)[1] if error.startswith("cannot decode ") and ": " in error else error
    cause = re.sub(r"'[^']*'", "'…'", cause)
    cause = re.sub(r"\d+(\.\d+)?", "N", cause)
    return cause[:160]


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"mean": sum(ordered) / len(ordered), "p50": at(0.5), "p90": at(0.9), "max": ordered[-1]}


def distribution(values: Sequence[float]) -> dict[str, float] | None:
    """Count, mean and percentiles (nearest rank) of a metric's values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"n": len(ordered), "mean": sum(ordered) / len(ordered), "min": ordered[0], "p10": at(0.1),
            "p50": at(0.5), "p90": at(0.9), "max": ordered[-1]}


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


def metrics_by(ok_rows: Sequence[dict], config: Config) -> dict:
    """Which flow and CLIP produced the metrics, or why CLIP is off, stated once for the run.

    Read from the rows (each worker records what it loaded), falling back to the config when no
    edit succeeded. Several workers that disagree are listed, joined by '; '.
    """
    import cv2

    by = [r["metrics_by"] for r in ok_rows if r.get("metrics_by")]
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


def build_summary(out_dir: Path, config: Config, stems: Sequence[str], urls: Sequence[str],
                  failed_shards: dict[str, str], wall_seconds: float) -> dict:
    """Summarises every shard of the run (this invocation's and earlier ones' done shards)."""
    rows: list[dict] = []
    markers = []
    for stem in stems:
        marker = read_marker(out_dir, stem)
        if marker is None:
            continue
        markers.append(marker)
        path = rows_path(out_dir, stem)
        if path.is_file():
            rows.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    shard_seconds = sum(m["seconds"] for m in markers)
    frames = sum(r["frames"] or 0 for r in ok)
    videos = len({(r["key"]) for r in ok})
    # Rows of runs before metrics existed have no "metrics" stage: it cost them nothing.
    stage_seconds = {stage: percentiles([r["seconds"].get(stage, 0.0) for r in ok]) for stage in STAGES}
    metric_values = {k: distribution([r["metrics"][k] for r in ok if (r.get("metrics") or {}).get(k) is not None])
                     for k in METRIC_KEYS}
    metric_seconds = sum(r["seconds"].get("metrics", 0.0) for r in ok)
    total_seconds = sum(r["seconds"]["total"] for r in ok)
    fingerprints = _distinct([r.get("model_fingerprint") for r in ok])
    return {
        "vidbatch_version": __version__,
        "model": config.model.id,
        "loras": [{"path": l.path, "scale": l.scale} for l in config.model.loras],
        "method": config.edit.method,
        "control": resolve_control_name(config.edit.method, config.edit.control),   # "auto" resolved
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
        "samples": {"total": sum(m["samples"] for m in markers),
                    "ok": sum(m["samples_ok"] for m in markers),
                    "failed": sum(m["samples_failed"] for m in markers)},
        "edits": {"ok": len(ok), "failed": len(failed)},
        "failures_by_cause": dict(Counter(failure_cause(r["error"] or "unknown") for r in failed).most_common()),
        "frames_edited": frames,
        "throughput": {
            "videos_per_hour": videos / shard_seconds * 3600 if shard_seconds else None,
            "frames_per_second": frames / shard_seconds if shard_seconds else None,
        },
        "device_hours": shard_seconds / 3600,
        "wall_seconds": round(wall_seconds, 3),
        "seconds_per_edit": stage_seconds,
        "peak_memory_mb": percentiles([r["peak_memory_mb"] for r in ok if r.get("peak_memory_mb") is not None]),
        "metrics": metric_values,
        "metrics_by": metrics_by(ok, config),
        "metrics_cost": {"seconds": round(metric_seconds, 4),
                         "share_of_total": metric_seconds / total_seconds if total_seconds else None,
                         "failed": sum(1 for r in ok if r.get("metrics_error"))},
        "inputs": list(urls),
    }


def write_summary(out_dir: Path, summary: dict) -> Path:
    path = Path(out_dir) / "summary.json"
    write_json_atomic(path, summary)
    return path


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
            table.add_row(f"mean {METRIC_LABELS.get(key, key)}", f"{stats['mean']:.4g}")
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
