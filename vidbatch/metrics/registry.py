"""The quality metrics of one (video, edit), one `Metric` entry each.

A metric is registered once, here, with its key (the field in each stats row and in
`summary.json`), its labels, whether higher or lower is better, and how to compute it. Everything
else follows from the registry: the rows' `metrics` fields, the summary's distributions and table,
and the report's metric table and sortable columns. To add a metric, add one `register(Metric(...))`
call below (or call `register` from your own code before the run).

A compute function receives a `MetricInputs` and returns a float, or None when the metric is off
or not computable for that video (too few frames, no CLIP model, ...). Non-finite values are
recorded as None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

from vidbatch.io.frames import FrameFile
from vidbatch.metrics.clip import ClipScorer
from vidbatch.metrics.flow import warp_error
from vidbatch.metrics.frames import check_frames
from vidbatch.metrics.interpolation import interp_psnr

Direction = Literal["higher", "lower"]


@dataclass
class MetricInputs:
    """What a compute function may read about one edited video.

    `warp` and `interp` are the run's switches for the two metrics that have one
    (`metrics.warp_error`, `metrics.interp_psnr`); a metric without a switch is always computed.
    """

    # In a run these are `FrameFile`s (frames on local disk): index, slice or iterate them a window at a
    # time, as the built-in metrics do; `np.asarray(...)` reads a whole clip into memory.
    source: np.ndarray | FrameFile  # (T, Hs, Ws, 3) uint8: the decoded source frames that were edited
    edited: np.ndarray | FrameFile  # (T, H, W, 3) uint8: the edited frames
    prompt: str
    source_prompt: str | None
    clip: ClipScorer | None = None
    flow_method: str = "dis"
    warp: bool = True
    interp: bool = True
    _clip_scores: dict[str, float | None] | None = field(default=None, repr=False)

    def clip_scores(self) -> dict[str, float | None] | None:
        """The three CLIP scores (None without a CLIP model), computed once for all CLIP metrics:
        one pass of the CLIP model serves `clip_text`, `clip_frame` and `clip_dir`."""
        if self.clip is None:
            return None
        if self._clip_scores is None:
            self._clip_scores = self.clip.scores(
                self.edited, self.prompt, source=self.source, source_prompt=self.source_prompt
            )
        return self._clip_scores


@dataclass(frozen=True)
class Metric:
    """One quality metric: everything the summary and the report need to know about it."""

    key: str  # field name in rows and summary.json, e.g. "warp_error"
    label: str  # full name, e.g. "interpolation PSNR (dB)"
    short_label: str  # column header of the report's sample table, e.g. "PSNR"
    direction: Direction  # "higher" or "lower" is better
    compute: Callable[[MetricInputs], float | None]

    def __post_init__(self) -> None:
        if self.direction not in ("higher", "lower"):
            raise ValueError(f"metric {self.key}: direction must be 'higher' or 'lower', not {self.direction!r}")

    @property
    def lower_is_better(self) -> bool:
        return self.direction == "lower"


# Registration order is the order of the rows' fields, the summary and the report's columns.
_REGISTRY: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Adds `metric` to the registry; a key can be registered once. Returns `metric`."""
    if metric.key in _REGISTRY:
        raise ValueError(f"a metric {metric.key!r} is registered already")
    _REGISTRY[metric.key] = metric
    return metric


def unregister(key: str) -> None:
    """Removes a registered metric (for tests and plug-ins that register one temporarily)."""
    del _REGISTRY[key]


def registered_metrics() -> tuple[Metric, ...]:
    """Every registered metric, in registration order."""
    return tuple(_REGISTRY.values())


def metric_keys() -> tuple[str, ...]:
    """The keys of every registered metric, in registration order."""
    return tuple(_REGISTRY)


def get_metric(key: str) -> Metric | None:
    """The registered metric of `key`, or None (a row of an older run may hold other keys)."""
    return _REGISTRY.get(key)


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def compute_metrics(
    source: np.ndarray | FrameFile,
    edited: np.ndarray | FrameFile,
    prompt: str,
    source_prompt: str | None,
    *,
    warp: bool,
    interp: bool,
    clip: ClipScorer | None,
    flow_method: str = "dis",
) -> dict[str, float | None]:
    """Every registered metric of one edited video, keyed by `metric_keys()`; a value is None when
    its metric is off or not computable (warp error with < 2 frames or no trusted pixel,
    interpolation PSNR with < 3 frames, frame consistency with < 2 frames, directional CLIP
    without source prompt).

    Args:
        source: `(T, Hs, Ws, 3)` uint8 source frames.
        edited: `(T, H, W, 3)` uint8 edited frames (same T).
        prompt, source_prompt: edit prompt and source description.
        warp, interp: compute warp error / interpolation PSNR.
        clip: a loaded `ClipScorer`, or None for no CLIP scores.
        flow_method: "dis" or "farneback" for the warp error.
    """
    check_frames(source, "source")
    check_frames(edited, "edited")
    inputs = MetricInputs(source, edited, prompt, source_prompt, clip=clip, flow_method=flow_method,
                          warp=warp, interp=interp)
    return {metric.key: _finite_or_none(metric.compute(inputs)) for metric in registered_metrics()}


# ---------------------------------------------------------------------------------------------
# The built-in metrics


def _warp_error(inputs: MetricInputs) -> float | None:
    if not inputs.warp or inputs.edited.shape[0] < 2:
        return None
    return warp_error(inputs.source, inputs.edited, flow_method=inputs.flow_method)


def _interp_psnr(inputs: MetricInputs) -> float | None:
    if not inputs.interp or inputs.edited.shape[0] < 3:
        return None
    return interp_psnr(inputs.edited)


def _clip_score(name: str) -> Callable[[MetricInputs], float | None]:
    """The compute function of one of the CLIP scores (they share one CLIP pass)."""

    def compute(inputs: MetricInputs) -> float | None:
        scores = inputs.clip_scores()
        return None if scores is None else scores[name]

    return compute


register(Metric("warp_error", "warp error", "warp", "lower", _warp_error))
register(Metric("interp_psnr", "interpolation PSNR (dB)", "PSNR", "higher", _interp_psnr))
register(Metric("clip_text", "CLIP text alignment", "CLIP txt", "higher", _clip_score("clip_text")))
register(Metric("clip_frame", "CLIP frame consistency", "CLIP frm", "higher", _clip_score("clip_frame")))
register(Metric("clip_dir", "directional CLIP", "CLIP dir", "higher", _clip_score("clip_dir")))

# The built-in metrics' keys, as they are at import. Code that must also see metrics registered
# later (summary, report, the rows) calls `metric_keys()` instead.
METRIC_KEYS = metric_keys()
