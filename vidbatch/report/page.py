"""`OUT/report.html`: one self-contained page (inline CSS, JS and SVG; no network) about a run.

The page shows the run summary, the metric distributions and which flow / CLIP produced them,
histograms of time, memory and each metric over every edit (from the summary's `distributions`), and
a table of (video, edit) rows sortable by each metric and time column. Its style and scripts are the
files of `vidbatch/report/assets/`, inlined; its media live next to it under `OUT/report_media/` (see
`vidbatch.report.media`).

The page stays small whatever the run's size: the rows are read one shard at a time and the table
holds every failure up to `FAILURES_PER_PAGE` and a sample of `SAMPLE_OK` successful edits (the same
ones on every rebuild: those whose shard/key/edit hash lowest; every success when there are fewer).
Failures beyond the first page go to further pages, `report_media/failures-0002.html` and on,
written as they fill, so memory is bounded by the page size, not the row count.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from vidbatch.core.version import __version__
from vidbatch.core.atomic import atomic_write, remove_stale_temporaries
from vidbatch.core.errors import VidbatchError
from vidbatch.core.rows import EditRow
from vidbatch.metrics import Metric, get_metric, registered_metrics
from vidbatch.report.charts import svg_bars
from vidbatch.report.compare import compare_html
from vidbatch.report.format import escape as _e
from vidbatch.report.format import fmt as _fmt
from vidbatch.report.media import MEDIA_DIR, Media, atomic_directory, build_media
from vidbatch.report.summary import ShardRow, iter_rows, load_summary

log = logging.getLogger("vidbatch")

# Per-sample time stages drawn in the time plot, with their colours (colour-blind-safe set).
STAGE_COLORS = {"decode": "#8da0cb", "invert": "#66c2a5", "edit": "#fc8d62", "encode": "#e78ac3",
                "metrics": "#a6d854"}
# Time columns of the sample table, after the metrics.
TABLE_STAGES = ("total", "invert", "edit", "metrics")
DISTRIBUTION_STATS = ("n", "mean", "min", "p10", "p50", "p90", "max")
# The table of the page: every failure up to a page of them, and a reproducible sample of successes.
FAILURES_PER_PAGE = 500
SAMPLE_OK = 200
# The histograms drawn from the summary's `distributions`: name there -> (title, unit).
HISTOGRAM_TITLES = {"stage:total": ("seconds per edit (all stages)", "s"), "stage:invert": ("inversion seconds", "s"),
                    "stage:edit": ("edit seconds", "s"), "memory": ("peak memory per edit", "MB")}


@functools.cache
def asset(name: str) -> str:
    """The text of `vidbatch/report/assets/{name}` (package data, so it works from a wheel too)."""
    return resources.files("vidbatch.report").joinpath("assets", name).read_text(encoding="utf-8")


def _better(metric: Metric | None) -> str:
    return "lower ↓" if metric is not None and metric.lower_is_better else "higher ↑"


def _card(label: str, value: str, bad: bool = False) -> str:
    return f'<div class="card{" bad" if bad else ""}"><div class="v">{_e(value)}</div><div class="k">{_e(label)}</div></div>'


def _summary_html(s: dict) -> str:
    samples, edits, shards = s.get("samples") or {}, s.get("edits") or {}, s.get("shards") or {}
    throughput = s.get("throughput") or {}
    total = (s.get("seconds_per_edit") or {}).get("total")
    memory = s.get("peak_memory_mb")
    cost = s.get("metrics_cost") or {}
    cards = [
        _card("shards done / total", f"{shards.get('done', 0)} / {shards.get('total', 0)}"),
        _card("shards failed", str(shards.get("failed", 0)), bad=bool(shards.get("failed"))),
        _card("videos ok", str(samples.get("ok", 0))),
        _card("videos failed", str(samples.get("failed", 0)), bad=bool(samples.get("failed"))),
        _card("edits ok / failed", f"{edits.get('ok', 0)} / {edits.get('failed', 0)}", bad=bool(edits.get("failed"))),
        _card("frames edited", f"{s.get('frames_edited', 0):,}"),
        _card("frames / s", _fmt(throughput.get("frames_per_second"))),
        _card("videos / hour", _fmt(throughput.get("videos_per_hour"))),
        _card("device-hours", _fmt(s.get("device_hours"))),
        _card("seconds per edit (mean)", _fmt(total["mean"]) if total else "–"),
        _card("metrics share of time", f"{cost['share_of_total']:.1%}" if cost.get("share_of_total") is not None else "–"),
        _card("peak memory MB (max)", _fmt(memory["max"], 4) if memory else "–"),
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


def _metrics_html(s: dict) -> str:
    """The distribution of every registered metric, and which flow and CLIP produced them."""
    stats = s.get("metrics") or {}
    by = s.get("metrics_by") or {}
    head = "<th>better</th>" + "".join(f'<th class="num">{k}</th>' for k in DISTRIBUTION_STATS)
    body = []
    for metric in registered_metrics():
        d = stats.get(metric.key)
        better = f'<td class="muted">{_better(metric)}</td>'
        if d is None:
            body.append(f'<tr><th>{_e(metric.label)}</th>{better}<td colspan="7" class="muted">not computed</td></tr>')
        else:
            cells = "".join(f'<td class="num">{_fmt(d.get(k), 4)}</td>' for k in DISTRIBUTION_STATS)
            body.append(f"<tr><th>{_e(metric.label)}</th>{better}{cells}</tr>")
    clip_off = by.get("clip_off")
    clip = (f"<code>{_e(by['clip_model'])}</code>" if by.get("clip_model")
            else f'<span class="err">off: {_e(clip_off)}</span>' if clip_off and clip_off != "disabled"
            else '<span class="muted">off (metrics.clip_model: none)</span>')
    flow = _e(by.get("flow_impl")) if by.get("flow_impl") else '<span class="muted">warp error off</span>'
    return (f'<table class="kv"><thead><tr><th>metric</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            f'<table class="kv" style="margin-top:10px"><tr><th>warp error flow</th><td>{flow}</td></tr>'
            f"<tr><th>CLIP model</th><td>{clip}</td></tr>"
            f'<tr><th>interpolation PSNR</th><td class="muted">frame t predicted as the mean of t−1 and t+1 '
            "(flow-free); comparable between runs of vidbatch only</td></tr></table>")


def _failures_html(s: dict) -> str:
    causes = s.get("failures_by_cause") or {}
    failed_shards = (s.get("shards") or {}).get("failed_shards") or {}
    if not causes and not failed_shards:
        return '<p class="muted">no failures</p>'
    items = [f'<tr><td class="num">{n}</td><td class="err">{_e(c)}</td></tr>' for c, n in causes.items()]
    items += [f'<tr><td class="num">shard {_e(stem)}</td><td class="err">{_e(c)}</td></tr>' for stem, c in failed_shards.items()]
    return f'<table><thead><tr><th class="num">edits</th><th>cause</th></tr></thead><tbody>{"".join(items)}</tbody></table>'


def _run_html(s: dict, out_dir: Path) -> str:
    version = s.get("model_version") or {}
    packages = ", ".join(f"{k} {v}" for k, v in (s.get("packages") or {}).items() if v)
    inputs = s.get("inputs") or []
    shown = "".join(f"<div><code>{_e(u)}</code></div>" for u in inputs[:20])
    if len(inputs) > 20:
        shown += f'<div class="muted">… and {len(inputs) - 20} more</div>'
    rows = [
        ("model", f"<code>{_e(s.get('model'))}</code>"),
        ("weights fingerprint", f"<code>{_e(version.get('fingerprint'))}</code>" if version.get("fingerprint")
         else '<span class="muted">not computed (computed with the inversion cache on)</span>'),
        ("LoRAs", _e(", ".join(f"{l['path']} × {l['scale']}" for l in s.get("loras") or []) or "none")),
        ("method / control", _e(f"{s.get('method')} / {s.get('control')}")),
        ("config hash", f"<code>{_e(s.get('config_hash'))}</code> (<code>config.yaml</code> beside this page)"),
        ("vidbatch", _e(s.get("vidbatch_version"))),
        ("packages", _e(packages)),
        ("wall seconds", _fmt(s.get("wall_seconds"), 5)),
        ("inputs", shown),
    ]
    return '<table class="kv">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


@dataclass(frozen=True)
class Column:
    """A sortable numeric column of the sample table."""

    name: str  # data-col of its header, e.g. "warp_error" or "total_s"
    header: str
    value: Callable[[EditRow], Any]  # reads the value from a row
    digits: int  # significant digits shown


def _metric_value(key: str) -> Callable[[dict], Any]:
    return lambda row: row.metrics.get(key)


def _stage_value(stage: str) -> Callable[[dict], Any]:
    return lambda row: row.seconds.get(stage)


def numeric_columns() -> list[Column]:
    """Every registered metric, then the times and the peak memory (built per page, so a metric
    registered after import has its column)."""
    return [*[Column(m.key, m.short_label, _metric_value(m.key), 4) for m in registered_metrics()],
            *[Column(f"{stage}_s", f"{stage} s", _stage_value(stage), 3) for stage in TABLE_STAGES],
            Column("memory_mb", "peak MB", lambda r: r.peak_memory_mb, 3)]


def _th(name: str, label: str, kind: str) -> str:
    cls = ' class="num"' if kind == "num" else ""
    metric = get_metric(name)
    full = f"{metric.label} ({metric.direction} is better)" if metric is not None else label
    return (f'<th{cls} data-col="{name}" data-type="{kind}" aria-sort="none"><button type="button" '
            f'title="sort by {_e(full)}">{_e(label)}</button></th>')


def _media_html(item: Media | None, row: EditRow) -> str:
    if item is None:
        return ""
    parts = []
    if item.edited:
        videos = []
        for src, poster, caption in ((item.source, item.source_poster, "source"),
                                     (item.edited, item.edited_poster, row.edit)):
            if src:
                videos.append(f'<figure><video src="{_e(src)}" poster="{_e(poster)}" controls loop muted playsinline '
                              f'preload="none"></video><figcaption>{_e(caption)}</figcaption></figure>')
        parts.append(f'<div class="pair">{"".join(videos)}</div>')
    if item.sheet:
        parts.append(f'<img class="sheet" src="{_e(item.sheet)}" loading="lazy" '
                     f'alt="frames of {_e(row.key)} / {_e(row.edit)}">')
    if item.note:
        parts.append(f'<div class="note">{_e(item.note)}</div>')
    return "".join(parts)


def _number_cell(value: Any, digits: int) -> str:
    """A numeric cell; its `data-v` is what the page sorts by (empty for a missing value)."""
    ok_num = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return (f'<td class="num" data-v="{repr(float(value)) if ok_num else ""}">'
            f'{_fmt(value, digits) if ok_num else "–"}</td>')


def _row_html(i: int, shard_row: ShardRow, item: Media | None, columns: list[Column]) -> str:
    """One (video, edit) of the sample table."""
    row = shard_row.row
    failed = not row.ok
    size = f"{row.frames} fr · {row.width}×{row.height}" if row.frames else ""
    cells = [f'<td data-v="{_e(shard_row.shard)}/{_e(row.key)}"><b>{_e(row.key)}</b>'
             f'<div class="small muted">{_e(shard_row.shard)}</div><div class="small muted">{_e(size)}</div></td>',
             f'<td data-v="{_e(row.edit)}">{_e(row.edit)}'
             f'<div class="prompt">{_e(row.prompt)}</div></td>',
             f'<td class="status" data-v="{_e(row.status)}">{_e(row.status)}</td>']
    if failed:  # where the videos would be, so that it is seen next to the sample's name
        cells.append(f'<td class="err">{_e(row.error or "failed")}</td>')
    else:
        extra = f'<div class="err">metrics failed: {_e(row.metrics_error)}</div>' if row.metrics_error else ""
        cells.append(f"<td>{_media_html(item, row)}{extra}</td>")
    cells += [_number_cell(column.value(row), column.digits) for column in columns]
    cls = ' class="failed"' if failed else ""
    return (f'<tr data-i="{i}" data-key="{_e(row.key)}" data-edit="{_e(row.edit)}"{cls}>'
            f'{"".join(cells)}</tr>')


def _table_html(rows: list[ShardRow], media: dict[int, Media]) -> str:
    """One row per (video, edit): sample, edit and its prompt, media (or the error), metrics, times."""
    columns = numeric_columns()
    head = [_th("sample", "sample", "text"), _th("edit", "edit", "text"), _th("status", "status", "text"),
            "<th>source | edit</th>", *[_th(c.name, c.header, "num") for c in columns]]
    body = [_row_html(i, row, media.get(i), columns) for i, row in enumerate(rows)]
    return (f'<div class="table-wrap"><table id="sample-table"><thead><tr>{"".join(head)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _plots_html(rows: list[ShardRow]) -> str:
    ok = [r for r in rows if r.row.ok]
    if not ok:
        return '<p class="muted">no successful edits to plot</p>'
    labels = [f"{r.shard}/{r.row.key} {r.row.edit}" for r in ok]
    times = [{k: float(r.row.seconds.get(k) or 0.0) for k in STAGE_COLORS} for r in ok]
    memory = [{"peak MB": float(r.row.peak_memory_mb or 0.0)} for r in ok]
    return ('<div class="plots">'
            + svg_bars(times, labels, STAGE_COLORS, title="seconds per (video, edit), by stage", unit="s")
            + svg_bars(memory, labels, {"peak MB": "#7f8fb0"}, title="peak memory per (video, edit)", unit="MB")
            + "</div>")


def _histograms_html(summary: dict) -> str:
    """One bar chart per figure of the summary's `distributions`: edits per bin, over every edit of the run."""
    dists = summary.get("distributions") or {}
    charts = []
    for name, hist in dists.items():
        if not hist:
            continue
        if name in HISTOGRAM_TITLES:
            title, unit = HISTOGRAM_TITLES[name]
        else:
            metric = get_metric(name.split(":", 1)[1])
            title, unit = (metric.label if metric is not None else name.split(":", 1)[1]), "value"
        edges, counts = hist["edges"], hist["counts"]
        labels = [f"{_fmt(lo)} to {_fmt(hi)} {unit}" for lo, hi in zip(edges, edges[1:])]
        charts.append(svg_bars([{"edits": float(c)} for c in counts], labels, {"edits": "#7f8fb0"},
                               title=f"{title}: edits per bin", unit="edits", width=420, height=180))
    return '<div class="plots">' + "".join(charts) + "</div>"


