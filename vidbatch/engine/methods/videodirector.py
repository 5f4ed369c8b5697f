"""VideoDirector (Wang et al., CVPR 2025): precise video editing with a text-to-video model.

The UNet is SD 1.5 inflated with an AnimateDiff motion module (`model.motion_adapter`), so the frames of
one call are a clip: the motion module attends across them. What the authors' code computes, and ours:

- **Inversion**: DDIM with the source prompt, conditional branch only, through the video UNet.
- **Multi-frame null-text pivotal tuning** (:func:`tune`): per denoising step one null embedding per
  frame, up to `null_steps` Adam iterations at lr ``null_lr·(1 − k/(2S))`` on the mean squared error
  between the guided, STDG-steered DDIM step from the current reconstruction and the inverted latent of
  the next step; early stop once the loss is below ``early_stop + k·2e-5``. Guidance is written
  ``ε_c + s(ε_c − ε_u)`` (s = `edit.guidance`), as the authors write it.
- **Spatial-temporal decoupled guidance** (:func:`stdg_terms`): the gradient, with respect to the current
  reconstruction's latent, of ``η_f·M(m) + η_b·M(1−m) + ζ_f·A(m) + ζ_b·A(1−m)``, where M is an MSE on the
  motion module's temporal attention maps at the reference maps' top-K keys, A an MSE on the masked means of
  the spatial self-attention keys, both between the inversion's latent and the reconstruction at the
  same step, over the `stdg_blocks` (decoder levels 1 and 2), weighted per block, and m the sample's
  foreground mask. It steers the direction term of every tuning and editing step
  (:func:`vidbatch.engine.ddim.score_guided_step`). One fused backward (the sum is linear).
- **Attention control while editing**: one video-UNet call runs
  ``[edit uncond (tuned nulls), edit cond, source uncond, source cond]``, the source branches fed the
  inverted latents. Spatial self-attention: before ``int(S·tau_s)`` steps the edit-cond branch takes the
  source-cond branch's attention probabilities (its own values kept), at layers of at most
  `self_replace_max_tokens` tokens; from then on, in the `mutual_blocks`, each edit branch attends to
  its source branch's keys/values with the foreground keys masked out, plus its own.
  Cross-attention: prompt-to-prompt refine for the first ``int(tau_c·(S+1))`` steps.

Where we differ from the authors' code on purpose: one timestep schedule for inversion, tuning and
editing (theirs inverts on a linspace schedule and edits on the scheduler's); an empty mask gives a zero
loss (theirs a NaN); no repeated identical UNet passes (theirs runs the reference pass four times a
step); masks come from the sample (``{key}.mask.mp4``, white = foreground; none: all foreground) instead
of SAM2; any length: the motion module sees at most `window` frames, longer clips run in overlapping
windows whose predictions are blended per frame (tuning back-propagates one window at a time).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vidbatch.core.errors import ConfigError
from vidbatch.core.settings import setting
from vidbatch.engine import ddim
from vidbatch.engine.method import Editor, Inversion, Method
from vidbatch.engine.precision import float32_unet
from vidbatch.engine.processors import (check_self_attention, in_blocks, install_processors, motion_blocks,
                                        project_heads, restore_processors, transformer_blocks)
from vidbatch.engine.prompt_to_prompt import controlled_steps, refine_mapping, replace_maps, token_ids
from vidbatch.io.disk_tensor import disk_tensor, on_disk

log = logging.getLogger("vidbatch")

__all__ = ["DirectorState", "TuningResult", "VideoDirector", "VideoDirectorConfig", "frame_windows", "key_loss",
           "stdg_terms", "temporal_map_loss", "tune", "video_unet", "window_weights"]

PATCH_OWNER = "videodirector"
_WARNED: set[tuple[str, ...]] = set()   # unmatched stdg_blocks already reported (once per process)
# The edit's four branches in one video-UNet call, branch-major.
EDIT_UNCOND, EDIT_COND, SOURCE_UNCOND, SOURCE_COND = range(4)
BRANCHES = 4
# The unconditional prompt: the tuning starts from its embedding and the source's unconditional branch uses it.
# The authors' configs all set `negative_prompt: ''`; the tuned nulls take the negative prompt's place.
NULL_PROMPT = ""


@dataclass
class VideoDirectorConfig:
    null_steps: int = setting(10, minimum=0, help="videodirector: Adam iterations of null-text tuning per step (0: none)")
    null_lr: float = setting(1e-2, minimum=0, help="videodirector: Adam's learning rate at the first step (decays to half)")
    early_stop: float = setting(1e-5, minimum=0, help="videodirector: a step's tuning stops below early_stop + step*2e-5")
    stdg: list[float] = setting([0.5, 0.5, 0.0, 0.5], help="videodirector: STDG weights [temporal fg, temporal bg, "
                                "spatial fg, spatial bg]; all 0 turns STDG off")
    stdg_scale: float = setting(1.0, minimum=0, help="videodirector: how strongly the STDG gradient steers each step")
    stdg_blocks: list[str] = setting(["up_blocks.1", "up_blocks.2"], help="videodirector: UNet blocks whose "
                                     "attention the STDG losses compare")
    stdg_block_weights: list[float] = setting([20000.0, 10000.0], help="videodirector: loss weight of each of "
                                              "stdg_blocks")
    top_k: int = setting(1, minimum=1, help="videodirector: reference temporal-attention keys per query the "
                         "motion loss compares")
    tau_s: float = setting(0.4, minimum=0, maximum=1, help="videodirector: share of the steps whose spatial "
                           "self-attention maps come from the source; mutual attention after")
    tau_c: float = setting(0.8, minimum=0, maximum=1, help="videodirector: share of the steps with "
                           "prompt-to-prompt refine on cross-attention")
    mutual_blocks: list[str] = setting(["up_blocks"], help="videodirector: blocks with mutual self-attention "
                                       "after tau_s (the decoder's)")
    self_replace_max_tokens: int = setting(1024, minimum=1, help="videodirector: self-attention maps are taken "
                                           "from the source only at layers with at most this many tokens")
    window: int = setting(16, minimum=1, help="videodirector: frames the motion module sees at once (its context)")
    overlap: int = setting(4, minimum=0, help="videodirector: frames shared by neighbouring windows, blended")


# ---------------------------------------------------------------------------------------------
# Windows of frames


def frame_windows(num_frames: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` spans of at most `size` frames covering ``0..num_frames-1``, neighbours sharing
    `overlap` frames; the last window ends at the last frame. One window when the clip fits."""
    if num_frames <= size:
        return [(0, num_frames)]
    if overlap >= size:
        raise ConfigError(f"videodirector.overlap ({overlap}) must be below videodirector.window ({size})")
    stride = size - overlap
    starts = list(range(0, num_frames - size, stride)) + [num_frames - size]
    return [(start, start + size) for start in starts]


