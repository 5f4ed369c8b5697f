"""VidToMe (Li et al. 2024) as a method of the editing engine: `edit.method: vidtome`; and the
frame self-attention processor it shares with `per-frame` and `extended`.

Only the self-attention (``attn1``) of every ``BasicTransformerBlock`` of a diffusers UNet is
replaced; cross-attention and feed-forward stay stock. All patched processors of one UNet share one
:class:`FrameAttentionState`, which the editing engine drives. A tomesd-like API:

.. code-block:: python

    state = apply_patch(unet, "vidtome", MergeSettings())
    for step in steps:
        state.begin_step()                                   # forget the global tokens
        for chunk in chunks:
            state.begin_chunk(len(chunk), num_branches=2, generator=g)
            unet(latents_of_chunk_for_all_branches, t, text)  # batch B*F, branch-major
    remove_patch(unet)

A UNet call on a chunk of ``F`` frames has batch ``B*F``, branch-major (all frames of branch 0, then
branch 1, ...). The self-attention input is ``hidden_states = norm1(x)`` of shape ``(B*F, N, C)``.

Modes of the processor (``FRAME_ATTENTION_MODES``):

- ``per-frame``: attention inside each frame, exactly the stock ``AttnProcessor2_0``.
- ``extended``: attention over all ``F*N`` tokens of the chunk, per branch.
- ``vidtome``: in blocks at most ``max_downsample`` below the latent grid, VidToMe local (and
  global) token merging of the chunk (:mod:`vidbatch.engine.methods.merge`), attention over the
  merged set, unmerge; per-frame elsewhere.

With ``inject_qk`` (Plug-and-Play) the blocks of :func:`vidbatch.engine.controls.pnp.pnp_attention_blocks`
(8 decoder self-attentions on SD 1.x/2.x) use the queries and keys of branch 0 (the source branch)
in every branch, position by position.

The `merge` config section (:class:`MergeConfig`) is VidToMe's; it also holds `chunk_size` and
`chunk_order`, which the engine applies to every method (their keys predate the method plug-ins).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Union

import torch
from torch import Tensor

from vidbatch.core.errors import ConfigError
from vidbatch.core.settings import setting
from vidbatch.engine.controls.pnp import pnp_attention_blocks
from vidbatch.engine.method import Method
from vidbatch.engine.methods.merge import (
    MERGE_MODES,
    Merge,
    draw_global_side,
    draw_local_offsets,
    global_merge,
    join_frames,
    local_merge,
    size_bias,
    split_frames,
    take_tokens,
)
from vidbatch.engine.processors import attend, check_layout, check_self_attention, install_processors, restore_processors

__all__ = [
    "FRAME_ATTENTION_MODES",
    "BlockStats",
    "FrameAttentionBatch",
    "FrameAttentionState",
    "FrameAttnProcessor",
    "MergeConfig",
    "MergeDraws",
    "MergedChunk",
    "MergeSettings",
    "VidToMe",
    "apply_patch",
    "apply_patch_videos",
    "attended_share",
    "remove_patch",
]

FRAME_ATTENTION_MODES = ("per-frame", "extended", "vidtome")

# Who installed the frame-attention processors (for restore_processors).
PATCH_OWNER = "frame-attention"


@dataclass
class MergeConfig:
    """The `merge` config section: VidToMe's merging, and the engine's chunking (see the module doc)."""

    chunk_size: Union[int, Literal["auto"]] = setting(4, minimum=1, help="frames per UNet call ('auto': fit runtime.max_memory_gb)")
    local_ratio: float = setting(0.9, minimum=0, maximum=1, help="share of source tokens merged inside a chunk")
    global_ratio: float = setting(0.8, minimum=0, maximum=1, help="share merged between a chunk and the global tokens")
    global_merge: bool = setting(True, help="merge across chunks through a per-block global token set")
    global_rand: float = setting(0.5, minimum=0, maximum=1, help="probability that the global set is the source side")
    target_stride: int = setting(4, minimum=2, help="one destination frame per this many frames")
    align_batch: bool = setting(True, help="one matching shared by the guidance branches")
    max_downsample: int = setting(2, choices=[1, 2, 4, 8], help="merge in blocks at most this downsampled")
    proportional_attention: bool = setting(False, help="weigh every merged token's attention by the number of tokens "
                                                       "it stands for (ToMe); off in the paper")
    chunk_order: str = setting("mix", choices=["seq", "rand", "mix"], help="how chunks are cut and visited each step")

    def merge_settings(self) -> "MergeSettings":
        """The processors' :class:`MergeSettings` from this section."""
        return MergeSettings(local_ratio=self.local_ratio, global_ratio=self.global_ratio,
                             global_merge=self.global_merge, global_rand=self.global_rand,
                             target_stride=self.target_stride, align_batch=self.align_batch,
                             max_downsample=self.max_downsample, proportional_attention=self.proportional_attention)


