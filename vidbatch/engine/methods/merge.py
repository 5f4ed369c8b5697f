"""VidToMe token merging: bipartite soft matching, merge and unmerge as pure torch functions.

Every matching is described by a :class:`Merge`, two index tensors over one token layout:

- ``keep``: the positions of the tokens that survive, in ascending order;
- ``back``: for every position of the layout, the row of the merged tensor it takes its value from
  when un-merging.

Because a matching is only indices, one matching computed on the normalised block input applies to
any tensor with the same token layout (the q/k/v inputs, the attention output) and to every guidance
branch. Several matchings compose into one (the recursive local levels collapse into a single
``Merge``), so ``merge`` and ``unmerge`` are each one row copy (:func:`take_tokens`) however many levels ran.

Merging is "replace" mode by default, as in VidToMe: a merged source token is dropped and its
destination kept as it is; on unmerge the source position takes its destination's value.

Randomness (which frames are destinations, which side of the global matching is the source) comes
from draws made once per UNet call (:func:`draw_local_offsets`, :func:`draw_global_side`) and
passed to every merged block, as in the reference, where every block's generator is a copy of the
same state: all blocks of one call then choose the same destination frames and the same side.

Shapes: ``B`` batch (guidance branches of one chunk), ``F`` frames of the chunk, ``N`` tokens of one
frame, ``T = F * N`` tokens of the chunk, ``C`` channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "MERGE_MODES",
    "Merge",
    "bipartite_match",
    "draw_global_side",
    "draw_local_offsets",
    "global_merge",
    "local_merge",
    "join_frames",
    "size_bias",
    "split_frames",
    "take_tokens",
]

MERGE_MODES = ("replace", "mean")

# Upper bound on the number of similarity scores held at once (per batch element) on a GPU. The full
# score matrix of SD 1.5's first level with a chunk of 4 frames is 12288 x 4096 = 50M entries;
# computing it in row blocks keeps the peak memory of the matching small.
_MAX_SCORES = 1 << 24
# On a CPU the scores of a block (all batch elements) are kept to about 2 MB of float32, so that the
# reduction that follows the matrix product reads them from the cache instead of memory: at the tiny
# model's 256 px (3 branches, 3072 x 1024 scores of 32 channels) the product and its max are bound by
# memory traffic, and blocking makes them about 2x faster. A block has at least as many rows as the
# tokens have channels, so that packing the destination matrix for every block stays a small share
# of the product (SD 1.5: 320 channels).
_CPU_BLOCK_SCORES = 1 << 19
_CPU_MIN_ROWS = 32
# The first maximum of a row of at least this many scores is found group by group on a CPU (`_first_max`).
_GROUPED_MAX_WIDTH = 512
_MAX_GROUP = 32


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
            return take_tokens(x, self.keep)
        if mode == "mean":
            idx = self.back[..., None].expand(b, -1, c)
            total = x.new_zeros(b, self.num_kept, c).scatter_add_(1, idx, x)
            count = torch.zeros(self.back.shape[0], self.num_kept, device=x.device, dtype=x.dtype)
            count.scatter_add_(1, self.back, torch.ones_like(self.back, dtype=x.dtype))
            return total / count[..., None]
        raise ValueError(f"unknown merge mode {mode!r}; expected one of {MERGE_MODES}")

    def sizes(self, base: Tensor | None = None) -> Tensor:
        """How many original tokens every kept token stands for: ``(Bm', T) -> (Bm, K)``.

        The size of a kept token is the sum of ``base`` over the positions that un-merge to it;
        ``base`` defaults to one per position (so the result is the size of each merge group).
        Passing the sizes of a previous matching's kept tokens composes sizes through levels.

        Args:
            base: ``(1 or Bm, T)`` float sizes of the positions, or ``None`` for ones.

        Returns:
            ``(Bm'', K)`` float32 (``base``'s dtype when given), ``Bm''`` the larger batch of the two.
        """
        dtype = torch.float32 if base is None else base.dtype
        if base is None:
            base = torch.ones(1, self.num_tokens, device=self.back.device, dtype=dtype)
        if base.ndim != 2 or base.shape[1] != self.num_tokens:
            raise ValueError(f"expected sizes of shape (Bm, {self.num_tokens}), got {tuple(base.shape)}")
        bm = max(base.shape[0], self.back.shape[0])
        out = torch.zeros(bm, self.num_kept, device=base.device, dtype=dtype)
        return out.scatter_add_(1, self.back.expand(bm, -1), base.expand(bm, -1))

    def unmerge(self, x: Tensor) -> Tensor:
        """Un-merge tokens: ``(B, K, C) -> (B, T, C)``; a merged position takes its destination's value."""
        self._check(x, self.num_kept)
        if self.is_identity:
            return x
        return take_tokens(x, self.back)

    def unmerge_first(self, x: Tensor, count: int) -> Tensor:
        """``unmerge(x)[:, :count]`` without un-merging the other positions: ``(B, K, C) -> (B, count, C)``."""
        self._check(x, self.num_kept)
        return take_tokens(x, self.back[:, :count])

    def then_unmerge(self, inner: Merge) -> Tensor:
        """The un-merge indices of ``inner.unmerge(self.unmerge(x)[:, :inner.num_kept])`` as one: ``(Bm, T)``.

        ``self`` is a matching over ``inner``'s kept tokens followed by other tokens (VidToMe's global
        matching over ``[local tokens | global set]``); one copy with these indices un-merges both.
        """
        through = self.back[:, : inner.num_kept]
        bm = max(through.shape[0], inner.back.shape[0])
        return through.expand(bm, -1).gather(1, inner.back.expand(bm, -1))

    def _check(self, x: Tensor, tokens: int) -> None:
        if x.ndim != 3 or x.shape[1] != tokens:
            raise ValueError(f"expected tokens of shape (B, {tokens}, C), got {tuple(x.shape)}")
        if self.back.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"this matching was computed per batch element for a batch of {self.back.shape[0]}, "
                f"it cannot be applied to a batch of {x.shape[0]}"
            )


def take_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, k]]`` for every batch element ``b`` and ``k``: ``(B, T, C), (1 or B, K) -> (B, K, C)``.

    A row ``(1, K)`` of indices serves the whole batch (a matching shared by the guidance branches). The
    tokens are copied as whole rows of ``C`` channels (``index_select``), which on a CPU is 5-20x faster
    than ``gather`` with the index expanded over the channels, for the same values.
    """
    if index.ndim != 2 or index.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"expected indices of shape (1 or {x.shape[0]}, K), got {tuple(index.shape)}")
    if index.shape[0] == 1:
        return x.index_select(1, index[0])
    b, t, c = x.shape
    rows = index + torch.arange(b, device=index.device)[:, None] * t  # (B, K) rows of the (B*T, C) view
    return x.reshape(b * t, c).index_select(0, rows.reshape(-1)).view(b, -1, c)


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


def size_bias(sizes: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """ToMe's proportional attention: the additive attention bias ``log(size)`` of every key.

    Adding ``log(s_j)`` to the logits of key ``j`` weighs it as ``s_j`` copies of itself, so attention
    over a merged set whose tokens are identical to the ones they stand for equals attention over
    the unmerged set (Bolya et al., "Token Merging", proportional attention).

    Args:
        sizes: ``(Bm, K)`` positive sizes of the keys (:meth:`Merge.sizes`).
        dtype: of the bias (the attention's dtype), default ``sizes``'.

    Returns:
        ``(Bm, 1, 1, K)``: a float mask for ``scaled_dot_product_attention``, broadcast over heads and
        queries (``Bm`` is 1 or the attention batch).
    """
    bias = sizes.log()[:, None, None, :]
    return bias if dtype is None else bias.to(dtype)


def draw_local_offsets(num_frames: int, stride: int, generator: torch.Generator) -> list[Tensor | int]:
    """The destination-frame draws of local merging of one chunk: one per recursion level.

    Level by level while more than one frame is left: ``s = min(stride, frames left)`` and one
    ``torch.randint(0, s, (1,))`` on ``generator``'s device (the reference's draw, in its order). The
    draw stays on the device when the level's destination count does not depend on it (the frames
    left are a multiple of ``s``: always at ``num_frames <= stride`` and for powers of the stride);
    otherwise it is read to the host (an ``int``) because the next level's size depends on it.

    Args:
        num_frames: ``F``, frames of the chunk.
        stride: ``>= 2``.
        generator: the merge generator.

    Returns:
        One ``(1,)`` int64 tensor (on ``generator``'s device) or ``int`` per level; empty for one frame.
    """
    if stride < 2:
        raise ValueError(f"target stride must be at least 2 (one destination frame in every stride frames), got {stride}")
    offsets: list[Tensor | int] = []
    frames = num_frames
    while frames > 1:
        s = min(stride, frames)
        offset = torch.randint(0, s, (1,), generator=generator, device=generator.device)
        if frames % s == 0:
            offsets.append(offset)
            frames //= s
        else:
            value = int(offset.item())  # the next level's frame count depends on it
            offsets.append(value)
            frames = len(range(value, frames, s))
    return offsets


def draw_global_side(rand: float, generator: torch.Generator) -> bool:
    """The global-merging side of one UNet call: ``True`` when the global set is the source side.

    One ``torch.rand(1)`` on ``generator``'s device, true with probability ``rand`` (the reference's
    draw, made only when a global set exists). Read to the host: the two sides have different
    sizes, so the shapes of the matching depend on it.
    """
    _check_ratio("global_rand", rand)
    return bool(torch.rand(1, generator=generator, device=generator.device).item() < rand)


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
        best, best_idx = _best_destinations(a, bt)
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


def _score_rows(batch: int, sources: int, destinations: int, channels: int, device: torch.device) -> int:
    """Rows of the score blocks of :func:`_best_destinations` (see ``_CPU_BLOCK_SCORES``)."""
    if device.type == "cpu":
        most = max(_CPU_MIN_ROWS, channels, _CPU_BLOCK_SCORES // max(batch * destinations, 1))
    else:
        most = max(1, _MAX_SCORES // max(destinations, 1))
    blocks = -(-sources // most)
    return -(-sources // blocks)  # blocks of equal size: the last one overlaps the one before by less than `blocks` rows


def _best_destinations(a: Tensor, bt: Tensor) -> tuple[Tensor, Tensor]:
    """Every source's best score and the first destination achieving it: ``(B, S, C), (B, C, D) -> (B, S), (B, S)``.

    The scores ``a @ bt`` are computed in blocks of rows, every block of the same number of rows: the
    last block is moved back to end at the last row rather than cut short (a few rows are computed
    twice). A score then comes from a product of the same shape whatever the number of sources, and
    equals the one a single product would give: a matrix product's entries may round differently
    when it has very few rows (CPU BLAS: 3 or fewer), never by which rows it holds.

    Args:
        a: ``(B, S, C)`` normalised sources.
        bt: ``(B, C, D)`` normalised destinations, transposed.

    Returns:
        ``(best, best_idx)``: ``(B, S)`` in ``a``'s dtype, ``(B, S)`` int64.
    """
    b, s, c = a.shape
    d = bt.shape[-1]
    rows = _score_rows(b, s, d, c, a.device)
    best = torch.empty(b, s, device=a.device, dtype=a.dtype)
    best_idx = torch.empty(b, s, device=a.device, dtype=torch.int64)
    scores = torch.empty(b, rows, d, device=a.device, dtype=a.dtype)  # one buffer for every block
    for start in range(0, s, rows):
        start = min(start, s - rows)
        torch.bmm(a[:, start:start + rows], bt, out=scores)
        best[:, start:start + rows], best_idx[:, start:start + rows] = _first_max(scores)
    return best, best_idx


def _first_max(scores: Tensor) -> tuple[Tensor, Tensor]:
    """``scores.max(dim=-1)``: the max of every row and the first index holding it (NaN counts as the max).

    On a CPU, torch's max with indices along the last dimension is a scalar loop, about ten times slower
    than the vectorised max without indices. There a row of at least ``_GROUPED_MAX_WIDTH`` entries is
    cut into groups of ``_MAX_GROUP``: the vectorised max of every group, the first group holding the
    row's max (a max with indices over 32x fewer entries), then the first position of that group
    holding it (the tiny model at 256 px: 8% less time for the whole vidtome edit; shorter rows gain
    nothing). Values and indices are exactly ``scores.max(dim=-1)``'s (no arithmetic, the same ties),
    which ``tests/test_merge.py`` checks.

    Args:
        scores: ``(..., D)``.

    Returns:
        ``(values, indices)``: ``(...)`` of ``scores``' dtype, ``(...)`` int64.
    """
    d = scores.shape[-1]
    whole = d - d % _MAX_GROUP
    if scores.device.type != "cpu" or d < _GROUPED_MAX_WIDTH:
        return scores.max(dim=-1)
    groups = scores[..., :whole].unflatten(-1, (whole // _MAX_GROUP, _MAX_GROUP))  # (..., D // G, G), a view
    best, group = groups.amax(dim=-1).max(dim=-1)  # amax propagates NaN, as max does
    members = groups.gather(-2, group[..., None, None].expand(*group.shape, 1, _MAX_GROUP)).squeeze(-2)
    hit = (members == best[..., None]) | members.isnan()  # (..., G): where the max is (NaN: the first NaN)
    # The first hit: the largest of the reversed positions G, G-1, ..., 1 among the hits.
    reversed_pos = torch.arange(_MAX_GROUP, 0, -1, device=scores.device, dtype=torch.int32)
    index = group * _MAX_GROUP + (_MAX_GROUP - (hit * reversed_pos).amax(dim=-1))
    if whole < d:
        # The columns after the last whole group win only with a strictly larger value (a NaN beats a number).
        tail, tail_index = scores[..., whole:].max(dim=-1)
        later = (tail > best) | (tail.isnan() & ~best.isnan())
        best = torch.where(later, tail, best)
        index = torch.where(later, tail_index + whole, index)
    return best, index


def _merge_from_representatives(alive: Tensor, rep: Tensor, kept: int) -> Merge:
    """Build a :class:`Merge` from a kept mask and a representative map in position space.

    Args:
        alive: ``(Bm, T)`` bool, the kept positions; every row holds `kept` of them.
        rep: ``(Bm, T)`` int64, for every position the kept position whose value it takes.
        kept: how many positions each row keeps (known from the matching sizes, so no host read).
    """
    bm, t = alive.shape
    # The kept positions in ascending order: a stable sort puts the alive (0) entries first, in order.
    # Not `nonzero`, whose output size depends on the data: on a GPU it makes the host wait.
    keep = torch.sort((~alive).to(torch.uint8), dim=1, stable=True).indices[:, :kept]
    row_of = torch.zeros(bm, t, dtype=torch.int64, device=alive.device)
    row_of.scatter_(1, keep, torch.arange(keep.shape[1], device=alive.device).expand_as(keep).contiguous())
    return Merge(keep=keep, back=row_of.gather(1, rep))


def _check_ratio(name: str, ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {ratio}")


def _split_level(frames: Tensor, s: int, offset: Tensor | int) -> tuple[Tensor, Tensor]:
    """Destination and source frames of one local level, both in ascending frame order.

    Args:
        frames: ``(n,)`` int64 frame ids still whole at this level, ascending.
        s: one destination in every ``s`` frames.
        offset: the destination index inside every group of ``s``, ``0 <= offset < s``; a ``(1,)``
            tensor is used as is (no host read) when ``n`` is a multiple of ``s``.

    Returns:
        ``(dst_frames, src_frames)``: the frames at indices ``i % s == offset`` and the others.
    """
    n = frames.numel()
    if n % s == 0:
        # Fixed sizes whatever the draw: index on the device, no host read.
        groups = frames.view(n // s, s)
        off = torch.as_tensor(offset, device=frames.device).reshape(1)
        cols = torch.arange(s - 1, device=frames.device)
        cols = cols + (cols >= off).to(cols.dtype)  # every column but the destination, ascending
        return groups.index_select(1, off).reshape(-1), groups.index_select(1, cols).reshape(-1)
    offset = int(offset)  # the destination count depends on it (a host read unless already an int)
    is_dst = torch.arange(n, device=frames.device) % s == offset
    return frames[is_dst], frames[~is_dst]


def local_merge(
    x: Tensor,
    num_frames: int,
    ratio: float,
    stride: int = 4,
    generator: torch.Generator | None = None,
    align_batch: bool = True,
    offsets: Sequence[Tensor | int] | None = None,
) -> Merge:
    """VidToMe local merging of the frames of one chunk into (about) one frame's worth of tokens.

    Level by level, while more than one frame is left: among the current frames, the destination
    frames are one frame in every ``s = min(stride, frames left)``, at the level's offset; the
    destination set is their tokens plus the tokens left unmerged at previous levels; the source set
    is the tokens of the other frames; ``r = int(n_src * ratio)`` sources are merged
    (:func:`bipartite_match`), the unmerged ones are carried to the next level's destination set,
    and the destination frames become the next level's frames. Tokens are tracked by position, so
    any frame count works (the reference implementation misaligns tokens from three levels on, i.e.
    17+ frames at stride 4).

    The offsets are the draws of :func:`draw_local_offsets`: the attention processors pass the ones
    drawn once for the UNet call, so every block picks the same destination frames. Without
    ``offsets`` they are drawn here from ``generator``. Nothing is drawn (and the result is the
    identity) when ``ratio == 0`` or ``num_frames == 1``.

    Args:
        x: ``(B, F*N, C)`` the metric (the normalised block input), frames joined.
        num_frames: ``F``.
        ratio: fraction of the source tokens merged at every level, in ``[0, 1]``.
        stride: one destination frame in every ``stride`` frames, ``>= 2``.
        generator: the random source of the destination frames when ``offsets`` is not given.
        align_batch: one matching for the whole batch (see :func:`bipartite_match`).
        offsets: one destination offset per level, ``(1,)`` int64 tensors or ints.

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
    if offsets is None:
        if generator is None:
            raise ValueError("local_merge needs a torch.Generator (or drawn offsets) to choose destination frames")
        offsets = draw_local_offsets(num_frames, stride, generator)

    n = t // num_frames
    dev = x.device
    bm = 1 if align_batch else b
    frame_offsets = torch.arange(n, device=dev)
    frames = torch.arange(num_frames, device=dev)  # the frames still whole at this level (frame ids)
    carry = torch.empty(bm, 0, dtype=torch.int64, device=dev)  # positions left unmerged so far
    alive = torch.ones(bm, t, dtype=torch.bool, device=dev)
    rep = torch.arange(t, device=dev).expand(bm, t).contiguous()  # position -> kept position

    level = 0
    merged_count = 0
    while frames.numel() > 1:
        if level >= len(offsets):
            raise ValueError(f"{len(offsets)} destination offsets for {num_frames} frames at stride {stride}: too few")
        s = min(stride, frames.numel())
        offset = offsets[level]
        if isinstance(offset, Tensor):
            offset = offset.to(dev)
        dst_frames, src_frames = _split_level(frames, s, offset)
        src_pos = (src_frames[:, None] * n + frame_offsets).reshape(-1)  # (S,)
        dst_frame_pos = (dst_frames[:, None] * n + frame_offsets).reshape(-1)
        dst_pos = torch.cat([dst_frame_pos.expand(bm, -1), carry], dim=1)  # (Bm, D)

        r = int(src_pos.numel() * ratio)
        merged_count += r
        src_tokens = x.index_select(1, src_pos)
        dst_tokens = take_tokens(x, dst_pos)
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
        level += 1
    if level != len(offsets):
        raise ValueError(f"{len(offsets)} destination offsets for {num_frames} frames at stride {stride}: too many")

    return _merge_from_representatives(alive, rep, t - merged_count)


