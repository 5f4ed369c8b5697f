"""Optical flow (OpenCV DIS or Farneback) and the flow warping error of an edited video.

`warp_error` measures the temporal consistency of an edit against the motion of the *source*.
Learned flow such as RAFT needs weights we cannot download, so the flow is OpenCV's classical one.
Lower is better.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from vidbatch.core.errors import ConfigError
from vidbatch.metrics.frames import check_frames

FLOW_METHODS = ("dis", "farneback")

# Sundaram et al. 2010 (used by Ruder et al. 2016): a pixel is occluded when
# |w_fw + w_bw(warped)|^2 > a * (|w_fw|^2 + |w_bw(warped)|^2) + b, flows in pixels.
DEFAULT_OCCLUSION_THRESHOLD = (0.01, 0.5)


def estimate_flow(a: np.ndarray, b: np.ndarray, method: str = "dis") -> np.ndarray:
    """Dense optical flow from image `a` to image `b`, estimated on grayscale.

    Args:
        a, b: `(H, W, 3)` uint8 RGB images of the same size.
        method: "dis" (DIS, preset MEDIUM) or "farneback".

    Returns:
        `(H, W, 2)` float32 flow in pixels, (dx, dy), such that `a[y, x] ~ b[y + dy, x + dx]`.
    """
    if a.shape != b.shape or a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"flow needs two (H, W, 3) images of the same size, got {a.shape} and {b.shape}")
    ga = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGB2GRAY)
    gb = cv2.cvtColor(np.ascontiguousarray(b), cv2.COLOR_RGB2GRAY)
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        flow = dis.calc(ga, gb, None)
    elif method == "farneback":
        flow = cv2.calcOpticalFlowFarneback(
            ga, gb, None, pyr_scale=0.5, levels=4, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0
        )
    else:
        raise ConfigError(f"unknown optical flow method {method!r}: use one of {', '.join(FLOW_METHODS)}")
    return flow.astype(np.float32, copy=False)


def _sample(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward-warp: `out[y, x] = image[y + flow[y, x, 1], x + flow[y, x, 0]]`, bilinear.

    `image` is `(H, W, C)` float32 (or `(H, W)`), `flow` is `(H, W, 2)` float32.
    """
    h, w = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x = grid_x + flow[..., 0]
    map_y = grid_y + flow[..., 1]
    # Out-of-frame samples are masked by the caller; replicate only keeps the values finite.
    return cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _valid_mask(flow_fw: np.ndarray, flow_bw: np.ndarray, threshold: tuple[float, float]) -> np.ndarray:
    """Pixels of frame t whose motion to t+1 is trusted: `(H, W)` bool.

    `flow_fw` is t -> t+1, `flow_bw` is t+1 -> t. A pixel is rejected when the forward-backward
    consistency check fails (it is occluded in t+1 or the flow is wrong there) or when it moves
    out of the frame (nothing to compare it with).
    """
    a, b = threshold
    h, w = flow_fw.shape[:2]
    bw_at_target = _sample(flow_bw, flow_fw)  # flow_bw read where each pixel of t lands in t+1
    round_trip = flow_fw + bw_at_target
    lhs = (round_trip**2).sum(-1)
    rhs = a * ((flow_fw**2).sum(-1) + (bw_at_target**2).sum(-1)) + b
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    tx = grid_x + flow_fw[..., 0]
    ty = grid_y + flow_fw[..., 1]
    inside = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
    return (lhs <= rhs) & inside


def _resize_frames(frames: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize `(T, H, W, 3)` frames to `size_hw`; area filter when shrinking (no aliasing)."""
    h, w = size_hw
    if frames.shape[1:3] == (h, w):
        return frames
    shrinking = h * w < frames.shape[1] * frames.shape[2]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (w, h), interpolation=interp) for f in frames])


def warp_error(
    source: np.ndarray,
    edited: np.ndarray,
    *,
    flow_method: str = "dis",
    occlusion_threshold: tuple[float, float] = DEFAULT_OCCLUSION_THRESHOLD,
) -> float:
    """Flow warping error of an edited video, measured along the motion of its source.

    For every t, the flow t -> t+1 and t+1 -> t is estimated on the *source* frames; edited frame
    t+1 is backward-warped onto frame t (`cv2.remap`, bilinear); the error is the mean absolute
    difference (RGB scaled to [0, 1], averaged over channels) over the pixels that pass the
    forward-backward occlusion check and stay inside the frame. The result is the mean over t.

    Source frames are resized to the edited size *before* the flow is estimated, so flow and
    occlusion thresholds are in edited pixels (and a large source costs no more than the edit).

    Args:
        source: `(T, Hs, Ws, 3)` uint8, T >= 2.
        edited: `(T, H, W, 3)` uint8, same T.
        flow_method: "dis" or "farneback".
        occlusion_threshold: `(a, b)` of the consistency test
            `|w_fw + w_bw|^2 > a * (|w_fw|^2 + |w_bw|^2) + b`.

    Returns:
        The warp error (lower is better); nan when no pixel of any pair passes the occlusion test.
    """
    check_frames(source, "source")
    check_frames(edited, "edited")
    if edited.shape[0] < 2:
        raise ValueError(f"warp error needs at least 2 frames, got {edited.shape[0]}")
    if source.shape[0] != edited.shape[0]:
        raise ValueError(
            f"source and edited must have the same number of frames, got {source.shape[0]} and {edited.shape[0]}"
        )
    # Frame by frame (two at a time), so a long video costs no more memory than a short one.
    errors = []
    size_hw = edited.shape[1:3]
    src_next = _resize_frames(source[:1], size_hw)[0]
    edited_next = edited[0].astype(np.float32) / 255.0
    for t in range(edited.shape[0] - 1):
        src_t, edited_t = src_next, edited_next
        src_next = _resize_frames(source[t + 1: t + 2], size_hw)[0]
        edited_next = edited[t + 1].astype(np.float32) / 255.0
        flow_fw = estimate_flow(src_t, src_next, flow_method)
        flow_bw = estimate_flow(src_next, src_t, flow_method)
        mask = _valid_mask(flow_fw, flow_bw, occlusion_threshold)
        if not mask.any():
            continue
        warped = _sample(edited_next, flow_fw)
        diff = np.abs(edited_t - warped).mean(-1)
        errors.append(float(diff[mask].mean()))
    return float(np.mean(errors)) if errors else math.nan
