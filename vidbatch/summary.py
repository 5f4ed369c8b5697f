"""The run summary: `OUT/summary.json` built from the shards' stats files, and its rich table."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from vidbatch import __version__
from vidbatch.config import Config
from vidbatch.shard_io import read_marker, rows_path, write_json_atomic


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
    stage_seconds = {stage: percentiles([r["seconds"][stage] for r in ok])
                     for stage in ("decode", "invert", "edit", "encode", "total")}
    return {
        "vidbatch_version": __version__,
        "model": config.model.id,
        "loras": [{"path": l.path, "scale": l.scale} for l in config.model.loras],
        "method": config.edit.method,
        "control": config.edit.control,
        "config_hash": config.digest(),
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
    for cause, count in s["failures_by_cause"].items():
        table.add_row(f"[red]failed: {cause}[/red]", str(count))
    console.print(table)
