"""Host memory of the per-video stages that run after the edit does not grow with the clip's length."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from vidbatch.metrics.flow import warp_error
from vidbatch.metrics.interpolation import interp_psnr


def peak_bytes(fn, *args) -> int:
    """Peak bytes numpy and Python allocate while `fn(*args)` runs (its inputs not counted)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("metric", ["interp_psnr", "warp_error"])
def test_metric_memory_does_not_grow_with_the_clip(metric):
    """1,000 frames against 100 at 48x64: the peak working memory grows by less than 5% of the 900
    added frames' bytes (one number per frame is kept). Before, it was the whole clip in
    float32/float64: ~8x (warp error) and ~24x (interpolation PSNR) the added frames' bytes."""
    rng = np.random.default_rng(0)
    long = rng.integers(0, 256, (1000, 48, 64, 3), dtype=np.uint8)
    short = long[:100].copy()
    fn = {"interp_psnr": lambda v: interp_psnr(v), "warp_error": lambda v: warp_error(v, v)}[metric]
    short_peak, long_peak = peak_bytes(fn, short), peak_bytes(fn, long)
    assert long_peak - short_peak < 0.05 * (long.nbytes - short.nbytes), (long_peak, short_peak)
