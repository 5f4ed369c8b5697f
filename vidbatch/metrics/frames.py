"""Checks shared by the metric functions: every metric takes frames as `(T, H, W, 3)` uint8 RGB."""

from __future__ import annotations

import numpy as np

from vidbatch.io.frames import FrameFile


def check_frames(frames: np.ndarray | FrameFile, name: str, min_frames: int = 1) -> None:
    """Raise ValueError unless `frames` is a `(T, H, W, 3)` uint8 array (or `FrameFile`: the metrics read
    frames in windows) with `T >= min_frames`."""
    if not isinstance(frames, (np.ndarray, FrameFile)) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = getattr(frames, "shape", type(frames).__name__)
        raise ValueError(f"{name} must be a (T, H, W, 3) RGB array, got {shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {frames.dtype}")
    if frames.shape[0] < min_frames:
        raise ValueError(f"{name} needs at least {min_frames} frames, got {frames.shape[0]}")
