"""Plug-and-Play (Tumanyan et al.) as a control: `edit.control: pnp`.

A source branch denoises the inverted latents with the source prompt; for the first `pnp.f_t` of
the steps its residual features (the `conv2` output of `up_blocks[1].resnets[1]`, before the skip
path is added) replace the edit branches' (:class:`PnpResidualInjector`), and for the first
`pnp.attn_t` its self-attention queries and keys do in the decoder blocks of
:func:`pnp_attention_blocks` (every method's attention processors carry that part out, see
:func:`vidbatch.engine.processors.attend`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vidbatch.core.errors import ModelLoadError
from vidbatch.core.settings import setting
from vidbatch.engine.control import Control

__all__ = ["Pnp", "PnpConfig", "PnpResidualInjector", "pnp_attention_blocks", "injection_steps"]


@dataclass
class PnpConfig:
    """The `pnp` config section."""

    f_t: float = setting(0.8, minimum=0, maximum=1, help="share of the steps whose residual features come from the source branch")
    attn_t: float = setting(0.5, minimum=0, maximum=1, help="share of the steps whose decoder self-attention q/k come from the source branch")


def injection_steps(steps: int, f_t: float, attn_t: float) -> tuple[int, int]:
    """How many of the first steps inject (residual features, self-attention queries and keys)."""
    return int(steps * f_t), int(steps * attn_t)


class PnpResidualInjector:
    """PnP's residual injection: the `conv2` output of `unet.up_blocks[1].resnets[1]` becomes branch 0's in every branch.

    diffusers' `ResnetBlock2D` computes `(shortcut(x) + conv2(dropout(act(norm2(...))))) / output_scale_factor`;
    the reference (pnp-diffusers' `register_conv_control_efficient`) overwrites the edit branches' hidden
    states right after `conv2`, so each branch still adds its own shortcut (skip path). A forward hook on
    `conv2` does exactly that: `conv2`'s output is what is added to the shortcut (dropout comes before it).

    The UNet batch is `B*F`, branch-major, branch 0 being the source branch; `conv2`'s output is
    `(B*F, C, h, w)`. Set `active` and `num_branches` before each UNet call. A call on several videos
    at once (`runtime.batch_videos`) holds one such block per video, one after the other: `segments`
    then gives ``(branches, frames)`` of each, and every video's edit branches take its own source
    branch (None: the whole batch is one video of `num_branches` branches).
    """

    def __init__(self, unet) -> None:
        try:
            self.block = unet.up_blocks[1].resnets[1]
            self.conv = self.block.conv2
        except (AttributeError, IndexError) as exc:
            raise ModelLoadError("PnP needs a UNet with up_blocks[1].resnets[1] (Stable Diffusion's layout)") from exc
        self.active = False
        self.num_branches = 1
        self.segments: list[tuple[int, int]] | None = None
        self._handle = self.conv.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output: Tensor) -> Tensor | None:
        """`(B*F, C, h, w)` -> the same shape, every branch holding branch 0's values (per video segment)."""
        if not self.active:
            return None
        if self.segments is None:
            return self._broadcast(output, self.num_branches)
        rows = [branches * frames for branches, frames in self.segments]
        if sum(rows) != output.shape[0]:
            raise RuntimeError(f"PnP residual injection: a batch of {output.shape[0]} is not the declared videos' "
                               f"{' + '.join(f'{b}x{f}' for b, f in self.segments)} rows")
        parts = output.split(rows)
        return torch.cat([self._broadcast(part, branches) for part, (branches, _) in zip(parts, self.segments)])

    @staticmethod
    def _broadcast(output: Tensor, num_branches: int) -> Tensor:
        """`(B*F, C, h, w)` of one video -> the same shape, every branch holding branch 0's values."""
        if num_branches < 2:
            return output
        if output.shape[0] % num_branches:
            raise RuntimeError(f"PnP residual injection: a batch of {output.shape[0]} is not "
                               f"{num_branches} branches of equal size")
        per_branch = output.reshape(num_branches, -1, *output.shape[1:])
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
    # diffusers is imported here: it is heavy, and nothing else in this module needs it.
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


class Pnp(Control):
    name = "pnp"
    section = "pnp"
    settings_type = PnpConfig