@dataclass
class TableRows:
    """What the page's table shows, gathered in one pass over the rows (`collect_rows`)."""

    rows: list[ShardRow] = field(default_factory=list)   # in input order: the sampled ok rows, the first failures
    ok_total: int = 0
    failed_total: int = 0
    failure_pages: list[str] = field(default_factory=list)   # further pages, relative to OUT

    @property
    def ok_shown(self) -> int:
        return sum(r.row.ok for r in self.rows)


def _sample_rank(shard_row: ShardRow) -> bytes:
    """A row's place in the sample: a hash of shard, key and edit (the same on every rebuild, in any order)."""
    return hashlib.sha1(f"{shard_row.shard}/{shard_row.row.key}/{shard_row.row.edit}".encode()).digest()


def collect_rows(rows: Iterable[ShardRow], write_page: Callable[[int, list[ShardRow], int], str], *,
                 sample_ok: int = SAMPLE_OK, per_page: int = FAILURES_PER_PAGE) -> TableRows:
    """Streams `rows`: keeps the `sample_ok` ok rows of lowest `_sample_rank` and the first `per_page`
    failures, and hands each further page of failures to `write_page(number, rows, first_index)` as it
    fills (it returns the page's path relative to OUT). Memory: `sample_ok + per_page` rows."""
    heap: list[tuple[bytes, int, ShardRow]] = []   # max-heap by rank (negated bytes: the rank's complement)
    first: list[tuple[int, ShardRow]] = []
    page: list[ShardRow] = []
    out = TableRows()
    for i, shard_row in enumerate(rows):
        if shard_row.row.ok:
            out.ok_total += 1
            key = bytes(255 - b for b in _sample_rank(shard_row))
            if len(heap) < sample_ok:
                heapq.heappush(heap, (key, i, shard_row))
            elif heap and key > heap[0][0]:
                heapq.heapreplace(heap, (key, i, shard_row))
            continue
        out.failed_total += 1
        if len(first) < per_page:
            first.append((i, shard_row))
            continue
        page.append(shard_row)
        if len(page) == per_page:
            out.failure_pages.append(write_page(len(out.failure_pages) + 2, page, out.failed_total - per_page + 1))
            page = []
    if page:
        out.failure_pages.append(write_page(len(out.failure_pages) + 2, page, out.failed_total - len(page) + 1))
    out.rows = [r for _, r in sorted([(i, r) for _, i, r in heap] + first, key=lambda x: x[0])]
    return out


