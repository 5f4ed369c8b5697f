"""Controls that tie the edit to the source video: PnP feature injection and ControlNet conditions.

`edit.control` names one control or several joined by '+', e.g. `pnp+controlnet`:
- `pnp`: Plug-and-Play (Tumanyan et al.). A source branch denoises the inverted latents with the
  source prompt; for the first `f_t` of the steps its residual features (the `conv2` output of
  `up_blocks[1].resnets[1]`, before the skip path is added) replace the edit branches', and for the
  first `attn_t` its self-attention queries and keys do in the decoder blocks of
  :func:`pnp_attention_blocks` (the attention processors carry that part out).
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

from vidbatch.core.errors import ModelLoadError

class PnpResidualInjector:
    """PnP's residual injection: the `conv2` output of `unet.up_blocks[1].resnets[1]` becomes branch 0's in every branch.

    diffusers' `ResnetBlock2D` computes `(shortcut(x) + conv2(dropout(act(norm2(...))))) / output_scale_factor`;
    the reference (pnp-diffusers' `register_conv_control_efficient`) overwrites the edit branches' hidden
    states right after `conv2`, so each branch still adds its own shortcut (skip path). A forward hook on
    `conv2` does exactly that: `conv2`'s output is what is added to the shortcut (dropout comes before it).

    The UNet batch is `B*F`, branch-major, branch 0 being the source branch; `conv2`'s output is
    `(B*F, C, h, w)`. Set `active` and `num_branches` before each UNet call.
    """

    def __init__(self, unet) -> None:
        try:
            self.block = unet.up_blocks[1].resnets[1]
            self.conv = self.block.conv2
        except (AttributeError, IndexError) as exc:
            raise ModelLoadError("PnP needs a UNet with up_blocks[1].resnets[1] (Stable Diffusion's layout)") from exc
        self.active = False
        self.num_branches = 1
        self._handle = self.conv.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output: Tensor) -> Tensor | None:
        """`(B*F, C, h, w)` -> the same shape, every branch holding branch 0's values."""
        if not self.active or self.num_branches < 2:
            return None
        if output.shape[0] % self.num_branches:
            raise RuntimeError(f"PnP residual injection: a batch of {output.shape[0]} is not "
                               f"{self.num_branches} branches of equal size")
        per_branch = output.reshape(self.num_branches, -1, *output.shape[1:])
        return per_branch[:1].expand_as(per_branch).reshape(output.shape)

    def remove(self) -> None:
        self._handle.remove()


def pnp_attention_blocks(unet: torch.nn.Module) -> frozenset[str]:
    """Module names of the transformer blocks whose self-attention (`attn1`) takes PnP's query/key injection.

    Rule: every decoder self-attention except the first one, i.e. all `BasicTransformerBlock`s inside
    the attention modules `up_blocks[i].attentions[j]`, taken in forward order (i, then j), except
    those of the first such module (the lowest-resolution decoder attention, where the decoder
    features are still coarse). On Stable Diffusion 1.x/2.x layouts this is exactly the reference's
    8 blocks (pnp-diffusers' `register_attention_control_efficient`, "blocks 4 - 11 of the decoder"):
    `up_blocks.1.attentions.{1,2}`, `up_blocks.2.attentions.{0,1,2}`, `up_blocks.3.attentions.{0,1,2}`,
    not `up_blocks.1.attentions.0` (`up_blocks.0` has no attention there). On the 2-level `tiny`
    model it is `up_blocks.0.attentions.{1,2}` and `up_blocks.1.attentions.{0,1,2}`.

    The reference patches `transformer_blocks[0]` only, the single block of SD 1.x/2.x; where an
    attention module holds several transformer blocks (SDXL) we take all of them.

    Returns an empty set for a module without `up_blocks` (nothing to inject into); the names are
    those `unet.named_modules()` gives, e.g. `up_blocks.1.attentions.1.transformer_blocks.0`.
    """
    from diffusers.models.attention import BasicTransformerBlock

    decoder_attentions: list[tuple[str, torch.nn.Module]] = []
    for i, up_block in enumerate(getattr(unet, "up_blocks", None) or []):
        for j, attention in enumerate(getattr(up_block, "attentions", None) or []):
            decoder_attentions.append((f"up_blocks.{i}.attentions.{j}", attention))
    names = set()
    for prefix, attention in decoder_attentions[1:]:
        for sub, module in attention.named_modules():
            if isinstance(module, BasicTransformerBlock):
                names.add(f"{prefix}.{sub}")
    return frozenset(names)


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
