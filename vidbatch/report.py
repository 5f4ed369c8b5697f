"""`OUT/report.html`: one self-contained page (inline CSS, JS and SVG; no network) about a run.

The page shows the run summary, the metric distributions and which flow / CLIP produced them, plots
of time and memory per (video, edit), and a table of every (video, edit) sortable by each metric and
time column. Media live next to the page under `OUT/report_media/` (rebuilt atomically):

- up to `max_videos` edited videos: the edited mp4 (copied out of the output shard) beside its
  source, re-encoded to H.264 at the edited size and frame selection so the two play frame for
  frame. A source is shown only when its input shard is a local file now (a `pipe:` or remote URL
  may be unreachable at report time); otherwise the edited video is shown alone.
- more than that: a JPEG contact sheet per (video, edit): a few frames of the source (when
  available) above the same frames of the edit.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import yaml

from vidbatch import __version__
from vidbatch.errors import VidbatchError
from vidbatch.metrics import METRIC_KEYS

log = logging.getLogger("vidbatch")

MEDIA_DIR = "report_media"
# Per-sample time stages drawn in the time plot, with their colours (colour-blind-safe set).
STAGE_COLORS = {"decode": "#8da0cb", "invert": "#66c2a5", "edit": "#fc8d62", "encode": "#e78ac3",
                "metrics": "#a6d854"}
# Above this many bars a plot shows means over consecutive rows instead (the page stays light).
MAX_BARS = 400
SHEET_FRAMES = 4
SHEET_HEIGHT = 96
METRIC_DIRECTION = {"warp_error": "↓", "interp_psnr": "↑", "clip_text": "↑", "clip_frame": "↑", "clip_dir": "↑"}
METRIC_NAMES = {"warp_error": "warp error", "interp_psnr": "interpolation PSNR (dB)", "clip_text": "CLIP text alignment",
                "clip_frame": "CLIP frame consistency", "clip_dir": "directional CLIP"}
SHORT_METRIC = {"warp_error": "warp", "interp_psnr": "PSNR", "clip_text": "CLIP txt",
                "clip_frame": "CLIP frm", "clip_dir": "CLIP dir"}


@dataclass
class Media:
    """What the report shows for one (video, edit) row: relative paths under the output folder."""

    edited: str | None = None
    source: str | None = None
    edited_poster: str | None = None  # a still shown before the video plays (its middle frame)
    source_poster: str | None = None
    sheet: str | None = None
    note: str | None = None  # why something is missing


@dataclass
class _Sources:
    """Source videos of one input shard, read lazily once: key -> (bytes, ext), or why not."""

    url: str
    videos: dict[str, tuple[bytes, str]] | None = None
    unavailable: str | None = None
    decoded: dict[tuple[str, int, int, int], np.ndarray] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Reading a run


def load_summary(out_dir: Path) -> dict:
    path = Path(out_dir) / "summary.json"
    if not path.is_file():
        raise VidbatchError(f"no summary.json in {out_dir}: not the output folder of a finished "
                            "`vidbatch run` (run it first, or give the folder you passed to --output)")
    return json.loads(path.read_text())


def load_rows(out_dir: Path, summary: dict) -> list[dict]:
    """The jsonl rows of the run's shards (in input order), each with its `shard` stem added."""
    from vidbatch.samples import shard_stem

    stems = [shard_stem(u) for u in summary.get("inputs") or []]
    if not stems:  # a summary without inputs: every shard in the folder
        stems = sorted(p.stem for p in (Path(out_dir) / "stats").glob("*.jsonl"))
    rows = []
    for stem in stems:
        path = Path(out_dir) / "stats" / f"{stem}.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append({**json.loads(line), "shard": stem})
    return rows


def _frame_stride(out_dir: Path) -> int:
    """`video.frame_stride` of the run, from OUT/config.yaml (1 when unreadable)."""
    try:
        video = (yaml.safe_load((Path(out_dir) / "config.yaml").read_text()) or {}).get("video") or {}
        return int(video.get("frame_stride") or 1)
    except (OSError, yaml.YAMLError, ValueError, AttributeError):
        return 1


# ---------------------------------------------------------------------------------------------
# Media