def _page_html(title: str, body: str) -> str:
    """A whole page of the report (the main page and the further failure pages): the stylesheet, the error
    hook (first, in <head>) and the script around `body`."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>
{asset("report.css")}</style>
<script>
{asset("error_hook.js")}</script>
</head><body>
<main>
{body}
</main>
<script>
{asset("report.js")}</script>
</body></html>
"""


def failure_page(out_dir: Path, number: int, rows: list[ShardRow], first: int) -> str:
    """A further page of failures (`report_media/failures-NNNN.html`), with links back to the report."""
    body = (f'<h1>vidbatch report: failures, page {number}</h1>'
            f'<div class="muted"><a href="../report.html">back to the report</a> · failed edits {first}–'
            f'{first + len(rows) - 1} of <code>{_e(Path(out_dir).resolve())}</code></div>'
            '<div id="js-errors" hidden></div>'
            '<div class="controls"><input type="search" id="filter" placeholder="filter: key, edit, prompt, error…" '
            'aria-label="filter rows"><label><input type="checkbox" id="only-failed"> failures only</label> '
            '<span id="row-count" class="muted"></span></div>'
            f"{_table_html(rows, {})}")
    return _page_html(f"vidbatch report: failures, page {number}", body)


def _table_note(table: TableRows | None) -> str:
    """What the table holds when it is not every row, and the further pages of failures."""
    if table is None:
        return ""
    parts = []
    if table.ok_shown < table.ok_total:
        parts.append(f"{table.ok_shown} of {table.ok_total:,} successful edits, a sample (the same on every rebuild); "
                     "the charts above cover every edit")
    shown_failed = len(table.rows) - table.ok_shown
    if shown_failed < table.failed_total:
        links = " ".join(f'<a href="{_e(p)}">{n + 2}</a>' for n, p in enumerate(table.failure_pages))
        parts.append(f"failed edits 1–{shown_failed} of {table.failed_total:,}; more on page(s) {links}")
    if not parts:
        return ""
    return '<div class="muted" id="table-note">' + "; ".join(p if "<a " in p else _e(p) for p in parts) + ".</div>"


