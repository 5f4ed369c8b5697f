"""TokenFlow (Geyer, Bar-Tal, Bagon, Dekel 2023) as a method of the editing engine: `edit.method: tokenflow`.

Every denoising step has two passes over the UNet:

1. **Keyframe pass.** One keyframe is drawn at random in every group of `tokenflow.batch_size`
   frames (:func:`sample_keyframes`), anew in every step. The UNet runs once on all keyframes,
   every guidance branch. In the edit branches self-attention is extended across all keyframes:
   each keyframe's queries attend over the keys and values of every keyframe. The source branch
   (branch 0) keeps stock per-frame attention (each keyframe attends to itself only), as in the
   reference: it reconstructs the source video, whose features the correspondences and the PnP
   injection come from. The keys and values are shared by all queries, never repeated per
   frame, and the queries go through SDPA in chunks (:func:`keyframe_attention`), so the attention
   memory grows linearly with the number of keyframes, not with its square. Every patched block
   records the keyframes' self-attention outputs (all branches) and the source branch's attention
   inputs (branch 0's normalised hidden states), on the device.
2. **Propagation pass.** The engine's chunk loop runs the UNet on all frames. In every
   self-attention block nothing is attended: each frame takes its two nearest keyframes in time
   (the previous and the next one, :func:`keyframe_neighbours`), finds for every token the most
   similar token of each keyframe (cosine, on the source branch's attention inputs of the same
   block, :func:`nearest_tokens`) and its output is those keyframe outputs, branch by branch,
   blended by temporal distance (:func:`propagate`). A keyframe takes its own output; a frame
   before the first or after the last keyframe takes its one nearest keyframe.

The source branch (branch 0: the inverted latent of the step with the source prompt) runs in every
step, since the correspondences come from its features; PnP (`edit.control: pnp`) injects from it
as in TokenFlow: residual features for the first `pnp.f_t` of the steps and, in the keyframe pass,
decoder self-attention queries and keys for the first `pnp.attn_t`.

Shapes: ``B`` guidance branches, ``F`` frames of a UNet call, ``K`` keyframes, ``N`` tokens of one
frame in a block, ``C`` channels, ``h`` heads, ``d`` head width.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from vidbatch.core.errors import ConfigError
from vidbatch.core.settings import setting
from vidbatch.engine import memory
from vidbatch.engine.controls.pnp import pnp_attention_blocks
from vidbatch.engine.method import Method
from vidbatch.engine.methods.merge import join_frames, split_frames
from vidbatch.engine.processors import (broadcast_branch0, check_layout, check_self_attention, install_processors,
                                        restore_processors)

log = logging.getLogger("vidbatch")

__all__ = [
    "BLEND_MODES",
    "KeyframeRecord",
    "TokenFlow",
    "TokenFlowConfig",
    "TokenFlowProcessor",
    "TokenFlowState",
    "apply_tokenflow",
    "blend_weights",
    "estimate_keyframe_pass_bytes",
    "estimate_keyframe_records_bytes",
    "keyframe_attention",
    "keyframe_neighbours",
    "reference_neighbours",
    "nearest_tokens",
    "propagate",
    "remove_tokenflow",
    "sample_keyframes",
]

BLEND_MODES = ("sigmoid", "linear")

# Upper bound on the attention scores (keyframe attention) or similarities (correspondence search)
# held at once, in elements: 64 MB in float32, whatever the number of keyframes.
MAX_SCORES = 1 << 24
# TokenFlow's keyframe pass leaves, in every transformer block, its self-attention outputs (every
# branch) and the source branch's inputs: (branches + 1) x keyframes x tokens x channels of that
# block. Summed over SD's blocks (5 per level at 1, 1/2, 1/4 of the first level's tokens x
# channels, and the mid block) that is 8.8 times the first level's; rounded up.
RECORD_FACTOR = 10

# Who installed the TokenFlow processors (for restore_processors).
PATCH_OWNER = "tokenflow"


@dataclass
class TokenFlowConfig:
    """The `tokenflow` config section."""

    batch_size: int = setting(8, minimum=1, help="tokenflow: one keyframe drawn at random per this many frames, every step")
    blend: str = setting("sigmoid", choices=["sigmoid", "linear"],
                         help="tokenflow: weights of a frame's two keyframes by temporal distance; 'sigmoid' is TokenFlow's")
    pairing: str = setting("reference", choices=["reference", "nearest"],
                           help="tokenflow: a frame's two keyframes: 'reference' as TokenFlow's code (its group's and the "
                                "previous group's, weighed by distance to the group centres); 'nearest' the previous "
                                "and next keyframe by position (the paper's description)")


# ---------------------------------------------------------------------------------------------
# Pure functions


def sample_keyframes(num_frames: int, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """One keyframe drawn uniformly in every group of `batch_size` consecutive frames.

    The last group may be shorter. Returns ``(K,)`` int64 frame indices, ascending, on the CPU, with
    ``K = ceil(num_frames / batch_size)``.
    """
    if num_frames < 1 or batch_size < 1:
        raise ValueError(f"need at least one frame and a batch size >= 1, got {num_frames} and {batch_size}")
    starts = torch.arange(0, num_frames, batch_size)
    lengths = (num_frames - starts).clamp(max=batch_size)
    offsets = (torch.rand(len(starts), generator=generator) * lengths).long().clamp(max=lengths - 1)
    return starts + offsets


def blend_weights(d_first: Tensor, d_second: Tensor, mode: str = "sigmoid") -> Tensor:
    """Weight of the nearer keyframe (`first`) of a frame between two, from the temporal distances.

    ``sigmoid`` is TokenFlow's ``sigmoid(d2 / (d1 + d2))``: the nearer keyframe weighs 0.62 to 0.73.
    ``linear`` is ``d2 / (d1 + d2)``: linear interpolation (1 at the keyframe, 0.5 half-way).
    d_first, d_second: (F,) non-negative, d_first <= d_second, d_first + d_second > 0.
    """
    share = d_second.float() / (d_first + d_second).float()
    if mode == "sigmoid":
        return torch.sigmoid(share)
    if mode == "linear":
        return share
    raise ConfigError(f"tokenflow.blend must be one of {', '.join(BLEND_MODES)}, got {mode!r}")


PAIRINGS = ("reference", "nearest")


def reference_neighbours(frames: Tensor, keyframes: Tensor, batch_size: int,
                         mode: str = "sigmoid") -> tuple[Tensor, Tensor, Tensor]:
    """TokenFlow's own pairing: a frame of group ``b = frame // batch_size`` takes the keyframes of
    groups ``b`` and ``b - 1`` (group 0: its own keyframe alone), weighed by the frame's distances to
    the two groups' centres ``g * batch_size + batch_size // 2`` (not to the keyframes themselves).

    A keyframe is blended like any frame of its group, as in the reference. Same arguments and
    returns as :func:`keyframe_neighbours` (``keyframes`` holds one keyframe per group, ascending).
    """
    frames = frames.to(keyframes.device)
    group = frames // batch_size
    if int(group.max()) >= len(keyframes):
        raise ValueError(f"frame {int(frames.max())} is past the last group of {len(keyframes)} keyframes")
    previous = (group - 1).clamp(min=0)
    centre = group * batch_size + batch_size // 2
    d_own, d_previous = (frames - centre).abs(), (frames - (centre - batch_size)).abs()
    weight = torch.where(group > 0, blend_weights(d_own, d_previous, mode), torch.ones(len(frames), device=frames.device))
    return group, previous, weight


def keyframe_neighbours(frames: Tensor, keyframes: Tensor, mode: str = "sigmoid") -> tuple[Tensor, Tensor, Tensor]:
    """The two keyframes each frame takes its self-attention output from, and their blend.

    Args:
        frames: (F,) int64 frame indices.
        keyframes: (K,) int64 keyframe indices, ascending.
        mode: the blend (:func:`blend_weights`).

    Returns:
        ``first``, ``second``: (F,) int64 positions into ``keyframes``: the nearer and the farther of
        the previous and next keyframe (ties: the previous one is ``first``); ``weight``: (F,) float32,
        the weight of ``first``. A keyframe, and a frame before the first or after the last keyframe,
        has ``first == second`` (its own, or its nearest keyframe) and weight 1.
    """
    frames = frames.to(keyframes.device)
    right = torch.searchsorted(keyframes, frames)  # first keyframe at or after each frame
    num = len(keyframes)
    at = right.clamp(max=num - 1)
    is_key = keyframes[at] == frames
    prev = (right - 1).clamp(min=0)
    nxt = right.clamp(max=num - 1)
    before, after = right == 0, right == num
    prev = torch.where(before, nxt, prev)
    nxt = torch.where(after, prev, nxt)
    prev, nxt = torch.where(is_key, at, prev), torch.where(is_key, at, nxt)
    d_prev = (frames - keyframes[prev]).abs()
    d_next = (keyframes[nxt] - frames).abs()
    prev_nearer = d_prev <= d_next
    first = torch.where(prev_nearer, prev, nxt)
    second = torch.where(prev_nearer, nxt, prev)
    d_first, d_second = torch.minimum(d_prev, d_next), torch.maximum(d_prev, d_next)
    single = first == second
    weight = blend_weights(d_first, torch.where(single, d_second + 1, d_second), mode)
    weight = torch.where(single, torch.ones_like(weight), weight)
    return first, second, weight


def nearest_tokens(features: Tensor, keys: Tensor, max_scores: int = MAX_SCORES) -> Tensor:
    """For every token of every frame, the most similar token (cosine) of that frame's key frame.

    Args:
        features: (F, N, C) a frame's tokens.
        keys: (F, M, C) the tokens searched, one set per frame.
        max_scores: at most this many similarities exist at once (rows are searched in blocks).

    Returns:
        (F, N) int64 indices into ``M``. Ties go to the lowest index.
    """
    if features.shape[0] != keys.shape[0] or features.shape[2] != keys.shape[2]:
        raise ValueError(f"features {tuple(features.shape)} and keys {tuple(keys.shape)} do not pair up")
    x = F.normalize(features.float(), dim=-1)
    k = F.normalize(keys.float(), dim=-1)
    frames, n, m = x.shape[0], x.shape[1], k.shape[1]
    out = torch.empty(frames, n, dtype=torch.int64, device=features.device)
    rows = max(1, max_scores // max(1, m))
    if rows >= n:  # whole frames at once, as many as fit
        per_call = max(1, rows // n)
        for f in range(0, frames, per_call):
            out[f:f + per_call] = torch.bmm(x[f:f + per_call], k[f:f + per_call].transpose(1, 2)).argmax(-1)
        return out
    for f in range(frames):
        for r in range(0, n, rows):
            out[f, r:r + rows] = (x[f, r:r + rows] @ k[f].T).argmax(-1)
    return out


def propagate(outputs: Tensor, first: Tensor, second: Tensor, weight: Tensor, index_first: Tensor,
              index_second: Tensor) -> Tensor:
    """The frames' self-attention outputs copied from the keyframes' along token correspondences.

    Args:
        outputs: (B, K, N, C) the keyframes' self-attention outputs, per branch.
        first, second: (F,) int64 positions into ``K`` of each frame's two keyframes.
        weight: (F,) the weight of ``first``; where ``first == second`` the output is ``first``'s, exactly.
        index_first, index_second: (F, N) int64, for each token of a frame its corresponding token in
            the ``first`` / ``second`` keyframe.

    Returns:
        (B, F, N, C): ``weight * outputs[first][index_first] + (1 - weight) * outputs[second][index_second]``.
    """
    b, _, _, c = outputs.shape
    frames, n = index_first.shape

    def gather(positions: Tensor, index: Tensor) -> Tensor:
        return outputs[:, positions].gather(2, index[None, :, :, None].expand(b, frames, n, c))

    a = gather(first, index_first)
    single = (first == second)
    if bool(single.all()):
        return a
    z = gather(second, index_second)
    w = weight.to(outputs.dtype)[None, :, None, None]
    return torch.where(single[None, :, None, None], a, w * a + (1 - w) * z)


def keyframe_attention(query: Tensor, key: Tensor, value: Tensor, max_scores: int = MAX_SCORES) -> Tensor:
    """Every query attends over all keys: SDPA in query chunks of at most `max_scores` scores each.

    query: (B, h, M, d); key, value: (B, h, L, d) -> (B, h, M, d). The keys and values are the same
    tensors for every chunk (never repeated per frame), so memory is linear in ``L`` and the scores
    held at once are bounded by `max_scores` (where the kernel materialises them at all).
    """
    b, h, m, _ = query.shape
    rows = max(1, max_scores // max(1, b * h * key.shape[2]))
    if rows >= m:
        return F.scaled_dot_product_attention(query, key, value)
    return torch.cat([F.scaled_dot_product_attention(q, key, value) for q in query.split(rows, dim=2)], dim=2)


def _per_frame_attention(query: Tensor, key: Tensor, value: Tensor, frames: int, max_scores: int = MAX_SCORES) -> Tensor:
    """Each frame's queries attend over that frame's keys only (stock self-attention, frame by frame).

    query, key, value: (1, h, F*N, d), one branch with its frames joined -> (1, h, F*N, d).
    """
    _, h, length, d = query.shape
    n = length // frames

    def per_frame(t: Tensor) -> Tensor:  # (1, h, F*N, d) -> (F, h, N, d)
        return t.view(h, frames, n, d).transpose(0, 1)

    out = keyframe_attention(per_frame(query), per_frame(key), per_frame(value), max_scores)  # (F, h, N, d)
    return out.transpose(0, 1).reshape(1, h, length, d)


# ---------------------------------------------------------------------------------------------
# Processors


@dataclass
class KeyframeRecord:
    """What one block's keyframe pass leaves for the propagation pass of the same step.

    outputs: (B, K, N, C) self-attention outputs (after ``to_out``, before any residual) per branch.
    features: (K, N, C) the source branch's attention inputs (branch 0's normalised hidden states).
    """

    outputs: Tensor
    features: Tensor


@dataclass
class TokenFlowState:
    """State shared by the TokenFlow processors of one UNet; the engine (through :class:`TokenFlow`) drives it.

    Attributes:
        blend: the keyframe blend (:func:`blend_weights`).
        pairing: which two keyframes a frame takes: ``"reference"`` (:func:`reference_neighbours`,
            with ``batch_size``) or ``"nearest"`` (:func:`keyframe_neighbours`).
        max_scores: bound on the scores or similarities held at once.
        mode: ``"keyframes"`` (extended attention, record) or ``"propagate"``.
        keyframes: (K,) the step's keyframe indices, on the device.
        frames: (F,) the frame indices of the next UNet call.
        num_frames, num_branches, inject_qk: the next UNet call (see :meth:`begin_chunk`).
        records: block name -> :class:`KeyframeRecord` of the current step.
    """

    blend: str = "sigmoid"
    pairing: str = "reference"
    batch_size: int = 8
    max_scores: int = MAX_SCORES
    mode: str = "propagate"
    keyframes: Tensor | None = None
    frames: Tensor | None = None
    num_frames: int | None = None
    num_branches: int | None = None
    inject_qk: bool = False
    records: dict[str, KeyframeRecord] = field(default_factory=dict)
    _neighbours: tuple[Tensor, ...] | None = None

    def begin_step(self) -> None:
        """Forget the previous step's keyframes and records."""
        self.records.clear()
        self.keyframes = None
        self.mode = "propagate"

    def begin_keyframes(self, keyframes: Tensor) -> None:
        """The next UNet call is the keyframe pass over `keyframes` (K,), ascending."""
        if len(keyframes) == 0 or bool((keyframes[1:] <= keyframes[:-1]).any()):
            raise ValueError("keyframes must be a non-empty ascending sequence of frame indices")
        self.records.clear()
        self.keyframes = keyframes
        self.mode = "keyframes"

    def begin_propagation(self) -> None:
        """The next UNet calls propagate the recorded keyframe outputs."""
        if self.keyframes is None:
            raise RuntimeError("TokenFlow propagation needs a keyframe pass first (begin_keyframes)")
        self.mode = "propagate"

    def set_frames(self, frames: Tensor) -> None:
        """The video frame indices (F,) of the next UNet call."""
        self.frames = frames
        self._neighbours = None

    def begin_chunk(self, num_frames: int, num_branches: int, generator: torch.Generator | None = None,
                    inject_qk: bool = False, latent_hw: tuple[int, int] | None = None) -> None:
        """Declare the next UNet call: ``num_frames`` frames for ``num_branches`` branches (batch branch-major).

        Same signature as :meth:`vidbatch.engine.processors.FrameAttentionState.begin_chunk`; TokenFlow draws
        nothing here (the hooks draw the keyframes), ``latent_hw`` is not needed.
        """
        if num_frames < 1 or num_branches < 1:
            raise ValueError(f"a chunk needs at least one frame and one branch, got {num_frames} and {num_branches}")
        if self.frames is None or len(self.frames) != num_frames:
            raise RuntimeError(f"TokenFlow needs the chunk's frame indices: call set_frames() with {num_frames} frames")
        self.num_frames, self.num_branches, self.inject_qk = num_frames, num_branches, inject_qk

    def neighbours(self) -> tuple[Tensor, ...]:
        """For the current chunk's frames, computed once per chunk (not in every block):
        ``first``, ``second``, ``weight`` (:func:`keyframe_neighbours`), ``search`` (positions of the
        frames that are not keyframes) and ``blended`` (positions of those with two keyframes)."""
        if self._neighbours is None:
            keyframes = self.keyframes
            frames = self.frames.to(keyframes.device)
            if self.pairing == "reference":
                first, second, weight = reference_neighbours(frames, keyframes, self.batch_size, self.blend)
            else:
                first, second, weight = keyframe_neighbours(frames, keyframes, self.blend)
            search = (keyframes[first] != frames).nonzero().flatten()
            blended = (first != second).nonzero().flatten()
            self._neighbours = (first, second, weight, search, blended)
        return self._neighbours


