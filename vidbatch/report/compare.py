"""The report's comparison view, for a run whose edits used several methods (`edit.compare`, per-edit methods).

It answers "which method for my data, at what cost": per method the distribution of every metric,
seconds per frame and peak memory side by side (from `summary.json`'s `by_method`), and per video the
outputs of every method, playing in sync with the source.
"""

from __future__ import annotations

from vidbatch.metrics import registered_metrics
from vidbatch.report.format import escape as _e
from vidbatch.report.format import fmt as _fmt
from vidbatch.report.media import Media
from vidbatch.report.summary import ShardRow

__all__ = ["compare_html", "is_comparison"]

# At most this many videos get a side-by-side block (the sample table below has every row).
MAX_VIDEOS = 12


def is_comparison(summary: dict) -> bool:
    return len(summary.get("methods") or []) > 1


def _spread(d: dict | None, digits: int = 3) -> str:
    """``median (p10–p90)`` of a distribution, or a dash."""
    if not d:
        return '<span class="muted">–</span>'
    return (f'{_fmt(d.get("p50"), digits)} <span class="small muted">({_fmt(d.get("p10"), digits)}–'
            f'{_fmt(d.get("p90"), digits)})</span>')


def _methods_table(summary: dict) -> str:
    by = summary.get("by_method") or {}
    methods = list(by)
    metrics = [m for m in registered_metrics() if any((by[x].get("metrics") or {}).get(m.key) for x in methods)]
    head = "".join(f'<th class="num" data-method="{_e(m)}">{_e(m)}</th>' for m in methods)
    lines = [("edits ok / failed", [f'{by[m]["edits"]["ok"]} / {by[m]["edits"]["failed"]}' for m in methods])]
    for metric in metrics:
        label = f"{metric.label} ({metric.direction} is better)"
        lines.append((label, [_spread((by[m].get("metrics") or {}).get(metric.key), 4) for m in methods]))
    lines.append(("edit seconds / frame", [_spread((by[m].get("seconds_per_frame") or {}).get("edit")) for m in methods]))
    lines.append(("all seconds / frame (with the inversion where it ran)",
                  [_spread((by[m].get("seconds_per_frame") or {}).get("total")) for m in methods]))
    lines.append(("peak memory MB (median, max)",
                  [f'{_fmt((by[m].get("peak_memory_mb") or {}).get("p50"), 4)}, '
                   f'{_fmt((by[m].get("peak_memory_mb") or {}).get("max"), 4)}' for m in methods]))
    body = "".join(f'<tr><th>{_e(label)}</th>{"".join(f"<td class=num>{c}</td>" for c in cells)}</tr>'
                   for label, cells in lines)
    return (f'<table class="kv" id="method-table"><thead><tr><th>median (p10–p90)</th>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def _videos_html(rows: list[ShardRow], media: dict[int, Media]) -> str:
    """Per video, its source and every ok edit's video (or contact sheet) in one synchronised group."""
    videos: dict[tuple[str, str], list[int]] = {}
    for i, shard_row in enumerate(rows):
        if shard_row.row.ok and i in media:
            videos.setdefault((shard_row.shard, shard_row.row.key), []).append(i)
    blocks = []
    for (shard, key), indices in list(videos.items())[:MAX_VIDEOS]:
        figures, source = [], media[indices[0]]
        if source.source:
            figures.append(f'<figure><video src="{_e(source.source)}" poster="{_e(source.source_poster)}" controls '
                           f'loop muted playsinline preload="none"></video><figcaption>source</figcaption></figure>')
        for i in indices:
            item, row = media[i], rows[i].row
            caption = f"{_e(row.edit)} <b>{_e(row.method or '')}</b>"
            if item.edited:
                figures.append(f'<figure><video src="{_e(item.edited)}" poster="{_e(item.edited_poster)}" controls '
                               f'loop muted playsinline preload="none"></video><figcaption>{caption}</figcaption></figure>')
            elif item.sheet:
                figures.append(f'<figure><img class="sheet" src="{_e(item.sheet)}" loading="lazy" alt="frames of '
                               f'{_e(key)} / {_e(row.edit)}"><figcaption>{caption}</figcaption></figure>')
        blocks.append(f'<div class="compare-video" data-key="{_e(key)}"><h3>{_e(key)} '
                      f'<span class="small muted">{_e(shard)}</span></h3><div class="pair">{"".join(figures)}</div></div>')
    more = len(videos) - MAX_VIDEOS
    note = f'<p class="muted">{more} more video(s) in the sample table below.</p>' if more > 0 else ""
    return "".join(blocks) + note


def compare_html(summary: dict, rows: list[ShardRow], media: dict[int, Media]) -> str:
    """The comparison section (empty for a run with one method)."""
    if not is_comparison(summary):
        return ""
    return ("<h2>Methods compared</h2>"
            '<div class="muted">which method for this data, at what cost: each metric as median (p10–p90) over '
            "the method's edits; the inversion is shared, so its time counts on the method that ran first</div>"
            f"{_methods_table(summary)}<h3>Side by side</h3>"
            '<div class="muted">each video\'s source and every method\'s output play together</div>'
            f"{_videos_html(rows, media)}")