def render_report(out_dir: Path, summary: dict, rows: list[ShardRow], media: dict[int, Media], *,
                  as_videos: bool, table: TableRows | None = None) -> str:
    """The report page as one HTML string (everything inline but the media files).

    `error_hook.js` runs first, in <head>: any script error or console.error lands in #js-errors,
    visible on the page (and to tests reading the DOM).
    """
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    ok_count = sum(r.row.ok for r in rows)
    media_note = ("source and edited videos side by side (they play together)" if as_videos else
                  f"{ok_count} edits: contact sheets (source frames above edited frames) instead of videos")
    play_all = '<button type="button" id="play-all">play all shown videos</button>' if as_videos and ok_count else ""
    body = f"""<h1>vidbatch report</h1>
<div class="muted"><code>{_e(Path(out_dir).resolve())}</code> · generated {_e(generated)} by vidbatch {_e(__version__)}
 · model <code>{_e(summary.get("model"))}</code> · {_e(", ".join(summary.get("methods") or [summary.get("method") or ""]))}</div>
<div id="js-errors" hidden></div>
<h2>Summary</h2>
{_summary_html(summary)}
{compare_html(summary, rows, media)}
<h2>Quality metrics</h2>
{_metrics_html(summary)}
<h2>Failures</h2>
{_failures_html(summary)}
<h2>Time and memory</h2>
{_histograms_html(summary) if summary.get("distributions") else _plots_html(rows)}
<h2>Samples</h2>
<div class="muted">{_e(media_note)}. Click a column header to sort; empty values sort last.</div>
{_table_note(table)}
<div class="controls"><input type="search" id="filter" placeholder="filter: key, edit, prompt, error…" aria-label="filter rows">
<label><input type="checkbox" id="only-failed"> failures only</label> {play_all}<span id="row-count" class="muted"></span></div>
{_table_html(rows, media)}
<h2>Run</h2>
{_run_html(summary, out_dir)}"""
    return _page_html(f"vidbatch report: {Path(out_dir).name}", body)