def _heads(attn, t: Tensor) -> Tensor:
    """(b, L, h*d) -> (b, h, L, d)."""
    return t.view(t.shape[0], -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)


class TokenFlowProcessor:
    """Self-attention processor of one ``BasicTransformerBlock.attn1`` for TokenFlow.

    Args:
        state: the :class:`TokenFlowState` shared by the UNet's processors.
        name: the block's module name; keys its record.
        pnp_qk: the block takes PnP's query/key injection (set from
            :func:`vidbatch.engine.controls.pnp.pnp_attention_blocks` at patch time).
    """

    def __init__(self, state: TokenFlowState, name: str, pnp_qk: bool = False) -> None:
        self.state = state
        self.name = name
        self.pnp_qk = pnp_qk

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        st = self.state
        check_self_attention("tokenflow", self.name, attn, hidden_states, encoder_hidden_states, attention_mask)
        check_layout("tokenflow", self.name, hidden_states.shape[0], st.num_frames, st.num_branches)
        if st.mode == "keyframes":
            out = self._keyframes(attn, hidden_states)
        else:
            out = self._propagate(hidden_states)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _keyframes(self, attn, hidden_states: Tensor) -> Tensor:
        """Extended attention across all keyframes for the edit branches, per-frame attention for the
        source branch (branch 0); records the outputs and branch 0's inputs."""
        st = self.state
        branches, frames = st.num_branches, st.num_frames
        x = join_frames(hidden_states, frames)  # (B, K*N, C)
        query, key, value = _heads(attn, attn.to_q(x)), _heads(attn, attn.to_k(x)), _heads(attn, attn.to_v(x))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if st.inject_qk and self.pnp_qk and branches > 1:  # PnP: the source branch's queries and keys
            query, key = broadcast_branch0(query, branches), broadcast_branch0(key, branches)
        n = hidden_states.shape[1]
        out = torch.empty_like(query)  # (B, h, K*N, d)
        # The source branch reconstructs each keyframe alone (stock per-frame attention), as in the
        # reference: only the edit branches attend across keyframes. Its outputs are what the
        # propagation hands to the source branch of the other frames.
        out[:1] = _per_frame_attention(query[:1], key[:1], value[:1], frames, st.max_scores)
        if branches > 1:
            out[1:] = keyframe_attention(query[1:], key[1:], value[1:], st.max_scores)
        out = out.transpose(1, 2).reshape(branches, x.shape[1], -1).to(query.dtype)
        out = split_frames(attn.to_out[1](attn.to_out[0](out)), frames)  # (B*K, N, C)
        # The features are cloned: a view would keep every branch's inputs alive for the whole step.
        st.records[self.name] = KeyframeRecord(outputs=out.view(branches, frames, n, -1).detach(),
                                               features=hidden_states[:frames].detach().clone())
        return out

    def _propagate(self, hidden_states: Tensor) -> Tensor:
        """Each frame's output from its two keyframes' recorded outputs along source-branch correspondences."""
        st = self.state
        record = st.records.get(self.name)
        if record is None:
            raise RuntimeError(f"block {self.name}: no keyframe pass recorded this step; run the keyframe pass "
                               "(begin_keyframes, a UNet call, begin_propagation) before propagating")
        branches, frames = st.num_branches, st.num_frames
        if record.outputs.shape[0] != branches:
            raise RuntimeError(f"block {self.name}: the keyframe pass had {record.outputs.shape[0]} branches, "
                               f"this call has {branches}")
        first, second, weight, search, blended = st.neighbours()
        features = hidden_states[:frames]  # the source branch's attention inputs
        n = features.shape[1]
        # A keyframe takes its own output, token by token: no search (float noise must not pick a twin).
        index_first = torch.arange(n, device=features.device).repeat(frames, 1)
        if len(search):
            index_first[search] = nearest_tokens(features[search], record.features[first[search]], st.max_scores)
        index_second = index_first
        if len(blended):
            index_second = index_first.clone()
            index_second[blended] = nearest_tokens(features[blended], record.features[second[blended]], st.max_scores)
        out = propagate(record.outputs, first, second, weight, index_first, index_second)  # (B, F, N, C)
        return out.reshape(branches * frames, n, -1).to(hidden_states.dtype)