def window_weights(spans: list[tuple[int, int]], num_frames: int, overlap: int) -> list[Tensor]:
    """Per window, (F_w,) float32 blend weights that sum to 1 over the windows of each frame.

    Inside a window the raw weight ramps up over its first ``overlap + 1`` frames and down over its
    last ones, so a frame shared by two windows leans to the one whose middle is nearer.
    """
    ramp = float(overlap + 1)
    raw = []
    for start, end in spans:
        position = torch.arange(end - start, dtype=torch.float32)
        raw.append(torch.minimum(torch.ones(()), torch.minimum((position + 1) / ramp, (end - start - position) / ramp)))
    total = torch.zeros(num_frames)
    for (start, end), weights in zip(spans, raw):
        total[start:end] += weights
    return [weights / total[start:end] for (start, end), weights in zip(spans, raw)]


# ---------------------------------------------------------------------------------------------
# The video UNet


def video_unet(editor: Editor, latents: Tensor, t: Tensor, embeddings: Tensor) -> Tensor:
    """The video UNet on `B` clips: latents (B, F, 4, h, w), embeddings (B*F, L, C) one per frame,
    branch-major -> (B, F, 4, h, w) float32. Gradients flow when enabled."""
    x = latents.to(editor.dtype).permute(0, 2, 1, 3, 4)
    out = editor.unet(x, t, encoder_hidden_states=embeddings.to(editor.dtype)).sample
    return out.permute(0, 2, 1, 3, 4).float()


