"""ControlNet as a control: `edit.control: controlnet`.

A ControlNet conditioned on Canny edges of the source frames (:func:`canny_frames`), or on control
frames the sample brings as `{key}.control.mp4`, adds its residuals to the UNet's in every branch.
The application loads the model (:func:`load_controlnet`) and hands it to the editor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from vidbatch.core.errors import ConfigError, ModelLoadError
from vidbatch.core.settings import setting
from vidbatch.engine.control import Control

__all__ = ["ControlNet", "ControlNetConfig", "canny_frames", "condition_tensor", "load_controlnet"]


@dataclass
class ControlNetConfig:
    """The `controlnet` config section."""

    model: str | None = setting(None, help="ControlNet: diffusers folder or hub id (needed by control 'controlnet')")
    condition: str = setting("canny", choices=["canny", "video"],
                             help="'canny': edges of the source frames; 'video': the sample's {key}.control.mp4")
    scale: float = setting(1.0, minimum=0, help="ControlNet conditioning scale")
    canny_low: int = setting(100, minimum=0, maximum=255, help="Canny lower threshold")
    canny_high: int = setting(200, minimum=0, maximum=255, help="Canny upper threshold")


def canny_frames(frames: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edges of each frame as a 3-channel image: (T, H, W, 3) uint8 -> (T, H, W, 3) uint8."""
    edges = [cv2.Canny(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), low, high) for f in frames]
    return np.repeat(np.stack(edges)[..., None], 3, axis=-1)


def condition_tensor(images: np.ndarray, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) in [0, 1], as diffusers' ControlNets expect."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return tensor.permute(0, 3, 1, 2).to(dtype) / 255.0


def cause_line(exc: BaseException) -> str:
    """The first line of an exception's message (a loader's causes can run to several lines), or its type's name
    where the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_controlnet(model_id: str, *, dtype: torch.dtype, device: torch.device):
    """A ControlNetModel from a diffusers folder or a hub id; ModelLoadError with the cause otherwise."""
    # diffusers is imported here: it is heavy, and only loading a ControlNet needs it.
    from diffusers import ControlNetModel

    try:
        controlnet = ControlNetModel.from_pretrained(model_id, torch_dtype=dtype)
    except Exception as exc:
        where = "folder" if Path(model_id).exists() else "hub id (is the hub reachable?)"
        raise ModelLoadError(f"controlnet.model '{model_id}' could not be loaded as a diffusers {where}: "
                             f"{cause_line(exc)}. Fix: point controlnet.model at a local ControlNet folder") from exc
    return controlnet.to(device).eval().requires_grad_(False)


class ControlNet(Control):
    name = "controlnet"
    section = "controlnet"
    settings_type = ControlNetConfig
    needs_model = True

    @classmethod
    def check(cls, settings: ControlNetConfig) -> None:
        if not settings.model:
            raise ConfigError("edit.control includes 'controlnet' but config key 'controlnet.model' is not set; "
                              "point it at a ControlNet folder or hub id")
