"""VidToMe token merging: bipartite soft matching, merge and unmerge as pure torch functions.

Every matching is described by a :class:`Merge`, two index tensors over one token layout:

- ``keep``: the positions of the tokens that survive, in ascending order;
- ``back``: for every position of the layout, the row of the merged tensor it takes its value from
  when un-merging.

Because a matching is only indices, one matching computed on the normalised block input applies to
any tensor with the same token layout (the q/k/v inputs, the attention output) and to every guidance
branch. Several matchings compose into one (the recursive local levels collapse into a single
``Merge``), so ``merge`` and ``unmerge`` are each one ``gather`` however many levels ran.

Merging is "replace" mode by default, as in VidToMe: a merged source token is dropped and its
destination kept as it is; on unmerge the source position takes its destination's value.

Shapes: ``B`` batch (guidance branches of one chunk), ``F`` frames of the chunk, ``N`` tokens of one
frame, ``T = F * N`` tokens of the chunk, ``C`` channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "MERGE_MODES",
    "Merge",
    "bipartite_match",
    "global_merge",
    "local_merge",
    "join_frames",
    "split_frames",
]

MERGE_MODES = ("replace", "mean")

# Upper bound on the number of similarity scores held at once (per batch element). The full
# score matrix of SD 1.5's first level with a chunk of 4 frames is 12288 x 4096 = 50M entries;
# computing it in row blocks keeps the peak memory of the matching small.
_MAX_SCORES = 1 << 24


@dataclass(frozen=True)
class Merge:
    """What one matching did; applies to any tensor with the same token layout.

    Attributes:
        keep: ``(Bm, K)`` int64, the positions kept, ascending in every row.
        back: ``(Bm, T)`` int64, for every position the row of the merged tensor it takes its value
            from. ``Bm`` is 1 when the matching is shared by the whole batch (``align_batch``),
            else the batch size.
    """

    keep: Tensor
    back: Tensor

    @property
    def num_tokens(self) -> int:
        """``T``, the number of tokens before merging."""
        return self.back.shape[1]

    @property
    def num_kept(self) -> int:
        """``K``, the number of tokens after merging."""
        return self.keep.shape[1]

    @property
    def is_identity(self) -> bool:
        """True when nothing was merged: ``merge`` and ``unmerge`` return their input."""
        return self.num_kept == self.num_tokens

    @staticmethod
    def identity(num_tokens: int, device: torch.device | str | None = None) -> Merge:
        """The matching that merges nothing over ``num_tokens`` tokens."""
        idx = torch.arange(num_tokens, device=device, dtype=torch.int64)[None]
        return Merge(keep=idx, back=idx)

    def merge(self, x: Tensor, mode: str = "replace") -> Tensor:
        """Merge tokens: ``(B, T, C) -> (B, K, C)``.

        ``mode="replace"`` keeps every surviving token as it is (VidToMe). ``mode="mean"`` makes each
        surviving token the mean of all the tokens of the layout that un-merge to it (itself
        included), tomesd-style but size-weighted over the original tokens.
        """
        self._check(x, self.num_tokens)
        if self.is_identity:
            return x
        b, _, c = x.shape
        if mode == "replace":
            return x.gather(1, self.keep[..., None].expand(b, -1, c))
        if mode == "mean":
            idx = self.back[..., None].expand(b, -1, c)
            total = x.new_zeros(b, self.num_kept, c).scatter_add_(1, idx, x)
            count = torch.zeros(self.back.shape[0], self.num_kept, device=x.device, dtype=x.dtype)
            count.scatter_add_(1, self.back, torch.ones_like(self.back, dtype=x.dtype))
            return total / count[..., None]
        raise ValueError(f"unknown merge mode {mode!r}; expected one of {MERGE_MODES}")

    def unmerge(self, x: Tensor) -> Tensor:
        """Un-merge tokens: ``(B, K, C) -> (B, T, C)``; a merged position takes its destination's value."""
        self._check(x, self.num_kept)
        if self.is_identity:
            return x
        b, _, c = x.shape
        return x.gather(1, self.back[..., None].expand(b, -1, c))

    def _check(self, x: Tensor, tokens: int) -> None:
        if x.ndim != 3 or x.shape[1] != tokens:
            raise ValueError(f"expected tokens of shape (B, {tokens}, C), got {tuple(x.shape)}")
        if self.back.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"this matching was computed per batch element for a batch of {self.back.shape[0]}, "
                f"it cannot be applied to a batch of {x.shape[0]}"
            )