def level_grid(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The (h, w) of a UNet level with `tokens` positions (each level halves the sides, rounding up)."""
    h, w = latent_hw
    for _ in range(8):
        if h * w == tokens:
            return h, w
        h, w = -(-h // 2), -(-w // 2)
    raise RuntimeError(f"no UNet level of a {latent_hw} latent has {tokens} tokens")


def mask_at(mask: Tensor, latent_hw: tuple[int, int], tokens: int) -> Tensor:
    """(F, H, W) bool foreground -> (F, tokens) bool at the level with `tokens` positions (nearest)."""
    grid = level_grid(latent_hw, tokens)
    resized = F.interpolate(mask[:, None].float(), size=grid, mode="nearest")
    return resized[:, 0].flatten(1) > 0.5


# ---------------------------------------------------------------------------------------------
# STDG losses: pure functions


def temporal_map_loss(reference: Tensor, generated: Tensor, query_mask: Tensor, top_k: int) -> Tensor:
    """MSE of temporal attention maps at the reference's top-K keys of each foreground query.

    reference, generated: (Q, heads, F, F) attention probabilities (Q = token positions, rows: query
    frames); query_mask: (Q, F) bool, whether the query token of each frame counts. An empty selection
    gives 0 (not NaN).
    """
    top = reference.topk(min(top_k, reference.shape[-1]), dim=-1).indices
    chosen = torch.zeros_like(reference, dtype=torch.bool).scatter_(-1, top, True)
    chosen = chosen & query_mask[:, None, :, None]
    squared = (reference.detach() - generated).square() * chosen
    return squared.sum() / chosen.sum().clamp(min=1)


def key_loss(reference: Tensor, generated: Tensor, mask: Tensor) -> Tensor:
    """MSE between the masked means of spatial self-attention keys, per frame.

    reference, generated: (F, N, C) keys; mask: (F, N) bool. A frame without mask tokens gives zero
    means (the authors' ``sum / (count + 1e-5)``).
    """
    weight = mask[..., None].to(generated.dtype)
    count = weight.sum(1) + 1e-5
    return F.mse_loss((reference.detach() * weight).sum(1) / count, (generated * weight).sum(1) / count)


def block_weight(name: str, blocks: list[str], weights: list[float]) -> float | None:
    """The STDG weight of the layer `name`: that of the first of `blocks` it lies in; None outside them."""
    for block, weight in zip(blocks, weights):
        if in_blocks(name, [block]):
            return weight
    return None


@dataclass
class AttentionRecord:
    """What one video-UNet pass left for STDG: temporal attention maps and spatial self-attention keys.

    temporal: layer name -> (Q, heads, F, F); keys: layer name -> (F, N, C). Layers in the STDG blocks.
    """

    temporal: dict[str, Tensor] = field(default_factory=dict)
    keys: dict[str, Tensor] = field(default_factory=dict)

    def detached(self) -> "AttentionRecord":
        return AttentionRecord({k: v.detach() for k, v in self.temporal.items()},
                               {k: v.detach() for k, v in self.keys.items()})


def stdg_terms(reference: AttentionRecord, generated: AttentionRecord, mask: Tensor, latent_hw: tuple[int, int],
               blocks: list[str], weights: list[float], top_k: int) -> dict[str, Tensor]:
    """The four STDG losses of one window: ``motion_fg``, ``motion_bg``, ``appearance_fg``, ``appearance_bg``.

    Each is the mean over its layers of the layer's block weight times its loss (the authors' weighting);
    mask: (F, H, W) bool foreground of the window's frames.
    """
    terms = {}
    for region, region_mask in (("fg", mask), ("bg", ~mask)):
        motion = []
        for name, generated_maps in generated.temporal.items():
            tokens = generated_maps.shape[0]
            query_mask = mask_at(region_mask, latent_hw, tokens).T           # (Q, F)
            loss = temporal_map_loss(reference.temporal[name], generated_maps, query_mask, top_k)
            motion.append(block_weight(name, blocks, weights) * loss)
        appearance = []
        for name, generated_keys in generated.keys.items():
            key_mask = mask_at(region_mask, latent_hw, generated_keys.shape[1])
            loss = key_loss(reference.keys[name], generated_keys, key_mask)
            appearance.append(block_weight(name, blocks, weights) * loss)
        zero = mask.new_zeros((), dtype=torch.float32)
        terms[f"motion_{region}"] = torch.stack(motion).mean() if motion else zero
        terms[f"appearance_{region}"] = torch.stack(appearance).mean() if appearance else zero
    return terms


STDG_TERMS = ("motion_fg", "motion_bg", "appearance_fg", "appearance_bg")


def stdg_loss(terms: dict[str, Tensor], stdg: list[float]) -> Tensor:
    """``η_f·motion_fg + η_b·motion_bg + ζ_f·appearance_fg + ζ_b·appearance_bg``."""
    return sum(weight * terms[name] for weight, name in zip(stdg, STDG_TERMS))


# ---------------------------------------------------------------------------------------------
# Processors


@dataclass
class DirectorState:
    """State shared by the VideoDirector processors of one video UNet.

    mode: ``plain`` (stock attention), ``record`` (stock attention; the STDG blocks' temporal maps and
    spatial keys are kept in `record`, with their graphs), ``edit`` (the four-branch attention control).
    The edit fields describe the next call (:meth:`begin_call`): step, frames, foreground mask.
    """

    stdg_blocks: list[str]
    mutual_blocks: list[str]
    self_replace_max_tokens: int
    mode: str = "plain"
    record: AttentionRecord = field(default_factory=AttentionRecord)
    step: int = 0
    self_replace_steps: int = 0
    cross_steps: int = 0
    num_frames: int = 0
    mask: Tensor | None = None               # (F, H, W) bool of the call's frames; None: all foreground
    latent_hw: tuple[int, int] = (0, 0)
    mapper: Tensor | None = None             # prompt-to-prompt refine: source token per edit token
    alphas: Tensor | None = None

    def begin_call(self, step: int, num_frames: int, mask: Tensor | None, latent_hw: tuple[int, int]) -> None:
        self.step, self.num_frames, self.mask, self.latent_hw = step, num_frames, mask, latent_hw


def _finish(attn, out: Tensor, hidden_states: Tensor) -> Tensor:
    """(b, heads, n, d) attention output -> the block's output (projection, residual, rescale)."""
    out = out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[3]).to(hidden_states.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + hidden_states
    return out / attn.rescale_output_factor


def _probabilities(attn, q: Tensor, k: Tensor) -> Tensor:
    return (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)


class TemporalProcessor:
    """A motion module's temporal attention: stock, but in `record` mode its maps (with their graph) are kept."""

    def __init__(self, state: DirectorState, name: str, recorded: bool) -> None:
        self.state, self.name, self.recorded = state, name, recorded

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        check_self_attention("VideoDirector temporal", self.name, attn, hidden_states, encoder_hidden_states,
                             attention_mask)
        q, k, v = project_heads(attn, hidden_states)
        if self.state.mode == "record" and self.recorded:
            probs = _probabilities(attn, q, k)                                   # (Q, heads, F, F)
            self.state.record.temporal[self.name] = probs
            return _finish(attn, probs @ v, hidden_states)
        return _finish(attn, F.scaled_dot_product_attention(q, k, v), hidden_states)


class SpatialSelfProcessor:
    """A frame's self-attention (``attn1``): records keys for STDG; controls the edit branches while editing."""

    def __init__(self, state: DirectorState, name: str, recorded: bool, mutual: bool) -> None:
        self.state, self.name, self.recorded, self.mutual = state, name, recorded, mutual

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        check_self_attention("VideoDirector spatial", self.name, attn, hidden_states, encoder_hidden_states,
                             attention_mask)
        st = self.state
        q, k, v = project_heads(attn, hidden_states)
        if st.mode == "record" and self.recorded:
            st.record.keys[self.name] = attn.to_k(hidden_states)                # (F, N, C), pre head split
        if st.mode != "edit":
            return _finish(attn, F.scaled_dot_product_attention(q, k, v), hidden_states)
        if hidden_states.shape[0] != BRANCHES * st.num_frames:
            raise RuntimeError(f"block {self.name}: a batch of {hidden_states.shape[0]} rows is not "
                               f"{BRANCHES} branches x {st.num_frames} frames")
        tokens = hidden_states.shape[1]
        if st.step < st.self_replace_steps:
            if tokens > st.self_replace_max_tokens:
                return _finish(attn, F.scaled_dot_product_attention(q, k, v), hidden_states)
            probs = _probabilities(attn, q, k).unflatten(0, (BRANCHES, -1))      # (4, F, heads, N, N)
            probs = torch.stack([probs[EDIT_UNCOND], probs[SOURCE_COND], probs[SOURCE_UNCOND], probs[SOURCE_COND]])
            return _finish(attn, probs.flatten(0, 1) @ v, hidden_states)
        if not self.mutual:
            return _finish(attn, F.scaled_dot_product_attention(q, k, v), hidden_states)
        return _finish(attn, self._mutual(q, k, v, tokens), hidden_states)

    def _mutual(self, q: Tensor, k: Tensor, v: Tensor, tokens: int) -> Tensor:
        """Edit branches attend to [their source branch's background keys, their own keys]; sources stay stock."""
        st = self.state
        q, k, v = (x.unflatten(0, (BRANCHES, -1)) for x in (q, k, v))              # (4, F, heads, N, d)
        source = F.scaled_dot_product_attention(q[2:].flatten(0, 1), k[2:].flatten(0, 1), v[2:].flatten(0, 1))
        keys = torch.cat([k[2:], k[:2]], dim=-2).flatten(0, 1)                   # (2F, heads, 2N, d)
        values = torch.cat([v[2:], v[:2]], dim=-2).flatten(0, 1)
        if st.mask is None:
            foreground = torch.ones(st.num_frames, tokens, dtype=torch.bool, device=q.device)
        else:
            foreground = mask_at(st.mask, st.latent_hw, tokens)                  # (F, N)
        blocked = torch.zeros(st.num_frames, tokens, dtype=q.dtype, device=q.device).masked_fill(
            foreground, float("-inf"))
        bias = torch.cat([blocked, torch.zeros_like(blocked)], dim=-1)           # (F, 2N)
        bias = bias[None, :, None, None, :].expand(2, -1, 1, 1, -1).flatten(0, 1)  # (2F, 1, 1, 2N)
        edit = F.scaled_dot_product_attention(q[:2].flatten(0, 1), keys, values, attn_mask=bias)
        return torch.cat([edit, source])


class CrossProcessor:
    """Cross-attention (``attn2``): prompt-to-prompt refine of the edit-cond branch while editing, early steps."""

    def __init__(self, state: DirectorState, name: str, original) -> None:
        self.state, self.name, self.original = state, name, original

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        st = self.state
        if st.mode != "edit" or st.step >= st.cross_steps or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None or hidden_states.ndim != 3 or attn.group_norm is not None:
            raise NotImplementedError(f"block {self.name}: prompt-to-prompt supports (batch, tokens, channels) "
                                      "cross-attention without a mask")
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        q, k, v = project_heads(attn, hidden_states, context)
        probs = _probabilities(attn, q, k).unflatten(0, (BRANCHES, -1))           # (4, F, heads, N, L)
        edited = replace_maps(probs[SOURCE_COND], probs[EDIT_COND], "refine", st.mapper, st.alphas)
        probs = torch.stack([probs[EDIT_UNCOND], edited, probs[SOURCE_UNCOND], probs[SOURCE_COND]])
        return _finish(attn, probs.flatten(0, 1) @ v, hidden_states)


def apply_videodirector(unet: torch.nn.Module, config: VideoDirectorConfig) -> DirectorState:
    """Install VideoDirector's processors on a video UNet; returns their shared state (mode ``plain``)."""
    state = DirectorState(stdg_blocks=list(config.stdg_blocks), mutual_blocks=list(config.mutual_blocks),
                          self_replace_max_tokens=config.self_replace_max_tokens)

    def spatial(name: str, block) -> dict[str, object]:
        made = {"attn1": SpatialSelfProcessor(state, name, in_blocks(name, state.stdg_blocks), in_blocks(name, state.mutual_blocks))}
        if block.attn2 is not None:
            made["attn2"] = CrossProcessor(state, name, block.attn2.processor)
        return made

    def temporal(name: str, block) -> dict[str, object]:
        recorded = in_blocks(name, state.stdg_blocks)
        return {"attn1": TemporalProcessor(state, name + ".attn1", recorded),
                "attn2": TemporalProcessor(state, name + ".attn2", recorded)}

    install_processors(unet, PATCH_OWNER, state, spatial, make_temporal=temporal)
    names = [n for n, _ in transformer_blocks(unet)] + [n for n, _ in motion_blocks(unet)]
    missing = [b for b in state.stdg_blocks if not any(in_blocks(n, [b]) for n in names)]
    if missing and tuple(missing) not in _WARNED:
        _WARNED.add(tuple(missing))
        log.warning("videodirector.stdg_blocks %s match no attention block of this UNet", missing)
    return state


# ---------------------------------------------------------------------------------------------
# Tuning: multi-frame null-text pivotal tuning with STDG


@dataclass
class TuningResult:
    """null_embeddings: (S, T, L, C) one per step and frame; stdg: (S, T, 4, h, w) the STDG gradient of each
    step; reconstruction: (T, 4, h, w) where the tuned, steered reconstruction ends (≈ the clean latents)."""

    null_embeddings: Tensor
    stdg: Tensor
    reconstruction: Tensor


@dataclass
class _Clip:
    """What every step of tuning and editing shares: the windows, their weights, the schedule."""

    spans: list[tuple[int, int]]
    weights: list[Tensor]          # per window (F_w, 1, 1, 1) on the device
    alpha_t: Tensor
    alpha_prev: Tensor
    latent_hw: tuple[int, int]

    @classmethod
    def make(cls, editor: Editor, timesteps: Tensor, num_frames: int, latent_hw: tuple[int, int],
             config: VideoDirectorConfig) -> "_Clip":
        spans = frame_windows(num_frames, config.window, config.overlap)
        weights = [w.to(editor.device)[:, None, None, None] for w in window_weights(spans, num_frames, config.overlap)]
        alphas, final = editor.alphas()
        alpha_t, alpha_prev = ddim.alphas_for(alphas, final, timesteps.to(editor.device))
        return cls(spans, weights, alpha_t, alpha_prev, latent_hw)


def _stdg_on(config: VideoDirectorConfig) -> bool:
    return any(w != 0 for w in config.stdg)


def _recorded_pass(state: DirectorState, editor: Editor, latents: Tensor, t: Tensor, embeddings: Tensor
                   ) -> tuple[Tensor, AttentionRecord]:
    state.mode, state.record = "record", AttentionRecord()
    try:
        out = video_unet(editor, latents[None], t, embeddings)[0]
        return out, state.record
    finally:
        state.mode, state.record = "plain", AttentionRecord()


def _condition_and_score(state: DirectorState, editor: Editor, clip: _Clip, config: VideoDirectorConfig,
                         x: Tensor, reference: Tensor, t: Tensor, cond: Tensor, mask: Tensor
                         ) -> tuple[Tensor, Tensor]:
    """The conditional prediction at `x` and the STDG gradient there, window by window, blended.

    Per window: the reference pass (the inversion's latent) is recorded without a graph, the pass at `x`
    with one; the conditional prediction is that pass's output (no extra forward). Where `x` equals the
    reference (the first step) the reference pass is the same pass and is not run again.
    """
    if not _stdg_on(config):
        with torch.no_grad():
            return _blended(editor, clip, x, t, cond.expand(len(x), -1, -1)), torch.zeros_like(x)
    eps_cond, score = torch.zeros_like(x), torch.zeros_like(x)
    for (start, end), weight in zip(clip.spans, clip.weights):
        embeddings = cond.expand(end - start, -1, -1)
        reference_record = None
        if not torch.equal(x[start:end], reference[start:end]):
            with torch.no_grad():
                reference_record = _recorded_pass(state, editor, reference[start:end], t, embeddings)[1]
        leaf = x[start:end].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out, record = _recorded_pass(state, editor, leaf, t, embeddings)
            reference_record = reference_record or record.detached()
            terms = stdg_terms(reference_record, record, mask[start:end], clip.latent_hw, config.stdg_blocks,
                               config.stdg_block_weights, config.top_k)
            loss = stdg_loss(terms, config.stdg)
            gradient = torch.autograd.grad(loss, leaf)[0] if loss.requires_grad else torch.zeros_like(leaf)
        eps_cond[start:end] += weight * out.detach()
        score[start:end] += weight * gradient
    return eps_cond, score


def _blended(editor: Editor, clip: _Clip, x: Tensor, t: Tensor, embeddings: Tensor) -> Tensor:
    """The video UNet's prediction at `x` (T, 4, h, w), window by window, blended per frame; `embeddings`
    (T, L, C): one per frame (the tuned nulls, or a prompt's repeated)."""
    out = torch.zeros_like(x)
    for (start, end), weight in zip(clip.spans, clip.weights):
        out[start:end] += weight * video_unet(editor, x[None, start:end], t, embeddings[start:end])[0]
    return out


def _tune_step(editor: Editor, clip: _Clip, config: VideoDirectorConfig, k: int, num_steps: int, x: Tensor,
               t: Tensor, eps_cond: Tensor, score: Tensor, target: Tensor, nulls: Tensor) -> Tensor:
    """Adam on the per-frame null embeddings of step k; returns them tuned (T, L, C)."""
    guidance, kind = editor.settings.guidance, editor.prediction_type
    nulls = nulls.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([nulls], lr=config.null_lr * (1.0 - k / (2.0 * num_steps)))

    def reconstruction_loss(eps_uncond: Tensor) -> Tensor:
        guided = eps_cond + guidance * (eps_cond - eps_uncond)
        step = ddim.score_guided_step(x, guided, clip.alpha_t[k], clip.alpha_prev[k], kind, score, config.stdg_scale)
        return F.mse_loss(step, target)

    for _ in range(config.null_steps):
        optimiser.zero_grad()
        with torch.enable_grad():
            if len(clip.spans) == 1:
                loss = reconstruction_loss(video_unet(editor, x[None], t, nulls)[0])
                loss.backward()
            else:
                # Blended windows: the loss's gradient with respect to the blended prediction first (no
                # graph through the UNet), then one window's backward at a time: memory of one window.
                with torch.no_grad():
                    eps_uncond = _blended(editor, clip, x, t, nulls)
                eps_uncond.requires_grad_(True)
                loss = reconstruction_loss(eps_uncond)
                (upstream,) = torch.autograd.grad(loss, eps_uncond)
                for (start, end), weight in zip(clip.spans, clip.weights):
                    out = video_unet(editor, x[None, start:end], t, nulls[start:end])[0]
                    out.backward(weight * upstream[start:end])
        optimiser.step()
        if float(loss.detach()) < config.early_stop + k * 2e-5:
            break
    return nulls.detach()


def tune(editor: Editor, config: VideoDirectorConfig, inversion: Inversion, source_prompt: str,
         mask: Tensor | None) -> TuningResult:
    """Multi-frame null-text pivotal tuning with STDG over an inversion (module docstring).

    mask: (T, H, W) bool foreground; None: all foreground. Runs in float32 whatever the model's dtype.
    """
    with torch.inference_mode(False), float32_unet(editor, (NULL_PROMPT, source_prompt)):
        device = editor.device
        trajectory = inversion.trajectory.to(device, torch.float32).clone()
        clean = inversion.clean.to(device, torch.float32).clone()
        num_steps, num_frames = trajectory.shape[:2]
        clip = _Clip.make(editor, inversion.timesteps, num_frames, tuple(trajectory.shape[-2:]), config)
        mask = _full_mask(mask, num_frames, clean, editor.device)
        cond = editor.text_embedding(source_prompt).to(device, torch.float32).clone()
        nulls = editor.text_embedding(NULL_PROMPT).to(device, torch.float32).clone()
        nulls = nulls.expand(num_frames, -1, -1).clone()
        state = apply_videodirector(editor.unet, config)
        x, tuned, scores = trajectory[0].clone(), [], []
        try:
            for k in range(num_steps):
                t = inversion.timesteps[k].to(device)
                target = trajectory[k + 1] if k + 1 < num_steps else clean
                eps_cond, score = _condition_and_score(state, editor, clip, config, x, trajectory[k], t, cond, mask)
                nulls = _tune_step(editor, clip, config, k, num_steps, x, t, eps_cond, score, target, nulls)
                with torch.no_grad():
                    eps_uncond = _blended(editor, clip, x, t, nulls)
                    guided = eps_cond + editor.settings.guidance * (eps_cond - eps_uncond)
                    x = ddim.score_guided_step(x, guided, clip.alpha_t[k], clip.alpha_prev[k], editor.prediction_type,
                                               score, config.stdg_scale)
                tuned.append(nulls.cpu())
                scores.append(score.cpu())
                editor.report_progress("tune", k + 1, num_steps)
        finally:
            restore_processors(editor.unet, PATCH_OWNER)
        return TuningResult(torch.stack(tuned), torch.stack(scores), x.detach())


def _full_mask(mask: Tensor | np.ndarray | None, num_frames: int, clean: Tensor, device: torch.device) -> Tensor:
    """(T, H, W) bool on the device; None -> all foreground at the latent grid (nearest resizing keeps it)."""
    if mask is None:
        return torch.ones(num_frames, *clean.shape[-2:], dtype=torch.bool, device=device)
    mask = torch.as_tensor(np.asarray(mask), dtype=torch.bool, device=device)
    if mask.ndim != 3 or mask.shape[0] != num_frames:
        raise ValueError(f"the mask has shape {tuple(mask.shape)}; expected ({num_frames}, H, W)")
    return mask


# ---------------------------------------------------------------------------------------------
# Inversion and editing


@torch.no_grad()
def invert_video(editor: Editor, clean: Tensor, timesteps: Tensor, prompt: str, config: VideoDirectorConfig) -> Tensor:
    """DDIM inversion through the video UNet, conditional branch only, windows blended: (S, T, 4, h, w)
    in the model's dtype on the CPU, row k the latent at timesteps[k] (row 0 the noisiest)."""
    clip = _Clip.make(editor, timesteps, len(clean), tuple(clean.shape[-2:]), config)
    alphas, final = editor.alphas()
    cond = editor.text_embedding(prompt)
    x = clean.to(editor.device, torch.float32)
    trajectory = disk_tensor((len(timesteps), *clean.shape), editor.dtype)
    alpha_from = final
    for k in range(len(timesteps) - 1, -1, -1):
        t = timesteps[k].to(editor.device)
        out = _blended(editor, clip, x, t, cond.expand(len(x), -1, -1))
        alpha_to = alphas[timesteps[k]]
        x = ddim.inversion_step(x, out, alpha_from, alpha_to, editor.prediction_type)
        alpha_from = alpha_to
        # Rounded to the model's dtype as stored, and carried on from the rounded value, so a cached
        # inversion and a fresh one are the same numbers.
        trajectory[k] = x.to(editor.dtype).cpu()
        x = trajectory[k].to(editor.device, torch.float32)
        editor.report_progress("invert", len(timesteps) - k, len(timesteps))
    return trajectory


class VideoDirector(Method):
    """VideoDirector in the engine: a video UNet, tuned null embeddings and STDG in the inversion's extras,
    a four-branch edit loop with spatial and cross-attention control (module docstring)."""

    name = "videodirector"
    section = "videodirector"
    settings_type = VideoDirectorConfig
    default_control = "none"
    needs_motion_module: ClassVar[bool] = True
    uses_mask: ClassVar[bool] = True

    def inversion_parts(self) -> dict:
        c = self.config
        return {"videodirector": {
            "null_steps": c.null_steps, "null_lr": c.null_lr, "early_stop": c.early_stop, "stdg": list(c.stdg),
            "stdg_scale": c.stdg_scale, "stdg_blocks": list(c.stdg_blocks),
            "stdg_block_weights": list(c.stdg_block_weights), "top_k": c.top_k, "window": c.window,
            "overlap": c.overlap, "guidance": self.settings.guidance}}

    def _check(self) -> None:
        s = self.settings
        if s.inversion_steps not in (None, s.steps):
            raise ConfigError("videodirector inverts, tunes and edits on one schedule: set inversion.steps to null "
                              f"(it is {s.inversion_steps}, edit.steps {s.steps})")
        if len(self.config.stdg) != 4:
            raise ConfigError(f"videodirector.stdg needs 4 weights [temporal fg, temporal bg, spatial fg, spatial bg], "
                              f"got {self.config.stdg}")
        if len(self.config.stdg_block_weights) != len(self.config.stdg_blocks):
            raise ConfigError("videodirector.stdg_block_weights needs one weight per entry of stdg_blocks")

    def invert(self, editor: Editor, frames: np.ndarray, prompt: str, mask: np.ndarray | None = None) -> Inversion:
        self._check()
        timesteps = editor.timesteps_for(self.settings.steps)
        clean = editor.encode_frames(frames).float()
        trajectory = invert_video(editor, clean, timesteps, prompt, self.config)
        inversion = Inversion(timesteps=timesteps, trajectory=trajectory, clean=on_disk(clean))
        tuned = tune(editor, self.config, inversion, prompt, mask)
        inversion.extras = {"null_embeddings": tuned.null_embeddings.to(editor.dtype), "stdg": tuned.stdg}
        return inversion

    @torch.no_grad()
    def denoise(self, editor: Editor, inversion: Inversion, prompt: str, source_prompt: str, seed: int,
                control_images=None, mask: np.ndarray | None = None) -> Tensor:
        self._check()
        s, c = self.settings, self.config
        nulls, scores = inversion.extras["null_embeddings"], inversion.extras["stdg"]
        num_steps, num_frames = inversion.trajectory.shape[:2]
        latent_hw = tuple(inversion.trajectory.shape[-2:])
        clip = _Clip.make(editor, inversion.timesteps, num_frames, latent_hw, c)
        full_mask = None if mask is None else _full_mask(mask, num_frames, inversion.clean, editor.device)
        edit, source = editor.text_embedding(prompt), editor.text_embedding(source_prompt)
        negative = editor.text_embedding(NULL_PROMPT)
        state = apply_videodirector(editor.unet, c)
        state.mode = "edit"
        state.self_replace_steps = int(num_steps * c.tau_s)
        state.cross_steps = controlled_steps(c.tau_c, num_steps)
        mapper, alphas = refine_mapping(token_ids(editor.pipe.tokenizer, source_prompt), token_ids(editor.pipe.tokenizer, prompt))
        state.mapper, state.alphas = mapper.to(editor.device), alphas.to(editor.device)
        x = inversion.trajectory[0].to(editor.device, torch.float32)
        try:
            for k in range(num_steps):
                t = inversion.timesteps[k].to(editor.device)
                source_latents = inversion.trajectory[k].to(editor.device, torch.float32)
                step_nulls = nulls[k].to(editor.device)
                guided = torch.zeros_like(x)
                for (start, end), weight in zip(clip.spans, clip.weights):
                    frames = end - start
                    state.begin_call(k, frames, None if full_mask is None else full_mask[start:end], latent_hw)
                    latents = torch.stack([x[start:end], x[start:end], source_latents[start:end],
                                           source_latents[start:end]])
                    embeddings = torch.cat([step_nulls[start:end], *(e.expand(frames, -1, -1)
                                                                     for e in (edit, negative, source))])
                    out = video_unet(editor, latents, t, embeddings)
                    guided[start:end] += weight * (out[EDIT_COND] + s.guidance * (out[EDIT_COND] - out[EDIT_UNCOND]))
                x = ddim.score_guided_step(x, guided, clip.alpha_t[k], clip.alpha_prev[k], editor.prediction_type,
                                           scores[k].to(editor.device), c.stdg_scale)
                editor.report_progress("edit", k + 1, num_steps)
        finally:
            restore_processors(editor.unet, PATCH_OWNER)
        return x

    def max_branches(self, controls: frozenset[str]) -> int:
        return BRANCHES