@dataclass
class MergeSettings:
    """VidToMe merging parameters (defaults: the reference's).

    Attributes:
        local_ratio: fraction of the source tokens merged at every local level.
        global_ratio: fraction of the source side merged between the chunk and the global set.
        global_merge: merge with the block's global token set (the previous chunk's tokens).
        global_rand: probability that the global set is the source side of the global matching.
        target_stride: one destination frame in every ``target_stride`` frames (>= 2).
        align_batch: one matching for all guidance branches (required with PnP injection).
        max_downsample: merge only in blocks whose grid is at most this much below the latent.
        merge_mode: ``"replace"`` (VidToMe) or ``"mean"`` (see :meth:`vidbatch.engine.methods.merge.Merge.merge`).
        proportional_attention: add ``log(size)`` to the attention logits of every merged key, its
            size being the number of original tokens it stands for (through the local levels and the
            global set); off in the paper and the reference.
    """

    local_ratio: float = 0.9
    global_ratio: float = 0.8
    global_merge: bool = True
    global_rand: float = 0.5
    target_stride: int = 4
    align_batch: bool = True
    max_downsample: int = 2
    merge_mode: str = "replace"
    proportional_attention: bool = False

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid value."""
        for key in ("local_ratio", "global_ratio", "global_rand"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"merge.{key} must be in [0, 1], got {value}")
        if self.target_stride < 2:
            raise ConfigError(f"merge.target_stride must be at least 2, got {self.target_stride}")
        if self.max_downsample < 1:
            raise ConfigError(f"merge.max_downsample must be at least 1, got {self.max_downsample}")
        if self.merge_mode not in MERGE_MODES:
            raise ConfigError(f"merge.merge_mode must be one of {MERGE_MODES}, got {self.merge_mode!r}")


@dataclass
class BlockStats:
    """Token counts of one block's last self-attention call, per guidance branch.

    Attributes:
        tokens: tokens of the chunk, ``F*N``.
        local: tokens after local merging (``tokens`` when nothing was merged).
        attended: size of the token set one query attends over (``N`` per-frame, ``F*N`` extended,
            the merged set including global tokens with VidToMe).
        downsample: the block's grid downsampling from the latent grid (0 when unknown).
    """

    tokens: int
    local: int
    attended: int
    downsample: int = 0


@dataclass
class MergeDraws:
    """The random draws of one UNet call, shared by every merged block (as the reference's blocks,
    whose generators are copies of one state, draw the same numbers).

    Attributes:
        local_offsets: the destination-frame offset of every local level
            (:func:`vidbatch.engine.methods.merge.draw_local_offsets`); ``(1,)`` tensors on the generator's device.
        global_is_src: the global-merging side (:func:`vidbatch.engine.methods.merge.draw_global_side`); ``None``
            while no block had a global set.
    """

    local_offsets: list[Tensor | int]
    global_is_src: bool | None = None


class FrameAttentionState:
    """State shared by all patched processors of one UNet; created by :func:`apply_patch`.

    Attributes:
        method: ``"per-frame"``, ``"extended"`` or ``"vidtome"``.
        settings: the :class:`MergeSettings` (used by ``vidtome``).
        num_frames, num_branches, generator, inject_qk: the current chunk (see :meth:`begin_chunk`).
        latent_tokens: ``h*w`` of the latent, recorded at every UNet call (or from ``latent_hw``).
        draws: the :class:`MergeDraws` of the current chunk (``vidtome`` with a generator), drawn by
            :meth:`begin_chunk`.
        global_tokens: block name -> ``(B, L, C)`` global token set of the current step.
        global_sizes: block name -> ``(Bm, L)`` how many tokens of its chunk every global token
            stands for (with ``proportional_attention``).
        stats: block name -> :class:`BlockStats` of the block's last call.
    """

    def __init__(self, method: str, settings: MergeSettings) -> None:
        self.method = method
        self.settings = settings
        self.num_frames: int | None = None
        self.num_branches: int | None = None
        self.generator: torch.Generator | None = None
        self.inject_qk = False
        self.latent_tokens: int | None = None
        self.draws: MergeDraws | None = None
        self.global_tokens: dict[str, Tensor] = {}
        self.global_sizes: dict[str, Tensor] = {}
        self.stats: dict[str, BlockStats] = {}

    def begin_step(self) -> None:
        """Start a denoising step: forget every block's global tokens."""
        self.global_tokens.clear()
        self.global_sizes.clear()

    def begin_chunk(
        self,
        num_frames: int,
        num_branches: int,
        generator: torch.Generator | None = None,
        inject_qk: bool = False,
        latent_hw: tuple[int, int] | None = None,
    ) -> None:
        """Declare the next UNet call(s): a chunk of ``num_frames`` frames for ``num_branches`` branches.

        Args:
            num_frames: ``F``, frames of the chunk.
            num_branches: ``B``, guidance branches; the UNet batch must be ``B*F``, branch-major.
            generator: the only source of randomness of ``vidtome``. The draws of the call are made
                here, once, in the reference's order (the destination frame of every local level,
                then the global side when a global set exists) and every merged block uses them, so
                all blocks pick the same destination frames and side. The same seed gives
                bit-identical output.
            inject_qk: PnP: the blocks built with ``pnp_qk`` use branch 0's queries and keys in
                every branch.
            latent_hw: the latent's ``(h, w)``; only needed when the processors are called without
                the UNet's forward (which records it).
        """
        if num_frames < 1 or num_branches < 1:
            raise ValueError(f"a chunk needs at least one frame and one branch, got {num_frames} and {num_branches}")
        if inject_qk and self.method == "vidtome" and not self.settings.align_batch:
            raise ConfigError(
                "PnP query/key injection needs the guidance branches position-aligned: "
                "set merge.align_batch to true (or disable PnP)"
            )
        self.num_frames = num_frames
        self.num_branches = num_branches
        self.generator = generator
        self.inject_qk = inject_qk
        self.draws = None
        if self.method == "vidtome" and generator is not None:
            s = self.settings
            offsets = []
            if s.local_ratio > 0 and num_frames > 1:
                offsets = draw_local_offsets(num_frames, s.target_stride, generator)
            side = None
            if s.global_merge and self.global_tokens:
                side = draw_global_side(s.global_rand, generator)
            self.draws = MergeDraws(offsets, side)
        if latent_hw is not None:
            self.latent_tokens = int(latent_hw[0]) * int(latent_hw[1])

    def downsample(self, num_tokens: int) -> int:
        """Downsampling of a block with ``num_tokens`` tokens per frame from the latent grid."""
        if self.latent_tokens is None:
            raise RuntimeError(
                "the latent size is unknown: call the patched UNet itself (apply_patch records it), "
                "or pass latent_hw to begin_chunk"
            )
        return int(math.ceil(math.sqrt(self.latent_tokens / num_tokens) - 1e-6))