def apply_tokenflow(unet: torch.nn.Module, blend: str = "sigmoid", max_scores: int = MAX_SCORES,
                    pairing: str = "nearest", batch_size: int = 8) -> TokenFlowState:
    """Replace the self-attention processor of every ``BasicTransformerBlock`` with a :class:`TokenFlowProcessor`.

    Re-applying first removes the old patch. Returns the shared :class:`TokenFlowState`.
    """
    if blend not in BLEND_MODES:
        raise ConfigError(f"tokenflow.blend must be one of {', '.join(BLEND_MODES)}, got {blend!r}")
    if pairing not in PAIRINGS:
        raise ConfigError(f"tokenflow.pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    state = TokenFlowState(blend=blend, pairing=pairing, batch_size=batch_size, max_scores=max_scores)
    pnp_blocks = pnp_attention_blocks(unet)
    install_processors(unet, PATCH_OWNER, state,
                       lambda name, block: {"attn1": TokenFlowProcessor(state, name, pnp_qk=name in pnp_blocks)},
                       on_restore=state.records.clear)
    return state


def remove_tokenflow(unet: torch.nn.Module) -> None:
    """Restore the processors :func:`apply_tokenflow` replaced; a no-op when not patched."""
    restore_processors(unet, PATCH_OWNER)


# ---------------------------------------------------------------------------------------------
# Memory


def estimate_keyframe_records_bytes(keyframes: int, latent_hw: tuple[int, int], *, branches: int, channels: int,
                                    dtype_bytes: int) -> int:
    """Bytes TokenFlow's keyframe pass keeps for the propagation pass of the step (all blocks)."""
    tokens = latent_hw[0] * latent_hw[1]
    return RECORD_FACTOR * (branches + 1) * keyframes * tokens * channels * dtype_bytes


def estimate_keyframe_pass_bytes(keyframes: int, latent_hw: tuple[int, int], *, branches: int, channels: int,
                                 heads: int, dtype_bytes: int, materialised_scores: bool) -> int:
    """Peak bytes of TokenFlow's keyframe pass: one UNet call on all `keyframes` frames (it is never chunked).

    The edit branches attend over every keyframe's tokens (``K*N``), in query chunks of at most
    `MAX_SCORES` scores; the source branch attends within each keyframe. The records it leaves for
    the propagation (:func:`estimate_keyframe_records_bytes`) build up during the call.
    """
    tokens = latent_hw[0] * latent_hw[1]
    activations = memory.activation_bytes(keyframes * tokens, branches=branches, channels=channels,
                                          dtype_bytes=dtype_bytes)
    records = estimate_keyframe_records_bytes(keyframes, latent_hw, branches=branches, channels=channels,
                                              dtype_bytes=dtype_bytes)
    scores = 0
    if materialised_scores:
        joint = keyframes * tokens
        edit = (branches - 1) * heads * joint * joint
        source = heads * keyframes * tokens * tokens
        # Scores and their softmax, each bounded by the query chunking.
        scores = 2 * (min(edit, MAX_SCORES) + min(source, MAX_SCORES)) * dtype_bytes
    return int(activations + records + scores)


# ---------------------------------------------------------------------------------------------
# The method


class TokenFlow(Method):
    """TokenFlow in the engine's denoising loop: a keyframe pass before every step's chunks."""

    name = "tokenflow"
    section = "tokenflow"
    settings_type = TokenFlowConfig

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.state: TokenFlowState | None = None
        self.device: torch.device | None = None
        self.generator: torch.Generator | None = None   # the keyframes', seeded at the first step

    def patch(self, editor, prompt: str, source_prompt: str) -> TokenFlowState:
        c = self.config
        if c.batch_size < 1:
            raise ConfigError(f"tokenflow.batch_size must be at least 1, got {c.batch_size}")
        self.device = editor.device
        self.state = apply_tokenflow(editor.unet, c.blend, pairing=c.pairing, batch_size=c.batch_size)
        return self.state

    def unpatch(self, unet) -> None:
        remove_tokenflow(unet)

    def needs_source(self, step: int) -> bool:
        return True  # the correspondences are computed on the source branch's features

    def begin_step(self, step: int, num_frames: int, predict, generator: torch.Generator) -> None:
        if self.generator is None:
            # Keyframes draw from their own generator (seeded once from the engine's), so they do not
            # depend on how many draws the chunk order takes: any chunking gives the same edit.
            self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        keyframes = sample_keyframes(num_frames, self.config.batch_size, self.generator).to(self.device)
        self.state.begin_keyframes(keyframes)
        # The prediction itself is not kept: the propagation pass recomputes every frame, keyframes
        # included (they take their own recorded outputs, so they come out the same).
        predict(keyframes)
        self.state.begin_propagation()

    def begin_chunk(self, frames: Tensor) -> None:
        self.state.set_frames(frames)

    # -- memory profile ----------------------------------------------------------------------------

    def max_branches(self, controls: frozenset[str]) -> int:
        return 3   # the source branch runs in every step

    def keyframes(self, num_frames: int) -> int:
        return -(-num_frames // self.config.batch_size)

    @classmethod
    def chunk_bytes(cls, num_frames: int, latent_hw: tuple[int, int], *, branches: int, channels: int, heads: int,
                    dtype_bytes: int, materialised_scores: bool, share: float = 1.0, keyframes: int = 0) -> int:
        """The peak of a step: the propagation of the chunk (no attention scores; a bounded similarity
        search) while the keyframe pass's records are held, or the keyframe pass itself, whichever is
        larger; the chunk size only changes the first. `keyframes`: ``ceil(T / tokenflow.batch_size)``."""
        if keyframes < 1:
            raise ValueError("the tokenflow estimate needs the number of keyframes (ceil(frames / batch_size))")
        tokens = latent_hw[0] * latent_hw[1]
        propagation = (memory.activation_bytes(num_frames * tokens, branches=branches, channels=channels,
                                               dtype_bytes=dtype_bytes)
                       + estimate_keyframe_records_bytes(keyframes, latent_hw, branches=branches, channels=channels,
                                                         dtype_bytes=dtype_bytes)
                       + 4 * MAX_SCORES)   # float32 similarities of the correspondence search
        keyframe_pass = estimate_keyframe_pass_bytes(keyframes, latent_hw, branches=branches, channels=channels,
                                                     heads=heads, dtype_bytes=dtype_bytes,
                                                     materialised_scores=materialised_scores)
        return int(max(propagation, keyframe_pass))

    def check_budget(self, num_frames: int, latent_hw: tuple[int, int], budget_bytes: int, *, branches: int,
                     channels: int, heads: int, dtype_bytes: int, materialised_scores: bool) -> None:
        # The keyframe pass is one UNet call whatever the chunk: say so when it alone will not fit.
        keyframes = self.keyframes(num_frames)
        needed = estimate_keyframe_pass_bytes(keyframes, latent_hw, branches=branches, channels=channels, heads=heads,
                                              dtype_bytes=dtype_bytes, materialised_scores=materialised_scores)
        if needed > memory.BUDGET_SHARE * budget_bytes:
            log.warning("tokenflow: the keyframe pass (%d keyframes of %d frames in one UNet call) is estimated "
                        "at %.2f GB, over the %.2f GB budget; raise tokenflow.batch_size (fewer keyframes)",
                        keyframes, num_frames, needed / 1e9, memory.BUDGET_SHARE * budget_bytes / 1e9)
