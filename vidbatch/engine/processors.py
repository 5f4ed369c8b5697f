"""The plumbing every method's attention processors share.

A method replaces attention processors of a diffusers UNet's ``BasicTransformerBlock``s and drives
them through a state object of its own. What is the same for every method lives here:

- :func:`attend`: project, attend with SDPA and project out, as ``AttnProcessor2_0`` does, with
  PnP's query/key injection (:func:`broadcast_branch0`).
- :func:`check_layout`: a UNet call's batch is ``B*F``, branch-major (all frames of branch 0, then
  branch 1, ...); processors check it against the chunk the engine declared.
- :func:`transformer_blocks`: the blocks a method patches (AnimateDiff's motion modules, whose
  blocks are ``BasicTransformerBlock``s too, are not frame attention and are skipped).
- :func:`install_processors` / :func:`restore_processors`: the one way a method installs its
  processors (through diffusers' ``unet.attn_processors`` / ``unet.set_attn_processor``) and the
  one way they are taken out again.

Shapes: ``B`` guidance branches, ``F`` frames of a UNet call, ``N`` tokens of one frame, ``C``
channels, ``h`` heads, ``d`` head width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ProcessorPatch",
    "attend",
    "broadcast_branch0",
    "check_layout",
    "installed_patch",
    "install_processors",
    "restore_processors",
    "transformer_blocks",
]

# Attribute of the UNet that holds the installed patch, for restore_processors.
PATCH_ATTR = "_vidbatch_processors"
# Module names containing this are AnimateDiff motion modules: temporal attention, not frame attention.
MOTION_MODULES = "motion_modules"


def broadcast_branch0(t: Tensor, num_branches: int) -> Tensor:
    """Copy branch 0 into every branch: ``(B*k, ...) -> (B*k, ...)``, batch branch-major."""
    b0 = t.reshape(num_branches, -1, *t.shape[1:])[:1]
    return b0.expand(num_branches, *b0.shape[1:]).reshape(t.shape)


def in_blocks(name: str, prefixes: list[str] | tuple[str, ...]) -> bool:
    """Whether module `name` is one of `prefixes` or lies inside one (`up_blocks.1` holds `up_blocks.1.x`,
    not `up_blocks.10`)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def project_heads(attn, hidden_states: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values of a diffusers ``Attention``, as ``(b, heads, n, d)`` (``norm_q``/``norm_k``
    applied); `context` (``(b, M', C')``) gives the keys and values, `hidden_states` when ``None``."""
    batch_size = hidden_states.shape[0]
    context = hidden_states if context is None else context
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def attend(
    attn,
    hidden_states: Tensor,
    context: Tensor | None = None,
    attention_mask: Tensor | None = None,
    inject_branches: int | None = None,
) -> Tensor:
    """Project, attend with SDPA and project out, as ``AttnProcessor2_0`` does.

    Args:
        attn: the diffusers ``Attention`` module.
        hidden_states: ``(b, M, C)`` query tokens.
        context: ``(b, M', C')`` key/value tokens, ``hidden_states`` when ``None``.
        attention_mask: already prepared, ``(b, heads, M, M')``, or ``None``.
        inject_branches: when set, the batch is that many branches (branch-major) and every branch
            uses branch 0's queries and keys.

    Returns:
        ``(b, M, C_out)`` after ``to_out`` (no residual, no rescale).
    """
    batch_size = hidden_states.shape[0]
    query, key, value = project_heads(attn, hidden_states, context)
    if inject_branches is not None and inject_branches > 1:
        query = broadcast_branch0(query, inject_branches)
        key = broadcast_branch0(key, inject_branches)

    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * query.shape[-1]).to(query.dtype)
    out = attn.to_out[0](out)
    return attn.to_out[1](out)


def check_self_attention(what: str, name: str, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None,
                         attention_mask: Tensor | None) -> None:
    """Raises NotImplementedError unless the call is what frame-attention processors handle: plain
    self-attention (no context, no mask) on ``(batch, tokens, channels)`` input, no spatial/group norm."""
    if encoder_hidden_states is not None or attention_mask is not None:
        raise NotImplementedError(f"{what} attention is self-attention without a mask; block {name} passed "
                                  "encoder_hidden_states or an attention mask to attn1")
    if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
        raise NotImplementedError(f"{what} attention supports (batch, tokens, channels) input without "
                                  "spatial/group norm")


def check_layout(what: str, name: str, batch: int, num_frames: int | None, num_branches: int | None) -> tuple[int, int]:
    """``(B, F)`` of a processor call whose batch must be ``num_branches * num_frames`` (branch-major).

    Raises RuntimeError when the engine declared no chunk (``begin_chunk`` not called) or the batch
    does not match it: a processor must never guess which rows are which frame of which branch.
    """
    if num_frames is None or num_branches is None:
        raise RuntimeError(f"{what} attention needs the chunk layout: call state.begin_chunk() before the UNet")
    if batch != num_frames * num_branches:
        raise RuntimeError(f"block {name} got a batch of {batch}, but begin_chunk declared "
                           f"{num_branches} branches x {num_frames} frames")
    return num_branches, num_frames


def transformer_blocks(unet: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(module name, block)`` of every ``BasicTransformerBlock`` that attends within frames, in forward order.

    AnimateDiff's motion modules are built from ``BasicTransformerBlock``s too, but they attend
    across time already: a frame-attention processor there would break them, so they are skipped.
    """
    # diffusers is imported here, not at the top: importing it costs seconds and the pure helpers
    # above do not need it.
    from diffusers.models.attention import BasicTransformerBlock

    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock) and MOTION_MODULES not in name:
            yield name, module


def motion_blocks(unet: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(module name, block)`` of every AnimateDiff motion-module ``BasicTransformerBlock`` (temporal
    attention: its batch is the frames' token positions, its sequence the frames), in forward order."""
    from diffusers.models.attention import BasicTransformerBlock

    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock) and MOTION_MODULES in name:
            yield name, module


@dataclass
class ProcessorPatch:
    """What :func:`install_processors` changed on one UNet.

    Attributes:
        owner: who installed it (a method's name); :func:`restore_processors` can be told to
            restore only its own patch.
        state: the state object the processors share (returned to the installer).
        originals: ``unet.attn_processors`` before the patch (processor path -> processor).
        handles: hooks registered with the patch, removed with it.
        on_restore: called after the processors are restored (e.g. to drop per-step caches).
    """

    owner: str
    state: object
    originals: dict[str, object]
    handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    on_restore: Callable[[], None] | None = None


def install_processors(unet: torch.nn.Module, owner: str, state: object,
                       make: Callable[[str, torch.nn.Module], dict[str, object]],
                       on_restore: Callable[[], None] | None = None,
                       make_temporal: Callable[[str, torch.nn.Module], dict[str, object]] | None = None,
                       ) -> ProcessorPatch:
    """Install a method's processors on every frame-attention block of `unet`; returns the patch.

    Any patch already installed (by any method) is restored first, so patches never nest.

    Args:
        unet: a diffusers model with ``attn_processors`` / ``set_attn_processor`` (a UNet, a ControlNet).
        owner: the installer's name, recorded for :func:`restore_processors`.
        state: the object the processors share; kept with the patch.
        make: ``make(block_name, block)`` -> ``{"attn1": processor, "attn2": processor}`` (either
            key may be left out: that attention keeps its processor).
        on_restore: called when the patch is restored.
        make_temporal: like `make`, for the motion modules' blocks (:func:`motion_blocks`) of a video UNet;
            None leaves them alone.

    Raises ValueError when `unet` has no ``BasicTransformerBlock`` to patch.
    """
    restore_processors(unet)
    originals = dict(unet.attn_processors)
    processors = dict(originals)
    blocks = 0
    for name, block in transformer_blocks(unet):
        blocks += 1
        for attention, processor in make(name, block).items():
            processors[f"{name}.{attention}.processor"] = processor
    if not blocks:
        raise ValueError(f"{type(unet).__name__} has no BasicTransformerBlock to patch")
    if make_temporal is not None:
        for name, block in motion_blocks(unet):
            for attention, processor in make_temporal(name, block).items():
                processors[f"{name}.{attention}.processor"] = processor
    unet.set_attn_processor(processors)
    patch = ProcessorPatch(owner, state, originals, on_restore=on_restore)
    setattr(unet, PATCH_ATTR, patch)
    return patch


def installed_patch(unet: torch.nn.Module) -> ProcessorPatch | None:
    """The patch installed on `unet`, or None."""
    return getattr(unet, PATCH_ATTR, None)


def restore_processors(unet: torch.nn.Module, owner: str | None = None) -> None:
    """Put back the processors the installed patch replaced; a no-op when none is installed, or when
    `owner` is given and the patch is someone else's."""
    patch = installed_patch(unet)
    if patch is None or (owner is not None and patch.owner != owner):
        return
    unet.set_attn_processor(dict(patch.originals))
    for handle in patch.handles:
        handle.remove()
    if patch.on_restore is not None:
        patch.on_restore()
    delattr(unet, PATCH_ATTR)