def _read_sources(url: str, keys: set[str]) -> _Sources:
    """The videos of `keys` in a local input shard (only those are kept in memory); a
    `pipe:`/remote/missing shard is reported unavailable."""
    from vidbatch.samples import read_samples

    sources = _Sources(url)
    if url.startswith("pipe:") or "://" in url or not Path(url).is_file():
        sources.unavailable = "source not available at report time (input shard is not a local file)"
        return sources
    try:
        sources.videos = {s.key: (s.video, s.video_ext) for s in read_samples(url)
                          if s.video is not None and s.key in keys}
    except Exception as exc:  # noqa: BLE001 - the report goes on without sources
        sources.unavailable = f"source not available: input shard unreadable ({type(exc).__name__})"
    return sources


def _source_frames(sources: _Sources, row: dict, stride: int) -> np.ndarray | None:
    """The source frames that were edited, at the edited size: `(T, H, W, 3)` uint8, or None."""
    from vidbatch.video_io import decode_video

    if sources.videos is None or row["key"] not in sources.videos:
        return None
    t, h, w = int(row["frames"]), int(row["height"]), int(row["width"])
    cache_key = (row["key"], t, h, w)
    if cache_key not in sources.decoded:
        data, ext = sources.videos[row["key"]]
        decoded = decode_video(data, ext, short_side=min(h, w), multiple=2, max_frames=t, frame_stride=stride)
        frames = decoded.frames[:t]
        if frames.shape[1:3] != (h, w):  # the edit rounded its size to the UNet's multiple
            frames = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])
        sources.decoded[cache_key] = frames
    return sources.decoded[cache_key]


def _pick(frames: np.ndarray, n: int) -> np.ndarray:
    """`n` evenly spaced frames (first and last included) of `(T, H, W, 3)`."""
    idx = np.unique(np.linspace(0, len(frames) - 1, num=min(n, len(frames))).round().astype(int))
    return frames[idx]


