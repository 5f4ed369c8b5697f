"""vid2vid-zero (Wang et al. 2023) as a method of the editing engine: `edit.method: vid2vid-zero`.

Three parts, each switchable in the `vid2vid_zero:` config section:

- **Null-text inversion** (Mokady et al.): DDIM inversion with the empty prompt (or the source
  prompt, `invert_with_prompt`), then for every step, noisiest first, a few Adam steps on the
  unconditional embedding so that the guided prediction (source prompt, `edit.guidance`) from the
  current latent lands on the inverted latent of the next step (:func:`optimise_null_embeddings`).
  One embedding per step, shared by all frames, stored in the inversion cache with the trajectory
  (`Inversion.extras["null_embeddings"]`, (S, 77, C)). The edit uses it as its unconditional
  embedding in the steps `null_uncond_ratio` selects (:func:`uses_null_embedding`; by default the second
  half), the empty prompt's in the others (`edit.negative_prompt` is not used). `null_steps: 0` keeps the
  empty prompt's embedding. The optimisation runs in float32 whatever the model's dtype.
- **Cross-frame attention** (:class:`CrossFrameProcessor`): in the `dense_blocks` self-attention
  is dense over the chunk's frames (spatio-temporal); elsewhere every frame attends to the first
  and the previous frame of the video. Frame 0's and the last frame's attention inputs are kept
  per block for the step, so chunks see across their borders (the chunks run in order, `seq`).
- **Prompt-to-prompt** (:class:`PromptToPromptProcessor`): a source branch (branch 0: the inverted
  latent of the step with the source prompt) runs for the first `int(cross_replace * (steps + 1))` steps
  (:func:`cross_replace_share`: by default 0.8 for replace, 0.4 for refine);
  the edit branch's cross-attention maps are replaced by the source branch's ("replace", when the
  prompts have the same token count) or, for the words the prompts share, mapped through a token
  alignment ("refine", :func:`refine_mapping`).

Shapes: ``B`` guidance branches, ``F`` frames of a UNet call, ``N`` tokens of a frame, ``C``
channels, ``L`` text tokens (77), ``h`` heads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vidbatch.core.errors import ConfigError
from vidbatch.core.settings import setting
from vidbatch.engine import ddim
from vidbatch.engine.controls.pnp import pnp_attention_blocks
from vidbatch.engine.method import Inversion, Method
from vidbatch.engine.precision import float32_unet
from vidbatch.engine.prompt_to_prompt import controlled_steps, refine_mapping, replace_maps, token_ids
from vidbatch.engine.processors import (attend, check_layout, check_self_attention, in_blocks, install_processors,
                                        restore_processors, transformer_blocks)

__all__ = [
    "P2P_MODES",
    "CrossFrameProcessor",
    "PromptToPromptProcessor",
    "Vid2VidZero",
    "Vid2VidZeroConfig",
    "Vid2VidZeroState",
    "apply_vid2vid_zero",
    "cross_replace_share",
    "optimise_null_embeddings",
    "p2p_mode",
    "refine_mapping",
    "remove_vid2vid_zero",
    "replace_maps",
    "uses_null_embedding",
]

log = logging.getLogger("vidbatch")

P2P_MODES = ("auto", "replace", "refine", "none")
# Who installed the vid2vid-zero processors (for restore_processors).
PATCH_OWNER = "vid2vid-zero"

# vid2vid-zero's dense spatio-temporal attention: the first transformer of the first down block, of the
# mid block and of the first cross-attention up block (its authors' `st_attn_idx: 0`).
V2VZ_DENSE_BLOCKS = ["down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0"]
# vid2vid-zero's share of the steps with prompt-to-prompt control per mode (its authors' test_vid2vid_zero.py:
# AttentionReplace gets cross_replace_steps 0.8, AttentionRefine 0.4).
V2VZ_CROSS_REPLACE = {"replace": 0.8, "refine": 0.4}


@dataclass
class Vid2VidZeroConfig:
    """The `vid2vid_zero` config section."""

    null_steps: int = setting(1, minimum=0, help="vid2vid-zero: Adam steps on the null embedding per denoising step; 0: no "
                                                 "null-text optimisation (the empty prompt's embedding)")
    null_lr: float = setting(0.01, minimum=0, help="vid2vid-zero: Adam learning rate of the null-text optimisation")
    null_early_stop: float = setting(1e-5, minimum=0, help="vid2vid-zero: stop a step's optimisation below this loss")
    null_uncond_ratio: float = setting(-0.5, minimum=-1, maximum=1,
                                       help="vid2vid-zero: the steps that use the optimised null embeddings: r > 0 the "
                                            "steps i <= r*steps, r < 0 the steps i >= (1+r)*steps (-0.5: the second "
                                            "half); the other steps use the empty prompt's embedding")
    invert_with_prompt: bool = setting(False, help="vid2vid-zero: DDIM-invert with the source prompt instead of the empty one")
    cross_frame: bool = setting(True, help="vid2vid-zero: cross-frame self-attention; false: each frame alone")
    dense_blocks: list[str] = setting(V2VZ_DENSE_BLOCKS,
                                      help="vid2vid-zero: blocks (module names, or prefixes ending at a '.') with dense "
                                           "attention over the chunk; the others attend to the first and the previous frame")
    p2p: str = setting("auto", choices=["auto", "replace", "refine", "none"],
                       help="vid2vid-zero: prompt-to-prompt cross-attention control; 'auto': replace when the source "
                            "and edit prompts have the same token count, else refine")
    cross_replace: Union[float, Literal["auto"]] = setting(
        "auto", minimum=0, maximum=1,
        help="vid2vid-zero: share of the steps whose cross-attention maps come from the source; 'auto': 0.8 "
             "for replace, 0.4 for refine (vid2vid-zero's)")


# ---------------------------------------------------------------------------------------------
# Prompt-to-prompt: pure functions


def p2p_mode(mode: str, source_ids: list[int], edit_ids: list[int]) -> str:
    """The cross-attention control one edit gets: ``auto`` is ``replace`` for prompts of the same token count."""
    if mode not in P2P_MODES:
        raise ConfigError(f"vid2vid_zero.p2p must be one of {', '.join(P2P_MODES)}, got {mode!r}")
    if mode == "auto":
        return "replace" if len(source_ids) == len(edit_ids) else "refine"
    if mode == "replace" and len(source_ids) != len(edit_ids):
        raise ConfigError(f"vid2vid_zero.p2p 'replace' needs source and edit prompts of the same token count "
                          f"({len(source_ids)} and {len(edit_ids)}); use 'refine' or 'auto'")
    return mode


def cross_replace_share(cross_replace: float | str, mode: str) -> float:
    """The share of the steps with prompt-to-prompt control: a number as given, ``auto`` vid2vid-zero's per mode.

    vid2vid-zero's ``test_vid2vid_zero.py`` gives AttentionReplace ``cross_replace_steps=0.8`` and
    AttentionRefine 0.4 (its ``self_replace_steps``); 0 for ``none``.
    """
    if mode == "none":
        return 0.0
    if cross_replace == "auto":
        return V2VZ_CROSS_REPLACE[mode]
    if isinstance(cross_replace, str):
        raise ConfigError(f"vid2vid_zero.cross_replace must be a number in [0, 1] or 'auto', got {cross_replace!r}")
    return float(cross_replace)


def uses_null_embedding(step: int, num_steps: int, ratio: float) -> bool:
    """Whether denoising step `step` (0 = noisiest) of `num_steps` uses the optimised null embedding.

    vid2vid-zero's ``null_uncond_ratio`` (its pipeline, literally): ``ratio > 0``: the steps
    ``step <= num_steps * ratio``; ``ratio <= 0``: the steps ``step >= num_steps * (1 + ratio)``, so -0.5 (its
    configs') is the second half and 0 none. The other steps use the empty prompt's embedding.
    """
    if ratio > 0:
        return not step > num_steps * ratio
    return not step < num_steps * (1 + ratio)


# ---------------------------------------------------------------------------------------------
# Null-text inversion


def optimise_null_embeddings(editor, inversion: Inversion, prompt: str, *, steps: int, lr: float,
                             early_stop: float = 1e-5) -> Tensor:
    """Null-text optimisation: one unconditional embedding per denoising step, shared by all frames.

    For step k (noisiest first), starting from the inverted noisiest latent: the embedding (initialised
    from the previous step's, the first from the empty prompt's) gets up to `steps` Adam steps on the
    mean squared error between the guided DDIM step from the current latent and the inverted latent
    of the next step; then the current latent takes that guided step with the final embedding. Frames
    go through the UNet in `inversion.batch_size` batches, their gradients summed, so memory stays
    bounded by the batch. The learning rate decays linearly to half over the steps (Mokady et al.'s
    ``lr * (1 - k / 100)`` for 50 steps). The UNet stays stock (per-frame attention), as in vid2vid-zero.

    Precision: the whole optimisation runs in float32 whatever the model's dtype, as vid2vid-zero's does
    (its UNet stays float32). In float16 the UNet's backward pass underflows: the loss is a mean over every
    latent value of the video, so the gradient reaching the UNet is ~2*error/numel, below float16's
    smallest value on the late, low-error steps (most of the embedding's gradient is 0 there); in float16 and
    bfloat16 the surviving gradients are so coarse that Adam, which normalises them entry by entry, follows
    rounding noise. Keeping only the embedding or the loss in float32 does not help: the gradient is made
    inside the UNet. So the UNet's weights are cast to float32 for the optimisation and back afterwards
    (lossless: float16 and bfloat16 values are exactly representable in float32), which costs the float32
    weights' memory during the optimisation (+1.7 GB for SD 1.5 in float16) and float32 speed.


    Args:
        editor: the :class:`vidbatch.engine.editor.VideoEditor` (its UNet, schedule, guidance, batch size).
        inversion: the DDIM inversion; its ``timesteps`` are the edit's.
        prompt: the source prompt (the conditional branch of the guided prediction).
        steps: Adam steps per denoising step (0: the empty prompt's embedding for every step).
        lr: Adam's learning rate at the first step.
        early_stop: a step stops once its loss is below ``early_stop + k * 2e-5`` (Mokady et al.).

    Returns:
        (S, L, C) embeddings in the model's dtype, on the CPU.
    """
    # Lightning predicts under inference mode, where no graph can be built: leave it for the
    # optimisation, and work on ordinary copies of the tensors made in it (`_copy`).
    with torch.inference_mode(False):
        if steps == 0:
            return _optimise_null_embeddings(editor, inversion, prompt, steps, lr, early_stop)
        model_dtype = editor.dtype
        with float32_unet(editor, ("", prompt)):
            nulls = _optimise_null_embeddings(editor, inversion, prompt, steps, lr, early_stop)
        return nulls.to(model_dtype)


def _copy(t: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """An ordinary tensor (never an inference-mode one, which autograd cannot save) on `device`."""
    return t.to(device, dtype).clone()


def _optimise_null_embeddings(editor, inversion: Inversion, prompt: str, steps: int, lr: float,
                              early_stop: float) -> Tensor:
    device = editor.device
    # A copy: Adam updates it in place, and the editor's text cache must not change.
    null = _copy(editor.text_embedding(""), device, torch.float32)
    num_steps = len(inversion.timesteps)
    if steps == 0:
        return null.expand(num_steps, -1, -1).to(editor.dtype).cpu().contiguous()
    guidance, kind = editor.settings.guidance, editor.prediction_type
    cond = _copy(editor.text_embedding(prompt), device, editor.dtype)
    alphas, final = editor.alphas()
    timesteps = _copy(inversion.timesteps, device)
    alpha_t, alpha_prev = ddim.alphas_for(_copy(alphas, device), _copy(final, device), timesteps)
    x = _copy(inversion.trajectory[0], device, torch.float32)
    batch = editor.inversion_batch_for(len(x), tuple(x.shape[-2:]))
    batches = [slice(s, s + batch) for s in range(0, len(x), batch)]
    out = []
    for k in range(num_steps):
        t = timesteps[k]
        target = _copy(inversion.trajectory[k + 1] if k + 1 < num_steps else inversion.clean, device, torch.float32)
        with torch.no_grad():
            out_cond = torch.cat([editor.unet_output(x[b], t, cond.expand(len(x[b]), -1, -1)) for b in batches])

        def step_from(out_uncond: Tensor, b: slice) -> Tensor:
            guided = out_uncond + guidance * (out_cond[b] - out_uncond)
            return ddim.denoising_step(x[b], guided, alpha_t[k], alpha_prev[k], kind)

        # A new tensor per step: Adam updates it in place, and the previous step's embedding, already in
        # `out`, may share its storage (on the CPU in float32, `.to` and `.cpu` return the tensor itself).
        null = null.detach().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([null], lr=lr * (1.0 - 0.5 * k / num_steps))
        for _ in range(steps):
            optimiser.zero_grad()
            loss = 0.0
            with torch.enable_grad():
                for b in batches:
                    emb = null.to(editor.dtype).expand(len(x[b]), -1, -1)
                    predicted = step_from(editor.unet_output(x[b], t, emb), b)
                    part = F.mse_loss(predicted, target[b], reduction="sum") / target.numel()
                    # Only the embedding needs a gradient (the UNet's weights are frozen).
                    (grad,) = torch.autograd.grad(part, [null])
                    null.grad = grad if null.grad is None else null.grad + grad
                    loss += float(part.detach())
            optimiser.step()
            if loss < early_stop + k * 2e-5:
                break
        null = null.detach()
        out.append(null[0].to(editor.dtype).cpu())
        with torch.no_grad():
            emb = null.to(editor.dtype)
            x = torch.cat([step_from(editor.unet_output(x[b], t, emb.expand(len(x[b]), -1, -1)), b) for b in batches])
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Processors


@dataclass
class Vid2VidZeroState:
    """State shared by the vid2vid-zero processors of one UNet.

    Attributes:
        cross_frame: cross-frame self-attention (else each frame alone).
        p2p: ``"replace"``, ``"refine"`` or ``"none"`` for the current edit.
        mapper, alphas: the refine mapping (:func:`refine_mapping`), on the device.
        p2p_active: the current step replaces the edit branch's cross-attention maps.
        frames: (F,) the video frame indices of the next UNet call.
        num_frames, num_branches, inject_qk: the next UNet call (see :meth:`begin_chunk`).
        first, last: block name -> (B, N, C) attention inputs of frame 0 and of the last frame seen
            (with its index) in the current step.
    """

    cross_frame: bool = True
    p2p: str = "none"
    mapper: Tensor | None = None
    alphas: Tensor | None = None
    p2p_active: bool = False
    frames: Tensor | None = None
    num_frames: int | None = None
    num_branches: int | None = None
    inject_qk: bool = False
    frame_list: list[int] = field(default_factory=list)
    first: dict[str, Tensor] = field(default_factory=dict)
    last: dict[str, tuple[int, Tensor]] = field(default_factory=dict)

    def begin_step(self) -> None:
        """Forget the previous step's first and last frames."""
        self.first.clear()
        self.last.clear()

    def set_frames(self, frames: Tensor) -> None:
        self.frames = frames
        self.frame_list = [int(i) for i in frames.tolist()]  # once per chunk, not in every block

    def begin_chunk(self, num_frames: int, num_branches: int, generator: torch.Generator | None = None,
                    inject_qk: bool = False, latent_hw: tuple[int, int] | None = None) -> None:
        """Declare the next UNet call; same signature as `FrameAttentionState.begin_chunk` (nothing is drawn)."""
        if num_frames < 1 or num_branches < 1:
            raise ValueError(f"a chunk needs at least one frame and one branch, got {num_frames} and {num_branches}")
        if self.frames is None or len(self.frames) != num_frames:
            raise RuntimeError(f"vid2vid-zero needs the chunk's frame indices: call set_frames() with "
                               f"{num_frames} frames")
        self.num_frames, self.num_branches, self.inject_qk = num_frames, num_branches, inject_qk


def _check_layout(state: Vid2VidZeroState, name: str, batch: int) -> tuple[int, int]:
    return check_layout("vid2vid-zero", name, batch, state.num_frames, state.num_branches)


class CrossFrameProcessor:
    """Self-attention (``attn1``) of one block: dense over the chunk, or to the first and previous frame.

    Args:
        state: the shared :class:`Vid2VidZeroState`.
        name: the block's module name (keys the kept frames).
        dense: dense spatio-temporal attention over the chunk's frames in this block.
        pnp_qk: the block takes PnP's query/key injection (set from
            :func:`vidbatch.engine.controls.pnp.pnp_attention_blocks` at patch time).
    """

    def __init__(self, state: Vid2VidZeroState, name: str, dense: bool, pnp_qk: bool = False) -> None:
        self.state = state
        self.name = name
        self.dense = dense
        self.pnp_qk = pnp_qk

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        st = self.state
        check_self_attention("vid2vid-zero", self.name, attn, hidden_states, encoder_hidden_states, attention_mask)
        branches, frames = _check_layout(st, self.name, hidden_states.shape[0])
        inject = branches if (st.inject_qk and self.pnp_qk) else None
        b, n, c = branches, hidden_states.shape[1], hidden_states.shape[2]
        if not st.cross_frame:
            out = attend(attn, hidden_states, inject_branches=inject)
        elif self.dense:
            x = hidden_states.reshape(b, frames * n, c)
            out = attend(attn, x, inject_branches=inject).reshape(b * frames, n, -1)
        else:
            context = self._first_and_previous(hidden_states, b, frames)
            out = attend(attn, hidden_states, context, inject_branches=inject)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _first_and_previous(self, hidden_states: Tensor, branches: int, frames: int) -> Tensor:
        """(B*F, 2N, C): for every frame, the tokens of video frame 0 and of the frame before it (frame 0: itself)."""
        st = self.state
        x = hidden_states.reshape(branches, frames, *hidden_states.shape[1:])  # (B, F, N, C)
        indices = st.frame_list
        if indices != list(range(indices[0], indices[0] + frames)):
            raise RuntimeError(f"vid2vid-zero attention needs consecutive frames per chunk, got {indices}")
        start = indices[0]
        if start == 0:
            st.first[self.name] = x[:, 0].detach()
            before = x[:, :1]
        else:
            kept = st.last.get(self.name)
            if self.name not in st.first or kept is None or kept[0] != start - 1:
                raise RuntimeError(f"block {self.name}: frames {indices} come before frame 0 or out of order; "
                                   "vid2vid-zero's first/previous-frame attention runs the chunks in order (seq)")
            before = kept[1][:, None]
        st.last[self.name] = (indices[-1], x[:, -1].detach())
        previous = torch.cat([before, x[:, :-1]], dim=1)                   # (B, F, N, C)
        first = st.first[self.name][:, None].expand_as(x)
        return torch.cat([first, previous], dim=2).reshape(branches * frames, -1, x.shape[-1])


class PromptToPromptProcessor:
    """Cross-attention (``attn2``) of one block: the edit branch's maps from the source branch's while active.

    Inactive (or without a source branch) it is the block's original processor, unchanged.
    Branches are ``[source, uncond, cond]``; only ``cond`` (the edit prompt) is controlled.
    """

    def __init__(self, state: Vid2VidZeroState, name: str, original) -> None:
        self.state = state
        self.name = name
        self.original = original

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        st = self.state
        if not st.p2p_active or st.p2p == "none" or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None or hidden_states.ndim != 3 or attn.group_norm is not None:
            raise NotImplementedError("prompt-to-prompt supports (batch, tokens, channels) cross-attention "
                                      "without a mask")
        branches, frames = _check_layout(st, self.name, hidden_states.shape[0])
        if branches < 3:
            raise RuntimeError("prompt-to-prompt needs the source branch: branches [source, uncond, cond]")
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)  # (B*F*h, N, L)
        probs = probs.view(branches, -1, *probs.shape[1:])   # branch-major: (B, F*h, N, L)
        edited = replace_maps(probs[0], probs[-1], st.p2p, st.mapper, st.alphas)
        probs = torch.cat([probs[:-1], edited[None]]).flatten(0, 1)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def apply_vid2vid_zero(unet: torch.nn.Module, cross_frame: bool = True,
                       dense_blocks: list[str] | tuple[str, ...] = ()) -> Vid2VidZeroState:
    """Replace every ``BasicTransformerBlock``'s self- and cross-attention processors; returns the shared state."""
    state = Vid2VidZeroState(cross_frame=cross_frame)
    pnp_blocks = pnp_attention_blocks(unet)
    dense = list(dense_blocks)

    def processors(name: str, block) -> dict[str, object]:
        made = {"attn1": CrossFrameProcessor(state, name, in_blocks(name, dense), pnp_qk=name in pnp_blocks)}
        if block.attn2 is not None:
            made["attn2"] = PromptToPromptProcessor(state, name, block.attn2.processor)
        return made

    install_processors(unet, PATCH_OWNER, state, processors, on_restore=state.begin_step)
    names = [name for name, _ in transformer_blocks(unet)]
    unmatched = [p for p in dense if not any(in_blocks(n, [p]) for n in names)]
    if unmatched:
        log.warning("vid2vid_zero.dense_blocks %s match no transformer block of this UNet", unmatched)
    return state


def remove_vid2vid_zero(unet: torch.nn.Module) -> None:
    """Restore the processors :func:`apply_vid2vid_zero` replaced; a no-op when not patched."""
    restore_processors(unet, PATCH_OWNER)


# ---------------------------------------------------------------------------------------------
# The method



class Vid2VidZero(Method):
    """vid2vid-zero in the engine: null-text inversion, per-step null embeddings, cross-frame attention, p2p."""

    name = "vid2vid-zero"
    section = "vid2vid_zero"
    settings_type = Vid2VidZeroConfig
    # Its own null-text inversion and prompt-to-prompt tie the edit to the source; its authors stack
    # no PnP on it.
    default_control = "none"

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.state: Vid2VidZeroState | None = None
        self.device: torch.device | None = None
        self.replace_steps = 0   # steps with prompt-to-prompt control (and the source branch)
        self.empty: Tensor | None = None   # (1, L, C) the empty prompt's embedding (steps without null embeddings)

    def inversion_parts(self) -> dict:
        c = self.config
        parts = {"invert_with_prompt": c.invert_with_prompt, "null_steps": c.null_steps}
        if c.null_steps > 0:  # these change the embeddings only when there is an optimisation
            parts.update(null_lr=c.null_lr, null_early_stop=c.null_early_stop, guidance=self.settings.guidance)
        return {"vid2vid_zero": parts}

    def invert(self, editor, frames: np.ndarray, prompt: str, mask: np.ndarray | None = None) -> Inversion:
        c = self.config
        inversion = editor.invert(frames, prompt if c.invert_with_prompt else "")
        inversion.extras["null_embeddings"] = optimise_null_embeddings(
            editor, inversion, prompt, steps=c.null_steps, lr=c.null_lr, early_stop=c.null_early_stop)
        return inversion

    def patch(self, editor, prompt: str, source_prompt: str) -> Vid2VidZeroState:
        c = self.config
        self.device = editor.device
        # Everything that can fail comes before the patch: an error must not leave the UNet patched.
        tokenizer = editor.pipe.tokenizer
        source_ids, edit_ids = token_ids(tokenizer, source_prompt), token_ids(tokenizer, prompt)
        mode = p2p_mode(c.p2p, source_ids, edit_ids)
        mapper = alphas = None
        if mode == "refine":
            mapper, alphas = refine_mapping(source_ids, edit_ids, tokenizer.model_max_length)
            mapper, alphas = mapper.to(self.device), alphas.to(self.device)
        self.replace_steps = controlled_steps(cross_replace_share(c.cross_replace, mode), self.settings.steps)
        self.empty = editor.text_embedding("")
        self.state = apply_vid2vid_zero(editor.unet, c.cross_frame, c.dense_blocks)
        self.state.p2p, self.state.mapper, self.state.alphas = mode, mapper, alphas
        return self.state

    def unpatch(self, unet) -> None:
        remove_vid2vid_zero(unet)

    def chunk_order(self) -> str:
        # First/previous-frame attention carries frames across chunk borders: the chunks go in order.
        return "seq" if self.config.cross_frame else self.settings.chunk_order

    def needs_source(self, step: int) -> bool:
        return step < self.replace_steps

    def uncond_embedding(self, inversion: Inversion, step: int, default: Tensor) -> Tensor:
        nulls = inversion.extras.get("null_embeddings")
        if nulls is None:  # an inversion made without these hooks (plain `invert`): the negative prompt
            return default
        if not uses_null_embedding(step, len(nulls), self.config.null_uncond_ratio):
            return self.empty.to(self.device, default.dtype)
        return nulls[step:step + 1].to(self.device, default.dtype)

    def begin_step(self, step: int, num_frames: int, predict, generator: torch.Generator) -> None:
        self.state.p2p_active = step < self.replace_steps

    def begin_chunk(self, frames: Tensor) -> None:
        self.state.set_frames(frames)

    # -- memory profile ----------------------------------------------------------------------------

    def max_branches(self, controls: frozenset[str]) -> int:
        # Prompt-to-prompt runs the source branch in its window of steps (`needs_source`); with p2p
        # "auto" the mode (replace or refine) depends on the prompts, so either may be the one.
        return 3 if "pnp" in controls or self.replace_steps_at_most() > 0 else 2

    def replace_steps_at_most(self) -> int:
        """The most steps prompt-to-prompt (and so the source branch) can run, whatever the prompts."""
        c, steps = self.config, self.settings.steps
        modes = ("replace", "refine") if c.p2p == "auto" else (c.p2p,)
        return max(min(int(cross_replace_share(c.cross_replace, mode) * (steps + 1)), steps) for mode in modes)