def join_frames(x: Tensor, num_frames: int) -> Tensor:
    """Join the frames of every batch element: ``(B*F, N, C) -> (B, F*N, C)`` (batch-major input)."""
    bf, n, c = x.shape
    if bf % num_frames:
        raise ValueError(f"a batch of {bf} is not a whole number of chunks of {num_frames} frames")
    return x.reshape(bf // num_frames, num_frames * n, c)


def split_frames(x: Tensor, num_frames: int) -> Tensor:
    """Inverse of :func:`join_frames`: ``(B, F*N, C) -> (B*F, N, C)``."""
    b, t, c = x.shape
    if t % num_frames:
        raise ValueError(f"{t} tokens are not a whole number of tokens for each of {num_frames} frames")
    return x.reshape(b * num_frames, t // num_frames, c)


def bipartite_match(src: Tensor, dst: Tensor, r: int, align_batch: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Pick the ``r`` source tokens most similar to a destination token, and that destination.

    Similarity is the cosine of the token vectors. Each source token's score is its best cosine
    over the destination set; the ``r`` sources with the highest scores are merged into their best
    destination (ties keep the lower index: a stable sort).

    With ``align_batch`` one matching serves the whole batch: the scores of all batch elements are
    concatenated along the destination axis (as VidToMe does), i.e. a source's score is its best
    cosine over every destination of every batch element, and its destination is the one achieving
    it. All guidance branches then merge the same positions, which keeps them position-aligned for
    PnP's query/key injection.

    Args:
        src: ``(B, S, C)`` source tokens.
        dst: ``(B, D, C)`` destination tokens.
        r: how many sources to merge, ``0 <= r <= S``.
        align_batch: share one matching across the batch.

    Returns:
        ``(src_idx, dst_idx, unm_idx)``: ``(Bm, r)`` the merged sources (indices into ``src``),
        ``(Bm, r)`` their destinations (indices into ``dst``), ``(Bm, S - r)`` the sources left
        unmerged; ``Bm`` is 1 with ``align_batch``, else ``B``. All int64 on ``src``'s device.
    """
    b, s, _ = src.shape
    d = dst.shape[1]
    if not 0 <= r <= s:
        raise ValueError(f"cannot merge r={r} of {s} source tokens")
    if r > 0 and d == 0:
        raise ValueError("cannot merge into an empty destination set")
    bm = 1 if align_batch else b
    if r == 0:
        # Nothing to merge: skip the similarity computation entirely.
        empty = torch.empty(bm, 0, dtype=torch.int64, device=src.device)
        return empty, empty, torch.arange(s, device=src.device).expand(bm, s).contiguous()

    with torch.no_grad():
        a = torch.nn.functional.normalize(src, dim=-1)
        bt = torch.nn.functional.normalize(dst, dim=-1).transpose(1, 2)
        best = torch.full((b, s), -math.inf, device=src.device, dtype=a.dtype)
        best_idx = torch.zeros(b, s, device=src.device, dtype=torch.int64)
        rows = max(1, _MAX_SCORES // max(d, 1))
        for start in range(0, s, rows):
            stop = min(s, start + rows)
            val, idx = (a[:, start:stop] @ bt).max(dim=-1)  # (B, rows)
            best[:, start:stop], best_idx[:, start:stop] = val, idx
        if align_batch:
            # Max over the concatenation along the destination axis: the first batch element
            # wins ties, as torch.max over the concatenated scores would.
            branch = best.argmax(dim=0, keepdim=True)  # (1, S)
            best = best.gather(0, branch)
            best_idx = best_idx.gather(0, branch)
        order = torch.argsort(best, dim=-1, descending=True, stable=True)
        src_idx = order[:, :r]
        unm_idx = order[:, r:]
        dst_idx = best_idx.gather(1, src_idx)
    return src_idx, dst_idx, unm_idx


def _merge_from_representatives(alive: Tensor, rep: Tensor) -> Merge:
    """Build a :class:`Merge` from a kept mask and a representative map in position space.

    Args:
        alive: ``(Bm, T)`` bool, the kept positions; every row holds the same number of them.
        rep: ``(Bm, T)`` int64, for every position the kept position whose value it takes.
    """
    bm, t = alive.shape
    keep = alive.nonzero()[:, 1].reshape(bm, -1)  # row-major, so ascending within each row
    row_of = torch.zeros(bm, t, dtype=torch.int64, device=alive.device)
    row_of.scatter_(1, keep, torch.arange(keep.shape[1], device=alive.device).expand_as(keep).contiguous())
    return Merge(keep=keep, back=row_of.gather(1, rep))


def _check_ratio(name: str, ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {ratio}")


def local_merge(
    x: Tensor,
    num_frames: int,
    ratio: float,
    stride: int = 4,
    generator: torch.Generator | None = None,
    align_batch: bool = True,
) -> Merge:
    """VidToMe local merging of the frames of one chunk into (about) one frame's worth of tokens.

    Level by level, while more than one frame is left: among the current frames, the destination
    frames are one frame in every ``s = min(stride, frames left)``, at the offset
    ``torch.randint(0, s, generator=generator)``; the destination set is their tokens plus the
    tokens left unmerged at previous levels; the source set is the tokens of the other frames;
    ``r = int(n_src * ratio)`` sources are merged (:func:`bipartite_match`), the unmerged ones are
    carried to the next level's destination set, and the destination frames become the next
    level's frames. Tokens are tracked by position, so any frame count works (the reference
    implementation misaligns tokens from three levels on, i.e. 17+ frames at stride 4).

    One random number is drawn per level, on ``generator``'s device; none when ``ratio == 0`` or
    ``num_frames == 1`` (then the result is the identity).

    Args:
        x: ``(B, F*N, C)`` the metric (the normalised block input), frames joined.
        num_frames: ``F``.
        ratio: fraction of the source tokens merged at every level, in ``[0, 1]``.
        stride: one destination frame in every ``stride`` frames, ``>= 2``.
        generator: the random source for the destination frames (required when merging).
        align_batch: one matching for the whole batch (see :func:`bipartite_match`).

    Returns:
        A :class:`Merge` over the ``F*N`` tokens of the chunk.
    """
    b, t, _ = x.shape
    _check_ratio("local merge ratio", ratio)
    if num_frames < 1 or t % num_frames:
        raise ValueError(f"{t} tokens cannot be split into {num_frames} frames")
    if stride < 2:
        raise ValueError(f"target stride must be at least 2 (one destination frame in every stride frames), got {stride}")
    if ratio == 0 or num_frames == 1:
        return Merge.identity(t, x.device)
    if generator is None:
        raise ValueError("local_merge needs a torch.Generator to choose destination frames")

    n = t // num_frames
    dev = x.device
    bm = 1 if align_batch else b
    frame_offsets = torch.arange(n, device=dev)
    frames = list(range(num_frames))  # the frames still whole at this level (frame ids)
    carry = torch.empty(bm, 0, dtype=torch.int64, device=dev)  # positions left unmerged so far
    alive = torch.ones(bm, t, dtype=torch.bool, device=dev)
    rep = torch.arange(t, device=dev).expand(bm, t).contiguous()  # position -> kept position

    while len(frames) > 1:
        s = min(stride, len(frames))
        offset = int(torch.randint(0, s, (1,), generator=generator, device=generator.device).item())
        dst_frames = [f for i, f in enumerate(frames) if i % s == offset]
        src_frames = [f for i, f in enumerate(frames) if i % s != offset]
        src_pos = (torch.tensor(src_frames, device=dev)[:, None] * n + frame_offsets).reshape(-1)  # (S,)
        dst_frame_pos = (torch.tensor(dst_frames, device=dev)[:, None] * n + frame_offsets).reshape(-1)
        dst_pos = torch.cat([dst_frame_pos.expand(bm, -1), carry], dim=1)  # (Bm, D)

        r = int(src_pos.numel() * ratio)
        src_tokens = x[:, src_pos]
        dst_tokens = x.gather(1, dst_pos[..., None].expand(b, -1, x.shape[-1]))
        src_sel, dst_sel, unm_sel = bipartite_match(src_tokens, dst_tokens, r, align_batch)

        merged = src_pos[src_sel]  # (Bm, r) positions merged away at this level
        target = dst_pos.gather(1, dst_sel)  # (Bm, r) the kept positions they merge into
        alive.scatter_(1, merged, False)
        # Every position currently represented by a merged token now follows its destination.
        level_rep = torch.arange(t, device=dev).expand(bm, t).contiguous()
        level_rep.scatter_(1, merged, target)
        rep = level_rep.gather(1, rep)

        carry = torch.cat([carry, src_pos[unm_sel]], dim=1)
        frames = dst_frames

    return _merge_from_representatives(alive, rep)


def global_merge(
    x: Tensor,
    global_tokens: Tensor | None,
    ratio: float,
    rand: float = 0.5,
    generator: torch.Generator | None = None,
    align_batch: bool = True,
) -> Merge:
    """VidToMe global merging of a chunk's locally merged tokens with the block's global token set.

    The returned matching is over the concatenation ``[x | global_tokens]``. With probability
    ``rand`` (one ``torch.rand`` draw on ``generator``) the global tokens are the source side and
    the chunk's tokens the destination side, otherwise the other way round; ``r = int(n_src *
    ratio)`` sources are merged (:func:`bipartite_match`). With ``ratio == 0`` nothing is merged
    and the result is the identity over the concatenation (the chunk attends over its tokens and
    all global tokens). Without a global set (``None`` or empty) the result is the identity over
    ``x`` and nothing is drawn.

    Args:
        x: ``(B, L, C)`` the chunk's tokens after local merging.
        global_tokens: ``(B, G, C)`` the block's global token set, or ``None``.
        ratio: fraction of the source side merged, in ``[0, 1]``.
        rand: probability that the global set is the source side, in ``[0, 1]``.
        generator: random source for the side choice (required when a global set is given).
        align_batch: one matching for the whole batch (see :func:`bipartite_match`).

    Returns:
        A :class:`Merge` over the ``L + G`` tokens of ``torch.cat([x, global_tokens], dim=1)``.
    """
    _check_ratio("global merge ratio", ratio)
    _check_ratio("global_rand", rand)
    b, l, c = x.shape
    if global_tokens is None or global_tokens.shape[1] == 0:
        return Merge.identity(l, x.device)
    if global_tokens.ndim != 3 or global_tokens.shape[0] != b or global_tokens.shape[2] != c:
        raise ValueError(f"global tokens of shape {tuple(global_tokens.shape)} do not match tokens of shape {tuple(x.shape)}")
    if generator is None:
        raise ValueError("global_merge needs a torch.Generator to choose the merging side")
    g = global_tokens.shape[1]
    dev = x.device
    global_is_src = bool(torch.rand(1, generator=generator, device=generator.device).item() < rand)
    if ratio == 0:
        return Merge.identity(l + g, dev)

    bm = 1 if align_batch else b
    local_pos = torch.arange(l, device=dev)
    glob_pos = torch.arange(l, l + g, device=dev)
    src_pos, dst_pos = (glob_pos, local_pos) if global_is_src else (local_pos, glob_pos)
    src_tokens, dst_tokens = (global_tokens, x) if global_is_src else (x, global_tokens)
    r = int(src_pos.numel() * ratio)
    src_sel, dst_sel, _ = bipartite_match(src_tokens, dst_tokens.to(src_tokens.dtype), r, align_batch)

    alive = torch.ones(bm, l + g, dtype=torch.bool, device=dev)
    merged = src_pos[src_sel]
    alive.scatter_(1, merged, False)
    rep = torch.arange(l + g, device=dev).expand(bm, -1).contiguous()
    rep.scatter_(1, merged, dst_pos[dst_sel])
    return _merge_from_representatives(alive, rep)
