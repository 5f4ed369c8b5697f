"""Controls that tie the edit to the source video: PnP feature injection and ControlNet conditions.

`edit.control` names one control or several joined by '+', e.g. `pnp+controlnet`:
- `pnp`: Plug-and-Play (Tumanyan et al.). A source branch denoises the inverted latents with the
  source prompt; for the first `f_t` of the steps its residual features (`up_blocks[1].resnets[1]`)
  replace the edit branches', and for the first `attn_t` its decoder self-attention queries and keys
  do (the attention processors carry that part out).
- `sdedit`: start from the inverted latent part-way (`edit.strength`), not from the noisiest step.
- `controlnet`: a ControlNet conditioned on Canny edges of the source frames, or on control
  frames the sample brings as `{key}.control.mp4`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from vidbatch.errors import ModelLoadError

class PnpResidualInjector:
    """Forward hook on `unet.up_blocks[1].resnets[1]`: while active, every branch's output becomes branch 0's.

    The UNet batch is `B*F`, branch-major, branch 0 being the source branch.
    """

    def __init__(self, unet):
        try:
            self.block = unet.up_blocks[1].resnets[1]
        except (AttributeError, IndexError) as exc:
            raise ModelLoadError("PnP needs a UNet with up_blocks[1].resnets[1] (Stable Diffusion's layout)") from exc
        self.active = False
        self.num_branches = 1
        self._handle = self.block.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output: Tensor) -> Tensor | None:
        if not self.active or self.num_branches < 2:
            return None
        per_branch = output.reshape(self.num_branches, -1, *output.shape[1:])
        return per_branch[:1].expand_as(per_branch).reshape(output.shape)

    def remove(self) -> None:
        self._handle.remove()


def canny_frames(frames: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edges of each frame as a 3-channel image: (T, H, W, 3) uint8 -> (T, H, W, 3) uint8."""
    edges = [cv2.Canny(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), low, high) for f in frames]
    return np.repeat(np.stack(edges)[..., None], 3, axis=-1)


def condition_tensor(images: np.ndarray, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) in [0, 1], as diffusers' ControlNets expect."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return tensor.permute(0, 3, 1, 2).to(dtype) / 255.0


def load_controlnet(model_id: str, *, dtype: torch.dtype, device: torch.device):
    """A ControlNetModel from a diffusers folder or a hub id; ModelLoadError with the cause otherwise."""
    from diffusers import ControlNetModel

    try:
        controlnet = ControlNetModel.from_pretrained(model_id, torch_dtype=dtype)
    except Exception as exc:
        where = "folder" if Path(model_id).exists() else "hub id (is the hub reachable?)"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"controlnet.model '{model_id}' could not be loaded as a diffusers {where}: {first}. "
                             "Fix: point controlnet.model at a local ControlNet folder") from exc
    return controlnet.to(device).eval().requires_grad_(False)


def make_tiny_controlnet(unet, out_dir: str | Path, *, seed: int = 0) -> Path:
    """A ControlNet made from a (tiny) UNet with seeded random conditioning weights, saved as a diffusers folder.

    diffusers' `from_unet` zero-initialises the output convolutions (a fresh ControlNet changes
    nothing); we randomise them so tests can see the control act.
    """
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    with torch.no_grad():
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(module.weight, std=0.05)
    controlnet.save_pretrained(out_dir)
    return Path(out_dir)