def write_report(out_dir: str | Path, summary: dict | None = None, *, max_videos: int = 50,
                 max_sheets: int = 500, strict: bool = False, sample_ok: int = SAMPLE_OK,
                 failures_per_page: int = FAILURES_PER_PAGE) -> Path | None:
    """Writes `OUT/report.html` and `OUT/report_media/` (both replaced atomically).

    Args:
        out_dir: a run's output folder.
        summary: the run summary (read from `OUT/summary.json` when None).
        max_videos: above this many successful edits, contact sheets replace the videos.
        max_sheets: at most this many contact sheets (the first ones in table order).
        sample_ok: at most this many successful edits in the table (a sample: see the module docstring).
        failures_per_page: failed edits in the page's table; the rest on further pages of this many.
        strict: raise on failure. Otherwise (at the end of a run, whose outputs are complete
            already) a failure is logged and None is returned.

    Returns:
        the report's path, or None when it could not be written and `strict` is False. A failed
        write leaves no temporary file or folder behind.
    """
    out_dir = Path(out_dir)
    for name in ("report.html", MEDIA_DIR):   # what killed writers left (failed ones clean up themselves)
        remove_stale_temporaries(out_dir / name)
    try:
        summary = summary if summary is not None else load_summary(out_dir)
        with atomic_directory(out_dir / MEDIA_DIR) as media_dir:
            def write_page(number: int, page_rows: list[ShardRow], first: int) -> str:
                name = f"failures-{number:04d}.html"
                (media_dir / name).write_text(failure_page(out_dir, number, page_rows, first), encoding="utf-8")
                return f"{MEDIA_DIR}/{name}"

            table = collect_rows(iter_rows(out_dir, summary), write_page, sample_ok=sample_ok,
                                 per_page=failures_per_page)
            rows = table.rows
            ok_count = table.ok_shown
            media = build_media(out_dir, summary, rows, media_dir, max_videos=max_videos, max_sheets=max_sheets)
            page = render_report(out_dir, summary, rows, media, as_videos=ok_count <= max_videos, table=table)
        path = out_dir / "report.html"
        atomic_write(path, page)
        log.info("report written to %s", path)
        return path
    except Exception as exc:
        if strict and isinstance(exc, OSError):   # a user's problem (disk full, a folder in the way): no traceback
            raise VidbatchError(f"report not written: {type(exc).__name__}: {exc}") from exc
        if strict:
            raise
        log.warning("report not written: %s: %s (rebuild it with `vidbatch report %s`)",
                    type(exc).__name__, exc, out_dir)
        return None