class FrameAttentionBatch:
    """The states of several videos whose chunks share UNet calls (`runtime.batch_videos`); created by
    :func:`apply_patch_videos`.

    Every video keeps its own :class:`FrameAttentionState` (its chunk layout, merge draws from its own
    generator, global tokens, statistics). A UNet call holds the chunks of the `active` videos one after
    the other, each ``B_i*F_i`` rows branch-major; the processors split the batch at those rows and
    attend each part with its video's state, exactly as if the video ran alone.

    Attributes:
        videos: one state per video of the batch.
        active: the states of the videos in the current call, in batch order (:meth:`begin_call`).
    """

    def __init__(self, videos: list[FrameAttentionState]) -> None:
        self.videos = videos
        self.active = list(videos)

    def begin_call(self, active: list[int]) -> None:
        """The next UNet call holds `videos[i]` for i in `active`, in that order (each already declared
        with its own ``begin_chunk``)."""
        self.active = [self.videos[i] for i in active]


@dataclass
class MergedChunk:
    """One block's merged chunk (:meth:`FrameAttnProcessor.merge_chunk`).

    Attributes:
        tokens: ``(B, M, C)`` the tokens attended over (local tokens, merged with the global set).
        local: the local :class:`~vidbatch.engine.methods.merge.Merge` over the chunk's ``F*N`` tokens.
        glob: the global :class:`~vidbatch.engine.methods.merge.Merge` over ``[local tokens | global set]``, or ``None``
            when no global set took part.
        bias: ``(Bm, 1, 1, M)`` the proportional-attention bias, or ``None``.
    """

    tokens: Tensor
    local: Merge
    glob: Merge | None
    bias: Tensor | None

    def unmerge(self, out: Tensor) -> Tensor:
        """``(B, M, C') -> (B, F*N, C')``: every position of the chunk takes its merged token's value."""
        if self.glob is None:
            return self.local.unmerge(out)
        # The global un-merge, then the local one, as a single copy.
        return take_tokens(out, self.glob.then_unmerge(self.local))


