"""Per-(video, edit) quality metrics: warp error, interpolation PSNR and CLIP scores.

All metrics are pure functions of frames, `np.ndarray` of `uint8`, shape `(T, H, W, 3)`, RGB.

- `warp_error`: temporal consistency of the edit measured against the motion of the *source*
  (optical flow from OpenCV's classical DIS or Farneback; learned flow such as RAFT needs weights we
  cannot download). Lower is better.
- `interp_psnr`: flow-free interpolation PSNR of the edited video: frame t predicted as the
  average of frames t-1 and t+1. Higher is smoother. Comparable between runs of this code, not
  with figures produced by a learned frame interpolator.
- `ClipScorer`: CLIP text alignment, frame consistency and directional CLIP. Which CLIP model
  produced a figure must be reported next to it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from vidbatch.core.paths import looks_like_path
from vidbatch.errors import ConfigError, ModelLoadError

FLOW_METHODS = ("dis", "farneback")

# Sundaram et al. 2010 (used by Ruder et al. 2016): a pixel is occluded when
# |w_fw + w_bw(warped)|^2 > a * (|w_fw|^2 + |w_bw(warped)|^2) + b, flows in pixels.
DEFAULT_OCCLUSION_THRESHOLD = (0.01, 0.5)

# Identical frames give an infinite PSNR; cap it so that averages and JSON stay finite.
PSNR_CAP_DB = 100.0

# OpenAI CLIP normalisation, used when a model folder has no preprocessor config.
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

METRIC_KEYS = ("warp_error", "interp_psnr", "clip_text", "clip_frame", "clip_dir")


def _check_frames(frames: np.ndarray, name: str, min_frames: int = 1) -> None:
    """Raise ValueError unless `frames` is a `(T, H, W, 3)` uint8 array with `T >= min_frames`."""
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = getattr(frames, "shape", type(frames).__name__)
        raise ValueError(f"{name} must be a (T, H, W, 3) RGB array, got {shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {frames.dtype}")
    if frames.shape[0] < min_frames:
        raise ValueError(f"{name} needs at least {min_frames} frames, got {frames.shape[0]}")


# ---------------------------------------------------------------------------------------------
# Optical flow and warp error
# ---------------------------------------------------------------------------------------------


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
    _check_frames(source, "source")
    _check_frames(edited, "edited")
    if edited.shape[0] < 2:
        raise ValueError(f"warp error needs at least 2 frames, got {edited.shape[0]}")
    if source.shape[0] != edited.shape[0]:
        raise ValueError(
            f"source and edited must have the same number of frames, got {source.shape[0]} and {edited.shape[0]}"
        )
    src = _resize_frames(source, edited.shape[1:3])
    edited_f = edited.astype(np.float32) / 255.0
    errors = []
    for t in range(edited.shape[0] - 1):
        flow_fw = estimate_flow(src[t], src[t + 1], flow_method)
        flow_bw = estimate_flow(src[t + 1], src[t], flow_method)
        mask = _valid_mask(flow_fw, flow_bw, occlusion_threshold)
        if not mask.any():
            continue
        warped = _sample(edited_f[t + 1], flow_fw)
        diff = np.abs(edited_f[t] - warped).mean(-1)
        errors.append(float(diff[mask].mean()))
    return float(np.mean(errors)) if errors else math.nan


# ---------------------------------------------------------------------------------------------
# Interpolation PSNR
# ---------------------------------------------------------------------------------------------


def interp_psnr(frames: np.ndarray) -> float:
    """Flow-free interpolation PSNR (dB) of a video; higher means smoother.

    Frame t is predicted as the average of frames t-1 and t+1; the PSNR of the prediction against
    the real frame (RGB in [0, 1], peak 1) is averaged over t = 1 .. T-2. Each frame's PSNR is
    capped at `PSNR_CAP_DB` (100 dB) so that static videos give a finite value.

    Args:
        frames: `(T, H, W, 3)` uint8, T >= 3.
    """
    _check_frames(frames, "frames")
    if frames.shape[0] < 3:
        raise ValueError(f"interpolation PSNR needs at least 3 frames, got {frames.shape[0]}")
    x = frames.astype(np.float64) / 255.0
    pred = 0.5 * (x[:-2] + x[2:])  # (T-2, H, W, 3)
    mse = ((pred - x[1:-1]) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        psnr = np.where(mse > 0, -10.0 * np.log10(np.maximum(mse, 1e-300)), PSNR_CAP_DB)
    return float(np.minimum(psnr, PSNR_CAP_DB).mean())


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------


def make_tiny_clip(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Save a random-weight CLIP model (image 32 px, patch 8, width 32, 2 layers) with its tokenizer
    and image processor config, loadable offline by `CLIPModel` / `CLIPProcessor.from_pretrained`.

    For tests and demos only: its scores mean nothing. Returns `out_dir`.
    """
    from transformers import CLIPConfig, CLIPModel

    from vidbatch.tiny_model import build_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)  # writes vocab.json, merges.txt, tokenizer_config.json
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = dict(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=32)
    # A private RNG stream: building the model must not move the caller's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(str(out))
    # Written by hand: instantiating CLIPImageProcessor warns without torchvision, and the
    # saved format is the standard one every transformers version reads.
    processor_config = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 32},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(_OPENAI_CLIP_MEAN),
        "image_std": list(_OPENAI_CLIP_STD),
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2))
    return out


