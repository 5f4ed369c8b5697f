"""Flow-free interpolation PSNR of an edited video: frame t predicted as the mean of t-1 and t+1.

Higher is smoother. Comparable between runs of this code, not with figures produced by a learned
frame interpolator.
"""

from __future__ import annotations

import numpy as np

from vidbatch.metrics.frames import check_frames

# Identical frames give an infinite PSNR; cap it so that averages and JSON stay finite.
PSNR_CAP_DB = 100.0


def interp_psnr(frames: np.ndarray) -> float:
    """Flow-free interpolation PSNR (dB) of a video; higher means smoother.

    Frame t is predicted as the average of frames t-1 and t+1; the PSNR of the prediction against
    the real frame (RGB in [0, 1], peak 1) is averaged over t = 1 .. T-2. Each frame's PSNR is
    capped at `PSNR_CAP_DB` (100 dB) so that static videos give a finite value.

    Args:
        frames: `(T, H, W, 3)` uint8, T >= 3.
    """
    check_frames(frames, "frames")
    if frames.shape[0] < 3:
        raise ValueError(f"interpolation PSNR needs at least 3 frames, got {frames.shape[0]}")
    mse = np.concatenate([_window_mse(frames, start, min(start + WINDOW, len(frames) - 1))
                          for start in range(1, len(frames) - 1, WINDOW)])
    with np.errstate(divide="ignore"):
        psnr = np.where(mse > 0, -10.0 * np.log10(np.maximum(mse, 1e-300)), PSNR_CAP_DB)
    return float(np.minimum(psnr, PSNR_CAP_DB).mean())


# Frames predicted per step: the float64 copies cost ~40x a window's uint8 bytes, not the video's.
WINDOW = 32


def _window_mse(frames: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The MSE of the predictions of frames `start .. stop-1` (each the mean of its neighbours): `(stop-start,)`."""
    x = frames[start - 1: stop + 1].astype(np.float64) / 255.0
    pred = 0.5 * (x[:-2] + x[2:])
    return ((pred - x[1:-1]) ** 2).mean(axis=(1, 2, 3))
