"""The bench rows as a Markdown table or a rich table."""

from __future__ import annotations

from typing import Any, Sequence

from rich.table import Table


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


TABLE_COLUMNS = (
    ("method", "method", 0),
    ("frames", "frames", 0),
    ("size", "px", 0),
    ("invert_s_per_frame", "invert s/frame", 3),
    ("edit_s_per_frame", "edit s/frame", 3),
    ("frames_per_s", "frames/s", 3),
    ("peak_memory_mb", "peak MB", 4),
    ("activation_memory_mb", "above start MB", 3),
    ("unet_gflop_per_sample_edit", "edit GFLOP/sample", 3),
    ("unet_tflop_per_frame", "UNet TFLOP/frame", 3),
    ("peak_fraction", "of peak", 2),
    ("batch_videos", "videos/call", 0),
)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table (failed rows show their error)."""
    lines = ["| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |",
             "|" + "|".join(" --- " for _ in TABLE_COLUMNS) + "|"]
    for row in rows:
        if "error" in row:
            cells = [_fmt(row.get("method")), _fmt(row.get("frames")), _fmt(row.get("size")),
                     f"failed: {row['error']}"] + [""] * (len(TABLE_COLUMNS) - 4)
        else:
            cells = []
            for key, _, digits in TABLE_COLUMNS:
                value = row.get(key)
                cells.append(f"{100 * value:.1f}%" if key == "peak_fraction" and value is not None
                             else _fmt(value, digits or 3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rich_table(rows: Sequence[dict[str, Any]]) -> Table:
    """The rows as a rich table (failed rows show their error in red)."""
    table = Table(title="vidbatch bench")
    for _, title, _ in TABLE_COLUMNS:
        table.add_column(title, justify="right")
    for row in rows:
        if "error" in row:
            table.add_row(_fmt(row.get("method")), _fmt(row.get("frames")), _fmt(row.get("size")),
                          f"[red]failed: {row['error']}[/red]", *[""] * (len(TABLE_COLUMNS) - 4))
            continue
        table.add_row(*[f"{100 * row[k]:.1f}%" if k == "peak_fraction" and row.get(k) is not None
                        else _fmt(row.get(k), d or 3) for k, _, d in TABLE_COLUMNS])
    return table
