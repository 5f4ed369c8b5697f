"""A tiny ControlNet for tests and demos."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["make_tiny_controlnet"]


def make_tiny_controlnet(unet, out_dir: str | Path, *, seed: int = 0) -> Path:
    """A ControlNet made from a (tiny) UNet with seeded random conditioning weights, saved as a diffusers folder.

    diffusers' `from_unet` zero-initialises the output convolutions (a fresh ControlNet changes
    nothing); we randomise them so tests can see the control act.
    """
    # diffusers is imported here: it is heavy, and importing the package should not need it.
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    with torch.no_grad():
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(module.weight, std=0.05)
    controlnet.save_pretrained(out_dir)
    return Path(out_dir)