def contact_sheet(strips: Sequence[tuple[str, np.ndarray]], *, frames: int = SHEET_FRAMES,
                  height: int = SHEET_HEIGHT) -> np.ndarray:
    """A grid image: one strip per `(label, (T, H, W, 3) uint8)`, `frames` evenly spaced frames each,
    scaled to `height` pixels, with the label in a left margin. Returns `(H', W', 3)` uint8 RGB."""
    gap, margin = 2, 64
    rendered = []
    for label, video in strips:
        picked = _pick(video, frames)
        width = max(1, round(picked.shape[2] * height / picked.shape[1]))
        tiles = [cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in picked]
        row = np.full((height, margin + len(tiles) * (width + gap), 3), 255, np.uint8)
        for i, tile in enumerate(tiles):
            x = margin + i * (width + gap)
            row[:, x:x + width] = tile
        cv2.putText(row, label[:9], (3, height // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (40, 40, 40), 1,
                    cv2.LINE_AA)
        rendered.append(row)
    full_width = max(r.shape[1] for r in rendered)
    padded = [np.pad(r, ((0, gap), (0, full_width - r.shape[1]), (0, 0)), constant_values=255) for r in rendered]
    return np.concatenate(padded)[:-gap]


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ValueError(f"could not encode {path.name}")
    path.write_bytes(data.tobytes())


def _safe(name: str) -> str:
    """A file-name-safe version of a key or edit name (keys may hold '/')."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".") or "_"


def build_media(out_dir: Path, summary: dict, rows: list[dict], media_dir: Path, *,
                max_videos: int = 50, max_sheets: int = 500) -> dict[int, Media]:
    """Writes the media of `rows` into `media_dir` (an empty folder); returns row index -> Media.

    Paths in the Media are relative to `out_dir`, as if `media_dir` were `out_dir/report_media`.
    A sample whose media cannot be made gets a note instead; nothing here raises for one sample.
    """
    from vidbatch.samples import shard_stem
    from vidbatch.video_io import decode_video, encode_mp4

    ok = [i for i, r in enumerate(rows) if r.get("status") == "ok"]
    as_videos = len(ok) <= max_videos
    stride = _frame_stride(out_dir)
    urls = {shard_stem(u): u for u in summary.get("inputs") or []}
    sources: dict[str, _Sources] = {}
    tars: dict[str, tarfile.TarFile | None] = {}
    media: dict[int, Media] = {}
    try:
        for n, i in enumerate(ok):
            row = rows[i]
            stem, key, edit = row["shard"], row["key"], row["edit"]
            item = media[i] = Media()
            if not as_videos and n >= max_sheets:
                item.note = f"no preview: only the first {max_sheets} edits get a contact sheet"
                continue
            if stem not in tars:
                path = Path(out_dir) / "shards" / f"{stem}.tar"
                try:
                    tars[stem] = tarfile.open(path) if path.is_file() else None
                except (OSError, tarfile.TarError):
                    tars[stem] = None
            if stem not in sources:
                sources.clear()  # rows come shard by shard: keep one shard's sources in memory
                wanted = {rows[j]["key"] for j in ok if rows[j]["shard"] == stem}
                sources[stem] = (_read_sources(urls[stem], wanted) if stem in urls
                                 else _Sources("", unavailable="source not available (input shard unknown)"))
            tar = tars[stem]
            folder = media_dir / _safe(stem)
            folder.mkdir(exist_ok=True)
            rel = f"{MEDIA_DIR}/{_safe(stem)}"
            try:
                member = tar.extractfile(f"{key}.{edit}.mp4") if tar is not None else None
            except KeyError:
                member = None
            if member is None:
                item.note = f"{key}.{edit}.mp4 is not in shards/{stem}.tar"
                continue
            edited_bytes = member.read()
            try:
                source = _source_frames(sources[stem], row, stride)
            except Exception as exc:  # noqa: BLE001 - show the edit alone
                source = None
                sources[stem].unavailable = f"source not decodable ({type(exc).__name__})"
            if source is None:
                item.note = sources[stem].unavailable or "source not in its input shard"
            try:
                if as_videos:
                    stem_name = f"{_safe(key)}.{_safe(edit)}"
                    (folder / f"{stem_name}.mp4").write_bytes(edited_bytes)
                    item.edited = f"{rel}/{stem_name}.mp4"
                    edited = decode_video(edited_bytes, "mp4", short_side=None, multiple=2).frames
                    _write_jpeg(folder / f"{stem_name}.jpg", edited[len(edited) // 2])
                    item.edited_poster = f"{rel}/{stem_name}.jpg"
                    if source is not None:
                        src_name = f"{_safe(key)}.source"
                        if not (folder / f"{src_name}.mp4").exists():
                            (folder / f"{src_name}.mp4").write_bytes(encode_mp4(source, float(row["fps"]), crf=23))
                            _write_jpeg(folder / f"{src_name}.jpg", source[len(source) // 2])
                        item.source = f"{rel}/{src_name}.mp4"
                        item.source_poster = f"{rel}/{src_name}.jpg"
                else:
                    edited = decode_video(edited_bytes, "mp4", short_side=None, multiple=2).frames
                    strips = ([("source", source[:len(edited)])] if source is not None else []) + [(edit, edited)]
                    name = f"{_safe(key)}.{_safe(edit)}.jpg"
                    _write_jpeg(folder / name, contact_sheet(strips))
                    item.sheet = f"{rel}/{name}"
            except Exception as exc:  # noqa: BLE001 - one broken video must not lose the report
                log.warning("report: no media for %s/%s: %s: %s", key, edit, type(exc).__name__, exc)
                item.note = f"no preview: {type(exc).__name__}: {exc}"
    finally:
        for tar in tars.values():
            if tar is not None:
                tar.close()
    return media


def _publish_dir(tmp: Path, final: Path) -> None:
    """Replaces `final` by `tmp` with renames: a reader sees the old or the new folder (or, for an
    instant, none), never a mix of the two or a half-written one."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# SVG plots


def _nice_ceiling(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= x (axis maximum)."""
    if not x > 0 or not math.isfinite(x):
        return 1.0
    power = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * power >= x * (1 - 1e-9):
            return m * power
    return 10 * power


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (int, float)):
        # Below 10**(digits-1) significant digits read well; above, %g would switch to exponent
        # notation (999.6 -> "1e+03"), so whole numbers with separators instead.
        return f"{value:.{digits}g}" if abs(value) < 10 ** (digits - 1) else f"{value:,.0f}"
    return str(value)


def _binned(series: list[dict[str, float]], labels: list[str], max_bars: int) -> tuple[list[dict[str, float]], list[str]]:
    """Means over consecutive runs of rows so that at most `max_bars` bars are drawn."""
    if len(series) <= max_bars:
        return series, labels
    size = math.ceil(len(series) / max_bars)
    out, names = [], []
    for start in range(0, len(series), size):
        chunk = series[start:start + size]
        out.append({k: sum(s.get(k, 0.0) for s in chunk) / len(chunk) for k in chunk[0]})
        names.append(f"rows {start + 1}–{start + len(chunk)} (mean)")
    return out, names


def svg_bars(series: list[dict[str, float]], labels: list[str], colors: dict[str, str], *, title: str,
             unit: str, width: int = 640, height: int = 220) -> str:
    """An inline SVG bar chart, stacked over the keys of `colors`; one bar per entry of `series`.

    Every bar has a `<title>` (hover text) naming its row and values. `series[i]` maps a key of
    `colors` to a value >= 0.
    """
    series, labels = _binned(series, labels, MAX_BARS)
    left, right, top, bottom = 56, 10, 26, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    top_value = _nice_ceiling(max((sum(s.get(k, 0.0) for k in colors) for s in series), default=0.0))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="16" class="plot-title">{html.escape(title)}</text>']
    for k in range(5):  # horizontal grid and y labels
        value = top_value * k / 4
        y = top + plot_h - plot_h * k / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{_fmt(value)}</text>')
    parts.append(f'<text x="12" y="{top + plot_h / 2:.0f}" class="tick" transform="rotate(-90 12 '
                 f'{top + plot_h / 2:.0f})" text-anchor="middle">{html.escape(unit)}</text>')
    step = plot_w / max(1, len(series))
    bar = max(1.0, step * 0.8)
    for i, (values, label) in enumerate(zip(series, labels)):
        x = left + i * step + (step - bar) / 2
        y = top + plot_h
        tip = html.escape(f"{label}: " + ", ".join(f"{k} {_fmt(values.get(k))}" for k in colors
                                                   if values.get(k) is not None) + f" {unit}")
        parts.append(f"<g><title>{tip}</title>")
        for key, color in colors.items():
            h = plot_h * (values.get(key) or 0.0) / top_value
            if h <= 0:
                continue
            y -= h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{color}"/>')
        parts.append("</g>")
    parts.append(f'<text x="{left}" y="{height - 8}" class="tick">{len(labels)} bar(s), in table order</text>')
    if len(colors) > 1:
        x = width - right - 66 * len(colors)
        for key, color in colors.items():  # legend under the plot, right-aligned
            parts.append(f'<rect x="{x}" y="{height - 17}" width="10" height="10" fill="{color}"/>'
                         f'<text x="{x + 14}" y="{height - 8}" class="tick">{html.escape(key)}</text>')
            x += 66
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#dde2ea; --bg:#f6f8fb; --bad:#b3261e; --badbg:#fdecea; --acc:#2f5fb3; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; color:var(--fg); background:#fff; }
main { max-width:1500px; margin:0 auto; padding:18px 24px 40px; }
h1 { font-size:22px; margin:0 0 2px; } h2 { font-size:17px; margin:26px 0 8px; border-bottom:1px solid var(--line); padding-bottom:4px; }
.muted { color:var(--muted); } code { font-size:12px; background:var(--bg); padding:1px 4px; border-radius:3px; }
.cards { display:grid; grid-template-columns:repeat(auto-fill,minmax(170px,1fr)); gap:10px; }
.card { background:var(--bg); border:1px solid var(--line); border-radius:6px; padding:8px 10px; }
.card .v { font-size:20px; font-weight:600; } .card .k { color:var(--muted); font-size:12px; }
.card.bad { background:var(--badbg); border-color:#f3b8b3; } .card.bad .v { color:var(--bad); }
table { border-collapse:collapse; } th, td { padding:4px 8px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
.kv th { font-weight:500; color:var(--muted); } .kv tr > th:first-child { min-width:180px; }
.kv td.num, .kv th.num { min-width:70px; }
#sample-table thead th { position:sticky; top:0; background:#eef2f8; z-index:1; white-space:nowrap; }
#sample-table th button { all:unset; cursor:pointer; font-weight:600; } #sample-table th button:hover { color:var(--acc); }
#sample-table th button:focus-visible { outline:2px solid var(--acc); }
#sample-table th[aria-sort=ascending] button::after { content:" ▲"; } #sample-table th[aria-sort=descending] button::after { content:" ▼"; }
#sample-table tbody tr:nth-child(even) { background:#fafbfd; }
#sample-table tbody tr.failed { background:var(--badbg); } tr.failed .status { color:var(--bad); font-weight:600; }
.err { color:var(--bad); max-width:320px; white-space:pre-wrap; word-break:break-word; }
.prompt { min-width:120px; max-width:170px; color:var(--muted); font-size:11px; }
.small { font-size:11px; white-space:nowrap; }
#sample-table { font-size:13px; } #sample-table th, #sample-table td { padding:4px 6px; }
.pair { display:flex; gap:6px; align-items:flex-start; } .pair figure { margin:0; } .pair figcaption { font-size:11px; color:var(--muted); }
.pair video { width:132px; height:auto; background:#000; border-radius:3px; display:block; }
img.sheet { max-width:460px; height:auto; border:1px solid var(--line); border-radius:3px; display:block; }
.note { font-size:11px; color:var(--muted); max-width:300px; }
.controls { display:flex; gap:14px; align-items:center; margin:6px 0 10px; flex-wrap:wrap; }
.controls input[type=search] { padding:4px 8px; width:260px; border:1px solid var(--line); border-radius:4px; }
.plots { display:flex; flex-wrap:wrap; gap:8px 24px; } .plot { max-width:100%; height:auto; display:block; margin:6px 0 10px; }
.plot .grid { stroke:#e6e9ef; } .plot .tick { font-size:11px; fill:var(--muted); } .plot .plot-title { font-size:13px; font-weight:600; fill:var(--fg); }
#js-errors { background:var(--badbg); color:var(--bad); padding:8px 12px; border-radius:6px; margin:10px 0; white-space:pre-wrap; }
.table-wrap { overflow-x:auto; }
"""

# Runs first, in <head>: any script error or console.error lands in #js-errors, visible on the
# page (and to tests reading the DOM).
_ERROR_HOOK = """
window.__reportErrors = [];
(function () {
  function render() {
    var box = document.getElementById('js-errors');
    if (box && window.__reportErrors.length) { box.hidden = false; box.textContent = window.__reportErrors.join('\\n'); }
  }
  function show(msg) { window.__reportErrors.push(msg); render(); }
  window.addEventListener('error', function (e) {
    if (e.target && e.target !== window && (e.target.tagName === 'VIDEO' || e.target.tagName === 'IMG' || e.target.tagName === 'SOURCE')) {
      show('media failed to load: ' + (e.target.currentSrc || e.target.getAttribute('src')));
    } else { show('script error: ' + e.message + ' (' + (e.filename || '') + ':' + (e.lineno || '') + ')'); }
  }, true);
  window.addEventListener('unhandledrejection', function (e) { show('unhandled rejection: ' + e.reason); });
  var original = console.error;
  console.error = function () { show('console.error: ' + Array.prototype.join.call(arguments, ' ')); original.apply(console, arguments); };
  document.addEventListener('DOMContentLoaded', render);  // errors from before the box existed
})();
"""

_SCRIPT = """
(function () {
  var table = document.getElementById('sample-table');
  var tbody = table.tBodies[0];
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var count = document.getElementById('row-count');
  var filter = document.getElementById('filter');
  var onlyFailed = document.getElementById('only-failed');

  function value(row, col) { var cell = row.cells[col]; return cell ? cell.getAttribute('data-v') : null; }

  function sortBy(name, dir) {
    var col = -1, type = 'text';
    headers.forEach(function (th, i) {
      if (th.getAttribute('data-col') === name) { col = i; type = th.getAttribute('data-type'); th.setAttribute('aria-sort', dir === 'asc' ? 'ascending' : 'descending'); }
      else if (th.hasAttribute('data-col')) { th.setAttribute('aria-sort', 'none'); }
    });
    if (col < 0) { return false; }
    var rows = Array.prototype.slice.call(tbody.rows);
    var sign = dir === 'asc' ? 1 : -1;
    rows.sort(function (a, b) {
      var x = value(a, col), y = value(b, col);
      var ex = x === null || x === '', ey = y === null || y === '';
      var c;
      if (ex || ey) { c = ex && ey ? 0 : (ex ? 1 : -1); }  // empty values last, either direction
      else { c = sign * (type === 'num' ? parseFloat(x) - parseFloat(y) : x.localeCompare(y)); }
      return c !== 0 ? c : (+a.getAttribute('data-i')) - (+b.getAttribute('data-i'));
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
    table.setAttribute('data-sorted', name + ':' + dir);
    return true;
  }

  headers.forEach(function (th) {
    var button = th.querySelector('button');
    if (!button) { return; }
    button.addEventListener('click', function () {
      var name = th.getAttribute('data-col');
      var dir = th.getAttribute('aria-sort') === 'ascending' ? 'desc' : 'asc';
      sortBy(name, dir);
      if (history.replaceState) { history.replaceState(null, '', '#sort=' + name + ':' + dir); }
    });
  });

  function applyFilter() {
    var q = filter.value.trim().toLowerCase(), shown = 0;
    Array.prototype.forEach.call(tbody.rows, function (r) {
      var ok = (!onlyFailed.checked || r.classList.contains('failed')) && (!q || r.textContent.toLowerCase().indexOf(q) >= 0);
      r.hidden = !ok; if (ok) { shown += 1; }
    });
    count.textContent = 'showing ' + shown + ' of ' + tbody.rows.length + ' row(s)';
  }
  filter.addEventListener('input', applyFilter);
  onlyFailed.addEventListener('change', applyFilter);

  // Source and edit of a row play together: starting, pausing or seeking one moves the other.
  Array.prototype.forEach.call(document.querySelectorAll('.pair'), function (pair) {
    var videos = Array.prototype.slice.call(pair.querySelectorAll('video'));
    if (videos.length < 2) { return; }
    var busy = false;
    function follow(source, action) {
      if (busy) { return; } busy = true;
      videos.forEach(function (v) { if (v !== source) { action(v); } }); busy = false;
    }
    videos.forEach(function (v) {
      v.addEventListener('play', function () { follow(v, function (o) { o.currentTime = v.currentTime; var p = o.play(); if (p && p.catch) { p.catch(function () {}); } }); });
      v.addEventListener('pause', function () { follow(v, function (o) { o.pause(); }); });
      v.addEventListener('seeked', function () { follow(v, function (o) { if (Math.abs(o.currentTime - v.currentTime) > 0.05) { o.currentTime = v.currentTime; } }); });
    });
  });
  var playAll = document.getElementById('play-all');
  if (playAll) {
    playAll.addEventListener('click', function () {
      Array.prototype.forEach.call(document.querySelectorAll('#sample-table tbody tr:not([hidden]) video'), function (v) {
        var p = v.play(); if (p && p.catch) { p.catch(function () {}); }
      });
    });
  }

  var m = /sort=([\\w-]+):(asc|desc)/.exec(location.hash);
  if (m) { sortBy(m[1], m[2]); }
  applyFilter();
  document.body.setAttribute('data-ready', '1');
})();
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


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
    stats = s.get("metrics") or {}
    by = s.get("metrics_by") or {}
    head = "<th>better</th>" + "".join(f'<th class="num">{k}</th>' for k in ("n", "mean", "min", "p10", "p50", "p90", "max"))
    body = []
    for key in METRIC_KEYS:
        d = stats.get(key)
        label = METRIC_NAMES.get(key, key)
        better = f'<td class="muted">{"lower ↓" if METRIC_DIRECTION.get(key) == "↓" else "higher ↑"}</td>'
        if d is None:
            body.append(f'<tr><th>{_e(label)}</th>{better}<td colspan="7" class="muted">not computed</td></tr>')
        else:
            cells = "".join(f'<td class="num">{_fmt(d.get(k), 4)}</td>' for k in ("n", "mean", "min", "p10", "p50", "p90", "max"))
            body.append(f"<tr><th>{_e(label)}</th>{better}{cells}</tr>")
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


# Sortable numeric columns: (column name, header, how to read the value from a row).
_NUM_COLUMNS: list[tuple[str, str, Any]] = [
    *[(k, SHORT_METRIC[k], (lambda k: lambda r: (r.get("metrics") or {}).get(k))(k))
      for k in METRIC_KEYS],
    *[(f"{stage}_s", f"{stage} s", (lambda st: lambda r: (r.get("seconds") or {}).get(st))(stage))
      for stage in ("total", "invert", "edit", "metrics")],
    ("memory_mb", "peak MB", lambda r: r.get("peak_memory_mb")),
]


def _th(name: str, label: str, kind: str) -> str:
    cls = ' class="num"' if kind == "num" else ""
    full = (f"{METRIC_NAMES[name]} ({'lower' if METRIC_DIRECTION[name] == '↓' else 'higher'} is better)"
            if name in METRIC_NAMES else label)
    return (f'<th{cls} data-col="{name}" data-type="{kind}" aria-sort="none"><button type="button" '
            f'title="sort by {_e(full)}">{_e(label)}</button></th>')


def _media_html(item: Media | None, row: dict) -> str:
    if item is None:
        return ""
    parts = []
    if item.edited:
        videos = []
        for src, poster, caption in ((item.source, item.source_poster, "source"),
                                     (item.edited, item.edited_poster, row.get("edit"))):
            if src:
                videos.append(f'<figure><video src="{_e(src)}" poster="{_e(poster)}" controls loop muted playsinline '
                              f'preload="none"></video><figcaption>{_e(caption)}</figcaption></figure>')
        parts.append(f'<div class="pair">{"".join(videos)}</div>')
    if item.sheet:
        parts.append(f'<img class="sheet" src="{_e(item.sheet)}" loading="lazy" '
                     f'alt="frames of {_e(row.get("key"))} / {_e(row.get("edit"))}">')
    if item.note:
        parts.append(f'<div class="note">{_e(item.note)}</div>')
    return "".join(parts)


def _table_html(rows: list[dict], media: dict[int, Media]) -> str:
    """One row per (video, edit): sample, edit and its prompt, media (or the error), metrics, times."""
    head = [_th("sample", "sample", "text"), _th("edit", "edit", "text"), _th("status", "status", "text"),
            "<th>source | edit</th>", *[_th(name, label, "num") for name, label, _ in _NUM_COLUMNS]]
    body = []
    for i, row in enumerate(rows):
        failed = row.get("status") != "ok"
        size = f"{row['frames']} fr · {row['width']}×{row['height']}" if row.get("frames") else ""
        cells = [f'<td data-v="{_e(row.get("shard"))}/{_e(row.get("key"))}"><b>{_e(row.get("key"))}</b>'
                 f'<div class="small muted">{_e(row.get("shard"))}</div><div class="small muted">{_e(size)}</div></td>',
                 f'<td data-v="{_e(row.get("edit"))}">{_e(row.get("edit"))}'
                 f'<div class="prompt">{_e(row.get("prompt"))}</div></td>',
                 f'<td class="status" data-v="{_e(row.get("status"))}">{_e(row.get("status"))}</td>']
        if failed:  # where the videos would be, so that it is seen next to the sample's name
            cells.append(f'<td class="err">{_e(row.get("error") or "failed")}</td>')
        else:
            extra = f'<div class="err">metrics failed: {_e(row["metrics_error"])}</div>' if row.get("metrics_error") else ""
            cells.append(f"<td>{_media_html(media.get(i), row)}{extra}</td>")
        for name, _, get in _NUM_COLUMNS:
            v = get(row)
            ok_num = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            digits = 4 if name in METRIC_KEYS else 3
            cells.append(f'<td class="num" data-v="{repr(float(v)) if ok_num else ""}">'
                         f'{_fmt(v, digits) if ok_num else "–"}</td>')
        cls = ' class="failed"' if failed else ""
        body.append(f'<tr data-i="{i}" data-key="{_e(row.get("key"))}" data-edit="{_e(row.get("edit"))}"{cls}>'
                    f'{"".join(cells)}</tr>')
    return (f'<div class="table-wrap"><table id="sample-table"><thead><tr>{"".join(head)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _plots_html(rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return '<p class="muted">no successful edits to plot</p>'
    labels = [f"{r['shard']}/{r['key']} {r['edit']}" for r in ok]
    times = [{k: float((r.get("seconds") or {}).get(k) or 0.0) for k in STAGE_COLORS} for r in ok]
    memory = [{"peak MB": float(r.get("peak_memory_mb") or 0.0)} for r in ok]
    return ('<div class="plots">'
            + svg_bars(times, labels, STAGE_COLORS, title="seconds per (video, edit), by stage", unit="s")
            + svg_bars(memory, labels, {"peak MB": "#7f8fb0"}, title="peak memory per (video, edit)", unit="MB")
            + "</div>")


def render_report(out_dir: Path, summary: dict, rows: list[dict], media: dict[int, Media], *,
                  as_videos: bool) -> str:
    """The report page as one HTML string (everything inline but the media files)."""
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    ok_count = sum(r.get("status") == "ok" for r in rows)
    media_note = ("source and edited videos side by side (they play together)" if as_videos else
                  f"{ok_count} edits: contact sheets (source frames above edited frames) instead of videos")
    play_all = '<button type="button" id="play-all">play all shown videos</button>' if as_videos and ok_count else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vidbatch report: {_e(Path(out_dir).name)}</title>
<style>{_CSS}</style>
<script>{_ERROR_HOOK}</script>
</head><body>
<main>
<h1>vidbatch report</h1>
<div class="muted"><code>{_e(Path(out_dir).resolve())}</code> · generated {_e(generated)} by vidbatch {_e(__version__)}
 · model <code>{_e(summary.get("model"))}</code> · {_e(summary.get("method"))}</div>
<div id="js-errors" hidden></div>
<h2>Summary</h2>
{_summary_html(summary)}
<h2>Quality metrics</h2>
{_metrics_html(summary)}
<h2>Failures</h2>
{_failures_html(summary)}
<h2>Time and memory</h2>
{_plots_html(rows)}
<h2>Samples</h2>
<div class="muted">{_e(media_note)}. Click a column header to sort; empty values sort last.</div>
<div class="controls"><input type="search" id="filter" placeholder="filter: key, edit, prompt, error…" aria-label="filter rows">
<label><input type="checkbox" id="only-failed"> failures only</label> {play_all}<span id="row-count" class="muted"></span></div>
{_table_html(rows, media)}
<h2>Run</h2>
{_run_html(summary, out_dir)}
</main>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_report(out_dir: str | Path, summary: dict | None = None, *, max_videos: int = 50,
                 max_sheets: int = 500, strict: bool = False) -> Path | None:
    """Writes `OUT/report.html` and `OUT/report_media/` (both replaced atomically).

    Args:
        out_dir: a run's output folder.
        summary: the run summary (read from `OUT/summary.json` when None).
        max_videos: above this many successful edits, contact sheets replace the videos.
        max_sheets: at most this many contact sheets (the first ones in table order).
        strict: raise on failure. Otherwise (at the end of a run, whose outputs are complete
            already) a failure is logged and None is returned.

    Returns:
        the report's path, or None when it could not be written and `strict` is False.
    """
    out_dir = Path(out_dir)
    try:
        summary = summary if summary is not None else load_summary(out_dir)
        rows = load_rows(out_dir, summary)
        ok_count = sum(r.get("status") == "ok" for r in rows)
        tmp_media = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{MEDIA_DIR}.tmp-"))
        try:
            media = build_media(out_dir, summary, rows, tmp_media, max_videos=max_videos, max_sheets=max_sheets)
            page = render_report(out_dir, summary, rows, media, as_videos=ok_count <= max_videos)
            os.chmod(tmp_media, 0o755)  # mkdtemp makes it private; the page is for anyone who can read OUT
            _publish_dir(tmp_media, out_dir / MEDIA_DIR)
        except BaseException:
            shutil.rmtree(tmp_media, ignore_errors=True)
            raise
        path = out_dir / "report.html"
        tmp = path.with_name(f".report.html.{os.getpid()}.tmp")
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
        log.info("report written to %s", path)
        return path
    except Exception as exc:
        if strict:
            raise
        log.warning("report not written: %s: %s (rebuild it with `vidbatch report %s`)",
                    type(exc).__name__, exc, out_dir)
        return None
