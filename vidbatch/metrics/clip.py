"""CLIP scores of an edited video through transformers' `CLIPModel`: text alignment, frame
consistency and directional CLIP. Which CLIP model produced a figure must be reported next to it.

transformers is imported where a model is built or loaded, not at module import: importing it
costs seconds, and runs without CLIP scores never need it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vidbatch.core.paths import looks_like_path
from vidbatch.core.errors import ModelLoadError
from vidbatch.metrics.frames import check_frames
from vidbatch.models.builtin import build_folder_atomically, build_tokenizer, default_cache_root
from vidbatch.models.loading import hub_offline, quiet_loading

# OpenAI CLIP normalisation, used when a model folder has no preprocessor config.
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def make_tiny_clip(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Save a random-weight CLIP model (image 32 px, patch 8, width 32, 2 layers) with its tokenizer
    and image processor config, loadable offline by `CLIPModel` / `CLIPProcessor.from_pretrained`.

    For tests and demos only: its scores mean nothing. Returns `out_dir`.
    """
    from transformers import CLIPConfig, CLIPModel

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
        if looks_like_path(model) and not os.path.isdir(model):
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
        check_frames(frames, "frames")
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
        check_frames(edited, "edited")
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


def resolve_clip_model(name: str | None) -> tuple[str | None, str | None]:
    """`metrics.clip_model` -> (what `ClipScorer` loads, None) or (None, why there is no CLIP).

    "none"/null: off. "tiny": the random-weight CLIP built once into
    `$VIDBATCH_CACHE/models/tiny-clip` (built in a temporary folder and renamed: concurrent
    workers never see a half-written model). A hub id resolves to its local hub-cache snapshot
    when there is one; with HF_HUB_OFFLINE set (read now, not at import) and no snapshot the
    reason is returned at once instead of waiting on hub retries.
    """
    if name is None or str(name).strip().lower() in ("", "none"):
        return None, "disabled"
    name = str(name).strip()
    if name == "tiny":
        folder = default_cache_root() / "models" / "tiny-clip"
        if (folder / "preprocessor_config.json").is_file():  # make_tiny_clip writes it last
            return str(folder), None
        try:
            with quiet_loading():
                return str(build_folder_atomically(folder, make_tiny_clip, replace=folder.exists())), None
        except OSError as exc:
            return None, f"CLIP model tiny could not be built in {folder}: {exc}"
    if looks_like_path(name):  # an existing file or folder, or clearly meant as one
        return name, None  # ClipScorer names a missing or broken folder itself
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True), None
    except Exception:  # noqa: BLE001 - not in the local hub cache (or no such repo)
        if hub_offline():
            return None, (f"CLIP model {name} could not be loaded: HF_HUB_OFFLINE is set and it is not "
                          "in the local hub cache (download it first, or set metrics.clip_model to a folder)")
        return name, None