class FrameAttnProcessor:
    """Self-attention processor for one ``BasicTransformerBlock.attn1``, driven by a shared state.

    Args:
        state: the :class:`FrameAttentionState` shared by the UNet's patched processors, or the
            :class:`FrameAttentionBatch` of several videos (each video's rows with its own state).
        name: the block's module name (``down_blocks.0.attentions.0.transformer_blocks.0``); keys
            the block's global tokens and statistics.
        pnp_qk: the block takes PnP's query/key injection (``apply_patch`` sets it from
            :func:`vidbatch.engine.controls.pnp.pnp_attention_blocks`).
    """

    def __init__(self, state: FrameAttentionState | FrameAttentionBatch, name: str, pnp_qk: bool = False) -> None:
        self.state = state
        self.name = name
        self.pnp_qk = pnp_qk

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        if not isinstance(self.state, FrameAttentionBatch):
            return self._attend_video(self.state, attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        # Several videos in one call: each segment (``B_i*F_i`` rows, branch-major) with its own state,
        # so merging, global tokens and PnP's branch 0 never mix videos.
        videos = self.state.active
        if len(videos) == 1:
            return self._attend_video(videos[0], attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        rows = [self._rows(st) for st in videos]
        if sum(rows) != hidden_states.shape[0]:
            raise RuntimeError(f"block {self.name} got a batch of {hidden_states.shape[0]}, but the videos of the "
                               f"call declared {' + '.join(map(str, rows))} rows")
        # The context, mask and temb come row by row with the batch (per-frame mode takes them as the stock
        # processor does): each video gets its own rows of them too.
        extras = [t.split(rows) if t is not None and t.shape[0] == hidden_states.shape[0] else [t] * len(rows)
                  for t in (encoder_hidden_states, attention_mask, temb)]
        return torch.cat([self._attend_video(st, attn, part, *video_extras)
                          for st, part, video_extras in zip(videos, hidden_states.split(rows), zip(*extras))])

    def _rows(self, st: FrameAttentionState) -> int:
        if st.num_frames is None or st.num_branches is None:
            raise RuntimeError(f"{st.method} attention needs the chunk layout: call state.begin_chunk() before the UNet")
        return st.num_frames * st.num_branches

    def _attend_video(self, st: FrameAttentionState, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None,
                      attention_mask: Tensor | None, temb: Tensor | None) -> Tensor:
        """The self-attention of one video's rows ``(B*F, N, C)`` with that video's state."""
        if st.method == "per-frame":
            return self._per_frame(attn, hidden_states, encoder_hidden_states, attention_mask, temb, st=st)
        check_self_attention(st.method, self.name, attn, hidden_states, encoder_hidden_states, attention_mask)
        num_branches, num_frames = self._chunk(hidden_states, st)
        if st.method == "vidtome":
            ds = st.downsample(hidden_states.shape[1])
            if ds > st.settings.max_downsample:
                return self._per_frame(attn, hidden_states, None, None, temb, downsample=ds, st=st)
            out = self._vidtome(attn, hidden_states, num_branches, num_frames, ds, st)
        elif st.method == "extended":
            x = join_frames(hidden_states, num_frames)
            out = split_frames(attend(attn, x, inject_branches=self._inject(num_branches, st)), num_frames)
            t = x.shape[1]
            st.stats[self.name] = BlockStats(tokens=t, local=t, attended=t)
        else:
            raise ConfigError(f"unknown attention method {st.method!r}; expected one of {FRAME_ATTENTION_MODES}")
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _chunk(self, hidden_states: Tensor, st: FrameAttentionState) -> tuple[int, int]:
        if st.num_frames is None or st.num_branches is None:
            raise RuntimeError(f"{st.method} attention needs the chunk layout: call state.begin_chunk() before the UNet")
        return check_layout(st.method, self.name, hidden_states.shape[0], st.num_frames, st.num_branches)

    def _inject(self, num_branches: int, st: FrameAttentionState) -> int | None:
        return num_branches if (st.inject_qk and self.pnp_qk) else None

    def _per_frame(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None,
        attention_mask: Tensor | None,
        temb: Tensor | None,
        downsample: int = 0,
        st: FrameAttentionState | None = None,
    ) -> Tensor:
        """The stock ``AttnProcessor2_0`` computation, plus PnP injection; `st`: the video's state."""
        st = self.state if st is None else st
        inject = None
        if st.inject_qk and self.pnp_qk:
            inject = self._chunk(hidden_states, st)[0]

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        n = hidden_states.shape[1]
        out = attend(attn, hidden_states, encoder_hidden_states, attention_mask, inject)

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        if st.num_frames is not None and hidden_states.shape[0] == st.num_frames * (st.num_branches or 0):
            t = st.num_frames * n
            st.stats[self.name] = BlockStats(tokens=t, local=t, attended=n, downsample=downsample)
        return out

    def _vidtome(self, attn, hidden_states: Tensor, num_branches: int, num_frames: int, downsample: int,
                 st: FrameAttentionState) -> Tensor:
        """Local (+ global) merge, joint attention over the merged set, unmerge: ``(B*F, N, C)`` in and out."""
        x = join_frames(hidden_states, num_frames)  # (B, F*N, C)
        merged = self.merge_chunk(x, num_frames, num_branches, st)
        out = attend(attn, merged.tokens, attention_mask=merged.bias, inject_branches=self._inject(num_branches, st))
        st.stats[self.name] = BlockStats(
            tokens=x.shape[1], local=merged.local.num_kept, attended=merged.tokens.shape[1], downsample=downsample
        )
        return split_frames(merged.unmerge(out), num_frames)

    def merge_chunk(self, x: Tensor, num_frames: int, num_branches: int,
                    state: FrameAttentionState | None = None) -> MergedChunk:
        """VidToMe merging of one chunk in this block, with the call's draws; updates the global set.

        Args:
            x: ``(B, F*N, C)`` the block's normalised input, frames joined.
            num_frames: ``F``.
            num_branches: ``B``.
            state: the video's state (its draws and global tokens); None: the processor's own.

        Returns:
            The :class:`MergedChunk`: the tokens to attend over and how to un-merge the output.
        """
        st = self.state if state is None else state
        s = st.settings
        draws = st.draws
        if draws is None and ((s.local_ratio > 0 and num_frames > 1) or s.global_merge):
            raise RuntimeError("vidtome attention needs a torch.Generator: pass one to begin_chunk")
        offsets = draws.local_offsets if draws is not None else []
        local = local_merge(x, num_frames, s.local_ratio, s.target_stride, align_batch=s.align_batch, offsets=offsets)
        tokens = local.merge(x, s.merge_mode)  # (B, L, C)
        num_local = tokens.shape[1]
        # Proportional attention: how many of the chunk's tokens every merged token stands for.
        local_sizes = sizes = local.sizes() if s.proportional_attention else None  # (Bm, L)

        glob: Merge | None = None
        if s.global_merge:
            previous = st.global_tokens.get(self.name)
            if previous is None:
                st.global_tokens[self.name] = tokens.detach()
            else:
                if previous.shape[0] != num_branches or previous.shape[2] != x.shape[2]:
                    raise RuntimeError(
                        f"block {self.name}: the global tokens ({tuple(previous.shape)}) come from chunks with "
                        f"another layout than this one ({num_branches} branches); call begin_step() between runs"
                    )
                if draws.global_is_src is None:
                    # A second UNet call after one begin_chunk met a global set: draw the side once,
                    # the other blocks of the call use it too.
                    draws.global_is_src = draw_global_side(s.global_rand, st.generator)
                glob = global_merge(tokens, previous, s.global_ratio, s.global_rand, align_batch=s.align_batch,
                                    global_is_src=draws.global_is_src)
                tokens = glob.merge(torch.cat([tokens, previous.to(tokens.dtype)], dim=1), s.merge_mode)
                # The new global set: this chunk's tokens at the local level, as the global matching
                # left them (merged ones take their global destination's value). Replaces the old set.
                st.global_tokens[self.name] = glob.unmerge_first(tokens, num_local).detach()
                if sizes is not None:
                    # A global token stands for its group of the previous chunk's tokens.
                    before = st.global_sizes.get(self.name)
                    if before is None:  # a global set left by a call without proportional attention
                        before = torch.ones(1, previous.shape[1], device=sizes.device, dtype=sizes.dtype)
                    bm = max(sizes.shape[0], before.shape[0])
                    sizes = glob.sizes(torch.cat([sizes.expand(bm, -1), before.expand(bm, -1)], dim=1))
            if local_sizes is not None:
                st.global_sizes[self.name] = local_sizes

        # An additive (Bm, 1, 1, M) bias; none when every token stands for itself.
        bias = None
        if sizes is not None and (not local.is_identity or glob is not None):
            bias = size_bias(sizes, tokens.dtype)
        return MergedChunk(tokens=tokens, local=local, glob=glob, bias=bias)


def apply_patch(unet: torch.nn.Module, method: str, merge: MergeSettings | None = None) -> FrameAttentionState:
    """Replace the self-attention processors of every ``BasicTransformerBlock`` of ``unet``.

    Re-patching a patched UNet first removes the old patch. A forward pre-hook records the latent
    size at every UNet call (``vidtome`` needs it to find the blocks to merge in).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (any model with ``set_attn_processor``).
        method: one of ``FRAME_ATTENTION_MODES``: ``"per-frame"``, ``"extended"`` or ``"vidtome"``.
        merge: the merging settings (``vidtome`` only); defaults to :class:`MergeSettings()`.

    Returns:
        The :class:`FrameAttentionState` that drives the processors.
    """
    settings = _checked_settings(method, merge)
    state = FrameAttentionState(method, settings)
    _install(unet, state, [state])
    return state


def apply_patch_videos(unet: torch.nn.Module, method: str, count: int,
                       merge: MergeSettings | None = None) -> FrameAttentionBatch:
    """Like :func:`apply_patch`, for `count` videos whose chunks share UNet calls: one state per video,
    driven through the returned :class:`FrameAttentionBatch`. Undone by :func:`remove_patch`."""
    if count < 1:
        raise ValueError(f"a batch needs at least one video, got {count}")
    settings = _checked_settings(method, merge)
    batch = FrameAttentionBatch([FrameAttentionState(method, settings) for _ in range(count)])
    _install(unet, batch, batch.videos)
    return batch


def _checked_settings(method: str, merge: MergeSettings | None) -> MergeSettings:
    if method not in FRAME_ATTENTION_MODES:
        raise ConfigError(f"unknown attention method {method!r}; expected one of {', '.join(FRAME_ATTENTION_MODES)}")
    settings = merge if merge is not None else MergeSettings()
    settings.validate()
    return settings


def _install(unet: torch.nn.Module, driver: FrameAttentionState | FrameAttentionBatch,
             states: list[FrameAttentionState]) -> None:
    """Installs processors driven by `driver` (one video's state, or a batch of `states`) and the hook that
    records the latent size in every state."""
    pnp_blocks = pnp_attention_blocks(unet)

    def forget_global_tokens() -> None:
        for state in states:
            state.global_tokens.clear()
            state.global_sizes.clear()

    patch = install_processors(
        unet, PATCH_OWNER, driver,
        lambda name, block: {"attn1": FrameAttnProcessor(driver, name, pnp_qk=name in pnp_blocks)},
        on_restore=forget_global_tokens)

    def record_latent_size(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if sample is not None and sample.ndim == 4:
            for state in states:
                state.latent_tokens = sample.shape[-2] * sample.shape[-1]

    patch.handles.append(unet.register_forward_pre_hook(record_latent_size, with_kwargs=True))


def remove_patch(unet: torch.nn.Module) -> None:
    """Restore the processors ``apply_patch`` replaced (the stock ``AttnProcessor2_0``); no-op if unpatched."""
    restore_processors(unet, PATCH_OWNER)


def attended_share(local_ratio: float, global_ratio: float, global_merge: bool, stride: int) -> float:
    """Tokens one query attends over with VidToMe merging, as a share of the chunk's `F*N`."""
    kept = 1.0 - local_ratio * (1.0 - 1.0 / stride)   # one recursion level: an upper bound
    return kept * (2.0 - global_ratio) if global_merge else kept


class FrameAttentionMethod(Method):
    """A method that is one mode of :class:`FrameAttnProcessor` (`per-frame`, `extended`, `vidtome`).

    `attention_mode` (one of ``FRAME_ATTENTION_MODES``) is the processor's mode; a subclass that only
    changes other hooks keeps its parent's.
    """

    attention_mode: ClassVar[str] = "per-frame"

    def merge(self) -> MergeSettings:
        """The merging settings the processors get (VidToMe's; defaults for the other modes)."""
        return MergeSettings()

    # Every video's rows are attended with its own state (FrameAttentionBatch): chunks of several
    # videos can share a UNet call. A subclass with its own `denoise` or per-video hooks sets False.
    batches_videos = True

    def patch(self, editor, prompt: str, source_prompt: str) -> FrameAttentionState:
        return apply_patch(editor.unet, self.attention_mode, self.merge())

    def patch_videos(self, editor, count: int) -> FrameAttentionBatch:
        return apply_patch_videos(editor.unet, self.attention_mode, count, self.merge())

    def unpatch(self, unet: torch.nn.Module) -> None:
        remove_patch(unet)


class VidToMe(FrameAttentionMethod):
    """VidToMe: token merging within and across chunks before joint attention over the chunk."""

    name = "vidtome"
    attention_mode = "vidtome"
    section = "merge"
    settings_type = MergeConfig

    def merge(self) -> MergeSettings:
        return self.config.merge_settings()

    def attended_share(self) -> float:
        c = self.config
        return attended_share(c.local_ratio, c.global_ratio, c.global_merge, c.target_stride)
