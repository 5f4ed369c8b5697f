"""Per-(video, edit) quality metrics: warp error, interpolation PSNR and CLIP scores, in a registry."""

from vidbatch.metrics.clip import ClipScorer, load_clip_scorer, make_tiny_clip
from vidbatch.metrics.flow import DEFAULT_OCCLUSION_THRESHOLD, FLOW_METHODS, estimate_flow, warp_error
from vidbatch.metrics.interpolation import PSNR_CAP_DB, interp_psnr
from vidbatch.metrics.registry import (
    METRIC_KEYS,
    Metric,
    MetricInputs,
    compute_metrics,
    get_metric,
    metric_keys,
    register,
    registered_metrics,
    unregister,
)

__all__ = [
    "DEFAULT_OCCLUSION_THRESHOLD", "FLOW_METHODS", "METRIC_KEYS", "PSNR_CAP_DB", "ClipScorer", "Metric",
    "MetricInputs", "compute_metrics", "estimate_flow", "get_metric", "interp_psnr", "load_clip_scorer",
    "make_tiny_clip", "metric_keys", "register", "registered_metrics", "unregister", "warp_error",
]
