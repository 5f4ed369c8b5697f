"""Inline SVG plots of the report: stacked bar charts, one bar per (video, edit)."""

from __future__ import annotations

import html
import math

from vidbatch.report.format import fmt

# Above this many bars a plot shows means over consecutive rows instead (the page stays light).
MAX_BARS = 400


def _nice_ceiling(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= x (axis maximum)."""
    if not x > 0 or not math.isfinite(x):
        return 1.0
    power = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * power >= x * (1 - 1e-9):
            return m * power
    return 10 * power


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
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{fmt(value)}</text>')
    parts.append(f'<text x="12" y="{top + plot_h / 2:.0f}" class="tick" transform="rotate(-90 12 '
                 f'{top + plot_h / 2:.0f})" text-anchor="middle">{html.escape(unit)}</text>')
    step = plot_w / max(1, len(series))
    bar = max(1.0, step * 0.8)
    for i, (values, label) in enumerate(zip(series, labels)):
        x = left + i * step + (step - bar) / 2
        y = top + plot_h
        tip = html.escape(f"{label}: " + ", ".join(f"{k} {fmt(values.get(k))}" for k in colors
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