def _looks_like_path(model: str) -> bool:
    return looks_like_path(model)


def _read_preprocessor_config(model: str) -> dict:
    """The model's `preprocessor_config.json` as a dict ({} when it has none)."""
    if os.path.isdir(model):
        path = Path(model) / "preprocessor_config.json"
        return json.loads(path.read_text()) if path.exists() else {}
    from transformers.utils import cached_file

    path = cached_file(model, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    return json.loads(Path(path).read_text()) if path else {}


def _size_field(value, keys: tuple[str, ...], default: int) -> int:
    """Read a size from an int or a dict such as {"shortest_edge": 224} / {"height": 224}."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for key in keys:
            if value.get(key):
                return int(value[key])
    return default


class ClipScorer:
    """CLIP text alignment, frame consistency and directional CLIP of edited frames.

    Image preprocessing is done in torch, following the model's `preprocessor_config.json`:
    bicubic resize of the short side, center crop, normalisation with its mean / std.
    """

    def __init__(self, model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import CLIPModel, CLIPTokenizer

        model = os.path.expanduser(str(model))
        if _looks_like_path(model) and not os.path.isdir(model):
            raise ModelLoadError(f"CLIP model folder {model} does not exist: give an existing folder or a hub id")
        self.name = model
        self.device = torch.device(device)
        self.dtype = dtype
        # Cast after loading: the from_pretrained dtype keyword changed name across transformers versions.
        self.model = CLIPModel.from_pretrained(model).to(self.device, dtype).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(model)
        vision_size = self.model.config.vision_config.image_size
        pre = _read_preprocessor_config(model)
        self.resize_to = _size_field(pre.get("size"), ("shortest_edge", "height"), vision_size)
        self.crop_hw = (
            _size_field(pre.get("crop_size"), ("height",), vision_size),
            _size_field(pre.get("crop_size"), ("width",), vision_size),
        )
        self.mean = torch.tensor(pre.get("image_mean", _OPENAI_CLIP_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("image_std", _OPENAI_CLIP_STD), dtype=torch.float32).view(1, 3, 1, 1)
        self.max_text_len = self.model.config.text_config.max_position_embeddings

    def _preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """`(B, H, W, 3)` uint8 -> `(B, 3, crop_h, crop_w)` normalised pixel values."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
        h, w = x.shape[-2:]
        scale = self.resize_to / min(h, w)
        new_hw = (max(self.crop_hw[0], round(h * scale)), max(self.crop_hw[1], round(w * scale)))
        if new_hw != (h, w):
            x = F.interpolate(x, size=new_hw, mode="bicubic", align_corners=False, antialias=True)
        top = (new_hw[0] - self.crop_hw[0]) // 2
        left = (new_hw[1] - self.crop_hw[1]) // 2
        x = x[..., top : top + self.crop_hw[0], left : left + self.crop_hw[1]].clamp(0.0, 1.0)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def image_embeddings(self, frames: np.ndarray, batch_size: int = 32) -> torch.Tensor:
        """`(T, H, W, 3)` uint8 -> `(T, D)` float32 L2-normalised image embeddings."""
        _check_frames(frames, "frames")
        out = []
        for i in range(0, frames.shape[0], batch_size):
            pixels = self._preprocess(frames[i : i + batch_size]).to(self.device, self.dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """`len(prompts)` strings -> `(N, D)` float32 L2-normalised text embeddings."""
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_text_len, return_tensors="pt"
        ).to(self.device)
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return F.normalize(self.model.text_projection(pooled).float().cpu(), dim=-1)

    def scores(
        self,
        edited: np.ndarray,
        prompt: str,
        source: np.ndarray | None = None,
        source_prompt: str | None = None,
    ) -> dict[str, float | None]:
        """CLIP scores of an edited video.

        Returns a dict with
            clip_text: mean cosine of each edited frame with `prompt`;
            clip_frame: mean cosine of consecutive edited frames (None with one frame);
            clip_dir: cosine between (mean edited - mean source image embedding) and
                (text(prompt) - text(source_prompt)), on normalised embeddings; None without
                `source` / `source_prompt` or when either direction is zero (same prompt, same frames).
        """
        _check_frames(edited, "edited")
        want_dir = source is not None and source_prompt is not None
        img = self.image_embeddings(edited)  # (T, D)
        txt = self.text_embeddings([prompt, source_prompt] if want_dir else [prompt])  # (1 or 2, D)
        result: dict[str, float | None] = {
            "clip_text": float((img @ txt[0]).mean()),
            "clip_frame": float((img[:-1] * img[1:]).sum(-1).mean()) if img.shape[0] > 1 else None,
            "clip_dir": None,
        }
        if want_dir:
            src_img = self.image_embeddings(source)
            d_img = img.mean(0) - src_img.mean(0)
            d_txt = txt[0] - txt[1]
            # A zero direction has no angle: report "not computable" rather than a made-up 0.
            if d_img.norm() > 1e-6 and d_txt.norm() > 1e-6:
                result["clip_dir"] = float(F.cosine_similarity(d_img, d_txt, dim=0))
        return result


def load_clip_scorer(
    model: str | None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[ClipScorer | None, str | None]:
    """Load a `ClipScorer`, never raising.

    Returns `(scorer, None)`; `(None, "disabled")` when `model` is None or "none"; or
    `(None, reason)` with a one-line reason naming `model` when it cannot be loaded, so that a run
    records null CLIP values and says why once.
    """
    if model is None or str(model).strip().lower() in ("", "none"):
        return None, "disabled"
    try:
        return ClipScorer(str(model), device=device, dtype=dtype), None
    except Exception as exc:  # noqa: BLE001 - any failure means "no CLIP scores", with the reason
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return None, f"CLIP model {model} could not be loaded: {type(exc).__name__}: {first_line}"


# ---------------------------------------------------------------------------------------------
# All metrics of one (video, edit)
# ---------------------------------------------------------------------------------------------


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def compute_metrics(
    source: np.ndarray,
    edited: np.ndarray,
    prompt: str,
    source_prompt: str | None,
    *,
    warp: bool,
    interp: bool,
    clip: ClipScorer | None,
    flow_method: str = "dis",
) -> dict[str, float | None]:
    """All metrics of one edited video, keyed by `METRIC_KEYS`; a value is None when its metric
    is off or not computable (warp error with < 2 frames or no trusted pixel, interpolation PSNR
    with < 3 frames, frame consistency with < 2 frames, directional CLIP without source prompt).

    Args:
        source: `(T, Hs, Ws, 3)` uint8 source frames.
        edited: `(T, H, W, 3)` uint8 edited frames (same T).
        prompt, source_prompt: edit prompt and source description.
        warp, interp: compute warp error / interpolation PSNR.
        clip: a loaded `ClipScorer`, or None for no CLIP scores.
        flow_method: "dis" or "farneback" for the warp error.
    """
    _check_frames(source, "source")
    _check_frames(edited, "edited")
    result: dict[str, float | None] = dict.fromkeys(METRIC_KEYS)
    if warp and edited.shape[0] >= 2:
        result["warp_error"] = _finite_or_none(warp_error(source, edited, flow_method=flow_method))
    if interp and edited.shape[0] >= 3:
        result["interp_psnr"] = _finite_or_none(interp_psnr(edited))
    if clip is not None:
        for key, value in clip.scores(edited, prompt, source=source, source_prompt=source_prompt).items():
            result[key] = _finite_or_none(value)
    return result