def global_merge(
    x: Tensor,
    global_tokens: Tensor | None,
    ratio: float,
    rand: float = 0.5,
    generator: torch.Generator | None = None,
    align_batch: bool = True,
    global_is_src: bool | None = None,
) -> Merge:
    """VidToMe global merging of a chunk's locally merged tokens with the block's global token set.

    The returned matching is over the concatenation ``[x | global_tokens]``. With probability
    ``rand`` the global tokens are the source side and the chunk's tokens the destination side,
    otherwise the other way round: ``global_is_src`` when given (the side drawn once for the UNet
    call, :func:`draw_global_side`), else one draw on ``generator`` here; ``r = int(n_src *
    ratio)`` sources are merged (:func:`bipartite_match`). With ``ratio == 0`` nothing is merged
    and the result is the identity over the concatenation (the chunk attends over its tokens and
    all global tokens). Without a global set (``None`` or empty) the result is the identity over
    ``x`` and nothing is drawn.

    Args:
        x: ``(B, L, C)`` the chunk's tokens after local merging.
        global_tokens: ``(B, G, C)`` the block's global token set, or ``None``.
        ratio: fraction of the source side merged, in ``[0, 1]``.
        rand: probability that the global set is the source side, in ``[0, 1]``.
        generator: random source for the side choice when ``global_is_src`` is not given.
        align_batch: one matching for the whole batch (see :func:`bipartite_match`).
        global_is_src: the side, drawn by the caller.

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
    if global_is_src is None:
        if generator is None:
            raise ValueError("global_merge needs a torch.Generator (or a drawn side) to choose the merging side")
        global_is_src = draw_global_side(rand, generator)
    g = global_tokens.shape[1]
    dev = x.device
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
    return _merge_from_representatives(alive, rep, l + g - r)
