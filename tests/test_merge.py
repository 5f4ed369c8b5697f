"""Unit tests of vidbatch.engine.methods.merge: bipartite matching, local and global merging, merge/unmerge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vidbatch.engine.methods.merge import (
    Merge,
    bipartite_match,
    draw_global_side,
    draw_local_offsets,
    global_merge,
    join_frames,
    local_merge,
    split_frames,
    take_tokens,
)

FRAME_COUNTS = [1, 2, 3, 5, 8, 17, 64]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def representatives(m: Merge) -> torch.Tensor:
    """(Bm, T): for every position, the position of the kept token whose value it takes."""
    return m.keep.gather(1, m.back)


def expected_local_counts(num_frames: int, n: int, ratio: float, stride: int, seed: int) -> list[tuple[int, int]]:
    """Replays the local recursion's draws and returns (n_src, r) of every level."""
    g = gen(seed)
    frames, levels = num_frames, []
    while frames > 1:
        s = min(stride, frames)
        offset = int(torch.randint(0, s, (1,), generator=g).item())
        num_dst = len([i for i in range(frames) if i % s == offset])
        n_src = (frames - num_dst) * n
        levels.append((n_src, int(n_src * ratio)))
        frames = num_dst
    return levels


def naive_local_merge(x: torch.Tensor, num_frames: int, ratio: float, stride: int, seed: int) -> list[int]:
    """Straightforward per-token re-implementation of the local recursion for one batch element.

    Returns the representative position of every position.
    """
    g = gen(seed)
    t = x.shape[0]
    n = t // num_frames
    xn = x / x.norm(dim=-1, keepdim=True)
    rep = list(range(t))
    frames, carry = list(range(num_frames)), []
    while len(frames) > 1:
        s = min(stride, len(frames))
        offset = int(torch.randint(0, s, (1,), generator=g).item())
        dst_frames = [f for i, f in enumerate(frames) if i % s == offset]
        src = [f * n + p for i, f in enumerate(frames) if i % s != offset for p in range(n)]
        dst = [f * n + p for f in dst_frames for p in range(n)] + carry
        best = []
        for a in src:
            scores = [float(xn[a] @ xn[b]) for b in dst]
            j = max(range(len(dst)), key=lambda k: (scores[k], -k))  # first maximum
            best.append((scores[j], dst[j]))
        order = sorted(range(len(src)), key=lambda i: -best[i][0])  # stable
        r = int(len(src) * ratio)
        for i in order[:r]:
            rep = [best[i][1] if v == src[i] else v for v in rep]
        carry = carry + [src[i] for i in order[r:]]
        frames = dst_frames
    return rep


def test_merge_then_unmerge_restores_kept_tokens_and_copies_destinations():
    torch.manual_seed(0)
    x = torch.randn(2, 5 * 7, 8)
    m = local_merge(x, 5, 0.7, 4, gen(3))
    merged = m.merge(x)
    assert merged.shape == (2, m.num_kept, 8) and m.num_kept < 35
    assert torch.equal(merged, x[:, m.keep[0]])
    restored = m.unmerge(merged)
    assert restored.shape == x.shape
    kept = torch.zeros(35, dtype=torch.bool)
    kept[m.keep[0]] = True
    # Kept tokens come back exactly; kept positions un-merge to themselves.
    assert torch.equal(restored[:, kept], x[:, kept])
    assert torch.equal(representatives(m)[0, kept], torch.arange(35)[kept])
    # Every merged position takes the value of its (kept) destination, never its own.
    rep = representatives(m)[0]
    assert kept[rep].all()
    assert (rep[~kept] != torch.arange(35)[~kept]).all()
    assert torch.equal(restored, x[:, rep])
    # The same matching applies to any tensor of the layout (e.g. values of other channels).
    v = torch.randn(2, 35, 3)
    assert torch.equal(m.unmerge(m.merge(v)), v[:, rep])


@pytest.mark.parametrize("num_frames", FRAME_COUNTS)
@pytest.mark.parametrize("ratio", [0.3, 0.9, 1.0])
def test_token_counts_follow_r_equals_int_nsrc_ratio_per_level(num_frames, ratio):
    n, seed = 6, 11
    x = torch.randn(1, num_frames * n, 4)
    m = local_merge(x, num_frames, ratio, 4, gen(seed))
    levels = expected_local_counts(num_frames, n, ratio, 4, seed)
    assert m.num_tokens == num_frames * n
    assert m.num_kept == num_frames * n - sum(r for _, r in levels)
    if num_frames > 1:
        assert len(levels) >= 1


def test_ratio_zero_is_exact_identity_and_draws_nothing():
    x = torch.randn(3, 8 * 5, 4)
    g = gen(5)
    before = g.get_state()
    m = local_merge(x, 8, 0.0, 4, g)
    assert m.is_identity and m.num_kept == 40
    assert m.merge(x) is x and m.unmerge(x) is x
    assert torch.equal(g.get_state(), before)
    # One frame: nothing to merge either.
    m1 = local_merge(x[:, :5], 1, 0.9, 4, g)
    assert m1.is_identity and torch.equal(g.get_state(), before)


@pytest.mark.parametrize("num_frames", FRAME_COUNTS)
@pytest.mark.parametrize("ratio", [0.5, 0.9, 1.0])
def test_any_frame_count_keeps_tokens_aligned(num_frames, ratio):
    # Every frame holds the same N distinct vectors at the same positions: the only perfect match
    # of a token is the same spatial position in another frame, so a correct matching maps every
    # position to a kept token at the same spatial position (the reference breaks at 17+ frames).
    n, c = 6, 16
    torch.manual_seed(1)
    frame = torch.randn(n, c)
    x = frame.repeat(num_frames, 1)[None] * torch.rand(num_frames * n, 1)  # a scale keeps the cosine at 1
    m = local_merge(x, num_frames, ratio, 4, gen(2))
    rep = representatives(m)[0]
    pos = torch.arange(num_frames * n)
    assert ((rep >= 0) & (rep < num_frames * n)).all()
    assert torch.equal(rep % n, pos % n)
    if ratio == 1.0:
        # Everything merges down into exactly one whole frame.
        assert m.num_kept == n
        kept_frames = (m.keep[0] // n).unique()
        assert kept_frames.numel() == 1
        assert torch.equal(m.keep[0] % n, torch.arange(n))


@pytest.mark.parametrize("num_frames", [2, 3, 5, 8, 17])
def test_local_merge_matches_a_naive_reimplementation(num_frames):
    torch.manual_seed(num_frames)
    n = 5
    x = torch.randn(1, num_frames * n, 6, dtype=torch.float64)
    m = local_merge(x, num_frames, 0.6, 4, gen(7))
    expected = naive_local_merge(x[0], num_frames, 0.6, 4, 7)
    assert representatives(m)[0].tolist() == expected


def test_local_merge_same_generator_seed_same_matching_other_seed_differs():
    x = torch.randn(2, 8 * 6, 4)
    a = local_merge(x, 8, 0.9, 4, gen(0))
    b = local_merge(x, 8, 0.9, 4, gen(0))
    assert torch.equal(a.keep, b.keep) and torch.equal(a.back, b.back)
    differs = [not torch.equal(local_merge(x, 8, 0.9, 4, gen(s)).back, a.back) for s in range(1, 6)]
    assert any(differs)


def test_align_batch_shares_indices_and_uses_concatenated_scores():
    # One source token; branch 0 prefers destination 0 (cos 0.8), branch 1 prefers destination 1
    # with a higher score (cos 0.99): the aligned matching picks destination 1 for every branch.
    src = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    dst = torch.tensor([
        [[0.8, 0.6], [0.0, 1.0]],
        [[0.0, 1.0], [0.99, 0.141]],
    ])
    s_idx, d_idx, u_idx = bipartite_match(src, dst, 1, align_batch=True)
    assert s_idx.shape == (1, 1) and d_idx.tolist() == [[1]] and u_idx.shape == (1, 0)
    s_idx, d_idx, _ = bipartite_match(src, dst, 1, align_batch=False)
    assert d_idx.tolist() == [[0], [1]]

    torch.manual_seed(3)
    x = torch.randn(3, 4 * 8, 5)
    m = local_merge(x, 4, 0.8, 4, gen(1), align_batch=True)
    assert m.keep.shape[0] == 1 and m.back.shape[0] == 1
    merged = m.merge(x)
    for b in range(3):
        assert torch.equal(merged[b], x[b, m.keep[0]])


def test_without_align_batch_each_element_gets_its_own_matching():
    torch.manual_seed(4)
    x = torch.randn(2, 4 * 8, 5)
    m = local_merge(x, 4, 0.8, 4, gen(1), align_batch=False)
    assert m.keep.shape == (2, m.num_kept)
    for b in range(2):
        single = local_merge(x[b : b + 1], 4, 0.8, 4, gen(1), align_batch=False)
        assert torch.equal(m.keep[b], single.keep[0]) and torch.equal(m.back[b], single.back[0])
    assert not torch.equal(m.keep[0], m.keep[1])
    with pytest.raises(ValueError, match="batch"):
        m.merge(torch.randn(3, 32, 5))


def test_global_merge_without_a_global_set_is_identity_and_draws_nothing():
    x = torch.randn(2, 9, 4)
    g = gen(0)
    before = g.get_state()
    for empty in (None, torch.randn(2, 0, 4)):
        m = global_merge(x, empty, 0.8, 0.5, g)
        assert m.is_identity and m.num_tokens == 9
    assert torch.equal(g.get_state(), before)


@pytest.mark.parametrize("rand, global_is_src", [(1.0, True), (0.0, False)])
def test_global_merge_sides(rand, global_is_src):
    torch.manual_seed(5)
    local = torch.randn(2, 10, 8)
    # Global tokens 0..5 are scaled copies of local tokens 3..8 (cosine 1), 6 and 7 unrelated.
    glob = torch.cat([local[:, 3:9] * 2.0, torch.randn(2, 2, 8)], dim=1)
    m = global_merge(local, glob, 0.5, rand, gen(0))
    l, g = 10, 8
    n_src = g if global_is_src else l
    assert m.num_tokens == l + g
    assert m.num_kept == l + g - int(n_src * 0.5)
    rep = representatives(m)[0]
    if global_is_src:
        assert torch.equal(m.keep[0, :l], torch.arange(l))  # the chunk's tokens all stay
        merged = (rep != torch.arange(l + g)).nonzero()[:, 0]
        assert merged.numel() == 4 and set(merged.tolist()) <= set(range(l, l + 6))
        # The perfect copies merge first, each into the local token it copies.
        for j in merged.tolist():
            assert rep[j] == j - l + 3
    else:
        assert torch.equal(m.keep[0, -g:], torch.arange(l, l + g))  # the global set all stays
        merged = (rep != torch.arange(l + g)).nonzero()[:, 0]
        assert merged.numel() == 5 and set(merged.tolist()) <= set(range(3, 9))
        for j in merged.tolist():
            assert rep[j] == l + j - 3  # into the global copy of itself
    tokens = torch.cat([local, glob], dim=1)
    out = m.unmerge(m.merge(tokens))
    assert torch.equal(out, tokens[:, rep])


def test_global_merge_ratio_zero_keeps_everything():
    local, glob = torch.randn(2, 6, 4), torch.randn(2, 5, 4)
    m = global_merge(local, glob, 0.0, 0.5, gen(0))
    assert m.is_identity and m.num_tokens == 11


def test_mean_mode_averages_each_group():
    torch.manual_seed(6)
    x = torch.randn(1, 3 * 4, 5)
    m = local_merge(x, 3, 1.0, 4, gen(0))
    mean = m.merge(x, mode="mean")
    for k in range(m.num_kept):
        group = (m.back[0] == k).nonzero()[:, 0]
        assert torch.allclose(mean[0, k], x[0, group].mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="merge mode"):
        m.merge(x, mode="max")


def test_field_notes_token_example():
    # SD 1.5 at 512 px, 64x64 level, chunk of 4 frames, ratios 0.9 / 0.8:
    # 16384 tokens extended, 5325 after local merging, 6390 with the previous chunk's global set.
    torch.manual_seed(7)
    x = torch.randn(1, 4 * 4096, 4)
    local = local_merge(x, 4, 0.9, 4, gen(0))
    assert local.num_tokens == 16384
    assert local.num_kept == 5325  # one level: 12288 sources, r = int(12288 * 0.9) = 11059
    tokens = local.merge(x)
    previous = torch.randn(1, 5325, 4)
    for rand in (0.0, 1.0):
        glob = global_merge(tokens, previous, 0.8, rand, gen(0))
        assert glob.num_kept == 6390


def test_join_and_split_frames_are_branch_major_inverses():
    x = torch.arange(2 * 3 * 4 * 1, dtype=torch.float32).reshape(6, 4, 1)  # B=2, F=3, N=4
    j = join_frames(x, 3)
    assert j.shape == (2, 12, 1)
    assert torch.equal(j[1, :4], x[3])  # branch 1 starts with its frame 0
    assert torch.equal(split_frames(j, 3), x)


def test_invalid_arguments_raise():
    x = torch.randn(1, 10, 4)
    with pytest.raises(ValueError, match="frames"):
        local_merge(x, 3, 0.5, 4, gen())
    with pytest.raises(ValueError, match="ratio"):
        local_merge(x, 2, 1.5, 4, gen())
    with pytest.raises(ValueError, match="stride"):
        local_merge(x, 2, 0.5, 1, gen())
    with pytest.raises(ValueError, match="Generator"):
        local_merge(x, 2, 0.5, 4, None)
    with pytest.raises(ValueError, match="r=5"):
        bipartite_match(torch.randn(1, 4, 2), torch.randn(1, 3, 2), 5)



def test_sizes_count_original_tokens_through_local_and_global_levels():
    from vidbatch.engine.methods.merge import size_bias

    torch.manual_seed(2)
    x = torch.randn(2, 8 * 6, 4)
    m = local_merge(x, 8, 0.9, 4, gen(1))
    sizes = m.sizes()  # (1, K)
    assert sizes.shape == (1, m.num_kept) and sizes.sum() == 48 and (sizes >= 1).all()
    assert torch.equal(sizes[0], torch.bincount(m.back[0], minlength=m.num_kept).float())
    # Through the global level: sizes of [local tokens | global tokens] add up into the kept ones.
    glob_tokens = torch.randn(2, 5, 4)
    g = global_merge(m.merge(x), glob_tokens, 0.8, 0.0, gen(0))
    before = torch.cat([sizes, torch.full((1, 5), 3.0)], dim=1)
    after = g.sizes(before)
    assert after.shape == (1, g.num_kept) and after.sum() == 48 + 15
    bias = size_bias(after, torch.float16)
    assert bias.shape == (1, 1, 1, g.num_kept) and bias.dtype == torch.float16
    assert torch.allclose(bias.float()[0, 0, 0], after[0].log(), atol=1e-3)
    # Per-element matchings give per-element sizes.
    m2 = local_merge(x, 8, 0.9, 4, gen(1), align_batch=False)
    assert m2.sizes().shape == (2, m2.num_kept) and (m2.sizes().sum(1) == 48).all()


@pytest.mark.parametrize("num_frames", [2, 4, 5, 8, 16, 17])
def test_drawn_offsets_give_the_matching_drawn_inside(num_frames):
    from vidbatch.engine.methods.merge import draw_global_side, draw_local_offsets

    x = torch.randn(2, num_frames * 3, 4)
    offsets = draw_local_offsets(num_frames, 4, gen(4))
    inside = local_merge(x, num_frames, 0.9, 4, gen(4))
    drawn = local_merge(x, num_frames, 0.9, 4, offsets=offsets)
    assert torch.equal(inside.keep, drawn.keep) and torch.equal(inside.back, drawn.back)
    # A level whose destination count is fixed keeps its draw on the device (no host read).
    assert isinstance(offsets[0], torch.Tensor) == (num_frames % min(4, num_frames) == 0)
    with pytest.raises(ValueError, match="too few"):
        local_merge(x, num_frames, 0.9, 4, offsets=offsets[:-1])
    g = gen(5)
    sides = [draw_global_side(0.3, g) for _ in range(2000)]
    assert 0.25 < sum(sides) / len(sides) < 0.35

GOLDEN = Path(__file__).parent / "fixtures" / "vidtome_reference_merge.safetensors"


def _ids(values: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """(B, M, C) values, (B, P, C) distinct input tokens -> (B, M): the input token each value copies."""
    eq = (values[:, :, None, :] == pool[:, None, :, :]).all(-1)
    assert (eq.sum(-1) == 1).all()
    return eq.int().argmax(-1)


def test_merge_decisions_match_the_reference_implementation():
    """Our merging, driven as the attention path drives it, against the authors' code on the same tensors.

    The fixture was produced by running the public reference, github.com/lixirui142/VidToMe at commit
    064c7b1eb1f93e56dee9220376a5ee0a9a039729, unmodified (only called from a scratch script):
    ``vidtome.patch.compute_merge`` (local merging with ``merge.bipartite_soft_matching_randframe``,
    recursively, then global merging with ``merge.bipartite_soft_matching_2s``), with the
    reference's generator behaviour: ``torch.manual_seed(seed)`` (100, or 102 for the unaligned case:
    seeds whose global coins give both sides), then every block's generator forked
    from the global RNG state by ``vidtome.utils.init_generator`` (as its forward pre-hook does),
    each block drawing from its own copy. Settings: local ratio 0.9, global ratio 0.8, global_rand
    0.5, target stride 4, replace mode. Cases: chunks of 4, 8 and 16 frames with ``align_batch``
    and 8 frames without; each case one denoising step of 3 consecutive chunks (the first seeds the
    global set), B = 3 branches, C = 4 channels, two blocks per call: ``a`` with a 2x2 token grid
    (downsample 1) and ``b`` with 1x1 (downsample 2; the latent grid is 2x2). Inputs are integers in
    [-64, 64] / 16 (exact in float32), distinct and with no near-collinear pair, so no matching has
    ties. Stored per chunk and block: the int8 inputs, the merged tokens (x 16, exact copies of
    inputs in replace mode), which input each merged token copies (``merged_ids``), which input
    each position takes after merge + unmerge (``rep_ids``: the decisions) and which inputs form the
    new global set (``global_ids``); ids index the step's inputs of that block, chunk after chunk.

    Ours: one ``torch.Generator().manual_seed(seed)`` (the same state the reference forks), draws
    made once per call by ``FrameAttentionState.begin_chunk`` and shared by both blocks.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from vidbatch.engine.methods.vidtome import FrameAttentionState, FrameAttnProcessor, MergeSettings

    with safe_open(str(GOLDEN), "pt") as f:
        meta = json.loads(f.metadata()["description"])
    golden = load_file(str(GOLDEN))
    b, scale = meta["branches"], meta["scale"]
    for case in meta["cases"]:
        frames = case["frames"]
        settings = MergeSettings(local_ratio=meta["local_ratio"], global_ratio=meta["global_ratio"],
                                 global_rand=meta["global_rand"], target_stride=meta["target_stride"],
                                 align_batch=case["align_batch"])
        state = FrameAttentionState("vidtome", settings)
        procs = {name: FrameAttnProcessor(state, name) for name in meta["blocks"]}
        pools = {name: torch.empty(b, 0, meta["channels"]) for name in meta["blocks"]}
        generator = torch.Generator().manual_seed(case["seed"])
        state.begin_step()
        sides = set()
        for c in range(meta["chunks"]):
            state.begin_chunk(frames, b, generator)
            for name, proc in procs.items():
                key = f"{case['case']}/{c}/{name}"
                x = join_frames(golden[key + "/x"].float() / scale, frames)  # (B, F*N, C)
                pools[name] = pool = torch.cat([pools[name], x], dim=1)
                merged = proc.merge_chunk(x, frames, b)
                where = f"{key} (global side: {state.draws.global_is_src})"
                sides.add(state.draws.global_is_src)
                assert torch.equal(_ids(merged.tokens, pool).sort(-1).values,
                                   golden[key + "/merged_ids"].long().sort(-1).values), where
                assert torch.equal(_ids(merged.unmerge(merged.tokens), pool), golden[key + "/rep_ids"].long()), where
                assert torch.equal(_ids(state.global_tokens[name], pool).sort(-1).values,
                                   golden[key + "/global_ids"].long().sort(-1).values), where
                # The merged outputs, in the reference's order.
                ours = merged.tokens.gather(1, _order_like(_ids(merged.tokens, pool), golden[key + "/merged_ids"].long()))
                torch.testing.assert_close(ours, golden[key + "/merged"].float() / scale, atol=1e-6, rtol=0)
        assert sides == {None, True, False}  # both global sides were exercised


def _order_like(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """(B, M) ids in our order and theirs -> (B, M, C-broadcastable) indices putting ours in their order."""
    pos = (ours[:, None, :] == theirs[:, :, None]).int().argmax(-1)  # (B, M): where their i-th id is in ours
    return pos[..., None].expand(-1, -1, 4)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_half_precision_matching_differs_from_float32_only_at_ties(low):
    """The matching runs in the model's dtype; in half precision a decision may change only where the
    float32 scores deciding it are within the half dtype's rounding (bench: vidbatch.tools.bench.matching)."""
    from vidbatch.tools.bench.matching import compare_matching

    row = compare_matching(tokens_per_frame=256, frames=4, channels=64, branches=3, ratio=0.9, low=low, repeat=1)
    assert row["merged"] == int(3 * 256 * 0.9)
    assert row["not_ties"] == 0, row


# --- found by `make mutate`: sizes in other dtypes, the global matching's defaults, full-ratio merging,
# --- stride 2, and the checks that name the setting out of range.
def test_sizes_keep_the_dtype_of_the_base_sizes():
    # Positions 0..3; 1 and 3 merge into 0, 2 stays: groups {0, 1, 3} and {2}.
    m = Merge(keep=torch.tensor([[0, 2]]), back=torch.tensor([[0, 0, 1, 0]]))
    assert m.sizes().dtype == torch.float32 and m.sizes().tolist() == [[3.0, 1.0]]
    base = torch.tensor([[1.0, 2.0, 4.0, 8.0]], dtype=torch.float64)
    sizes = m.sizes(base)
    assert sizes.dtype == torch.float64 and sizes.tolist() == [[11.0, 4.0]]


@pytest.mark.parametrize("shape", [(4,), (1, 5), (1, 3)])
def test_sizes_refuse_a_base_of_the_wrong_shape(shape):
    m = Merge(keep=torch.tensor([[0, 2]]), back=torch.tensor([[0, 0, 1, 0]]))
    with pytest.raises(ValueError, match="expected sizes of shape"):
        m.sizes(torch.ones(shape))


def test_global_merge_draws_its_side_with_even_odds_by_default():
    # Without `rand`, the side is drawn with probability 0.5: over 200 draws both sides come up often.
    x, g = torch.randn(1, 6, 4, generator=gen(1)), torch.randn(1, 2, 4, generator=gen(2))
    generator = gen(3)
    kept = [global_merge(x, g, 0.5, generator=generator).num_kept for _ in range(200)]
    # global set as source: 2 sources, r = 1 -> 7 kept; chunk as source: 6 sources, r = 3 -> 5 kept.
    assert set(kept) == {5, 7}
    assert 60 < kept.count(7) < 140


@pytest.mark.parametrize("global_is_src, kept", [(True, 6), (False, 2)])
def test_global_merge_at_ratio_one_merges_every_source(global_is_src, kept):
    x, g = torch.randn(2, 6, 4, generator=gen(4)), torch.randn(2, 2, 4, generator=gen(5))
    m = global_merge(x, g, 1.0, global_is_src=global_is_src)
    assert m.num_tokens == 8 and m.num_kept == kept
    survivors = set(m.keep[0].tolist())
    assert survivors == (set(range(6)) if global_is_src else {6, 7})


@pytest.mark.parametrize("shape", [(3, 2, 4), (2, 2, 5)])
def test_global_merge_refuses_global_tokens_of_another_batch_or_width(shape):
    with pytest.raises(ValueError, match="do not match"):
        global_merge(torch.zeros(2, 6, 4), torch.zeros(shape), 0.5, global_is_src=True)


@pytest.mark.parametrize("ratio, rand, name", [(1.5, 0.5, "global merge ratio"), (0.5, -0.1, "global_rand")])
def test_global_merge_names_the_setting_out_of_range(ratio, rand, name):
    with pytest.raises(ValueError, match=f"^{name} must be in"):
        global_merge(torch.zeros(1, 6, 4), torch.zeros(1, 2, 4), ratio, rand, global_is_src=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_mean_merge_keeps_the_shape_and_dtype_of_its_input(dtype):
    # One matching shared by a batch of 2: positions 1 and 3 merge into 0, 2 stays.
    m = Merge(keep=torch.tensor([[0, 2]]), back=torch.tensor([[0, 0, 1, 0]]))
    x = torch.tensor([[[1.0], [2.0], [5.0], [6.0]], [[0.0], [3.0], [1.0], [-3.0]]], dtype=dtype)
    out = m.merge(x, "mean")
    assert out.dtype == dtype and out.shape == (2, 2, 1)
    assert out[..., 0].tolist() == [[3.0, 5.0], [0.0, 1.0]]


def test_merge_and_unmerge_refuse_tokens_of_another_count():
    m = Merge(keep=torch.tensor([[0, 2]]), back=torch.tensor([[0, 0, 1, 0]]))
    with pytest.raises(ValueError, match="expected tokens of shape"):
        m.merge(torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="expected tokens of shape"):
        m.unmerge(torch.zeros(1, 3, 3))


def test_draw_global_side_names_global_rand_out_of_range():
    with pytest.raises(ValueError, match="^global_rand must be in"):
        draw_global_side(1.5, gen())


def test_global_tokens_of_another_dtype_are_matched_in_the_chunk_dtype():
    x = torch.randn(1, 6, 4, generator=gen(6))
    g = x[:, :2].double() + 1e-3                 # near-copies of tokens 0 and 1, kept in float64
    m = global_merge(x, g, 1.0, global_is_src=True)
    assert m.back[0, 6:].tolist() == [0, 1]      # each global token merges into the token it copies


def test_stride_two_is_allowed_and_halves_the_frames_each_level():
    offsets = draw_local_offsets(8, 2, gen(7))
    assert len(offsets) == 3 and all(int(o) in (0, 1) for o in offsets)   # 8 -> 4 -> 2 -> 1 frames
    # Ratio 1 merges every source of every level: one frame's worth of tokens is left.
    m = local_merge(torch.randn(1, 8 * 3, 4, generator=gen(8)), 8, 1.0, stride=2, offsets=offsets)
    assert m.num_kept == 3


def test_local_merge_default_stride_is_four():
    x = torch.randn(2, 8 * 4, 4, generator=gen(9))
    by_default = local_merge(x, 8, 0.5, generator=gen(10))
    four = local_merge(x, 8, 0.5, stride=4, generator=gen(10))
    assert torch.equal(by_default.keep, four.keep) and torch.equal(by_default.back, four.back)
    # 8 frames at stride 4: 24 sources -> 12 merged, then 4 sources -> 2 merged: 32 - 14 kept.
    assert by_default.num_kept == 18


def test_local_merge_names_its_ratio_out_of_range():
    with pytest.raises(ValueError, match="^local merge ratio must be in"):
        local_merge(torch.zeros(1, 8, 2), 2, 1.5, generator=gen())


def test_bipartite_match_with_an_empty_destination_set():
    src = torch.randn(2, 3, 4, generator=gen(11))
    src_idx, dst_idx, unm_idx = bipartite_match(src, torch.zeros(2, 0, 4), 0)   # nothing to merge: fine
    assert src_idx.shape == (1, 0) and dst_idx.shape == (1, 0) and unm_idx.tolist() == [[0, 1, 2]]
    src_idx, _, unm_idx = bipartite_match(src, torch.zeros(2, 0, 4), 0, align_batch=False)
    assert src_idx.shape == (2, 0) and unm_idx.tolist() == [[0, 1, 2]] * 2
    with pytest.raises(ValueError, match="empty destination"):
        bipartite_match(src, torch.zeros(2, 0, 4), 1)


def test_bipartite_match_scores_in_the_input_precision():
    # Cosines 1 - 2e-12 (source 0) and 1 - 5e-13 (source 1) with the destination: equal in float32,
    # but in float64 source 1 is the better match and is the one merged.
    dst = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    src = torch.tensor([[[1.0, 2e-6], [1.0, 1e-6]]], dtype=torch.float64)
    src_idx, dst_idx, unm_idx = bipartite_match(src, dst, 1)
    assert src_idx.tolist() == [[1]] and unm_idx.tolist() == [[0]] and dst_idx.tolist() == [[0]]


def test_tied_scores_merge_the_lowest_source_indices():
    # 64 identical sources tie for the one destination: the stable order merges sources 0..31.
    src = torch.ones(1, 64, 4)
    src_idx, dst_idx, unm_idx = bipartite_match(src, torch.ones(1, 1, 4), 32)
    assert src_idx.tolist() == [list(range(32))] and unm_idx.tolist() == [list(range(32, 64))]

@pytest.mark.parametrize("width", [7, 77, 512, 1024, 1331])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_first_max_is_torch_max_with_its_ties_and_nans(width, dtype):
    """The matching's max by groups (`_first_max`) returns exactly `max(dim=-1)`: the values, and the first
    index among equal maxima, NaN counting as the max; with and without columns after the last group."""
    from vidbatch.engine.methods.merge import _first_max

    g = gen(3)
    cases = {
        "random": torch.randn(3, 40, width, generator=g),
        "ties": torch.randint(-2, 3, (3, 40, width), generator=g).float(),  # many equal maxima per row
    }
    nans = torch.randint(-2, 3, (3, 40, width), generator=g).float()
    nans[0, 0, width // 2] = nans[1, 3, width - 1] = nans[2, 5, 0] = nans[2, 5, width - 1] = float("nan")
    cases["nan"] = nans
    # More rows than columns (one batch element against fewer than 724 destinations): the width is the last axis.
    cases["tall"] = torch.randn(1, width + 64, width, generator=g)
    for name, scores in cases.items():
        scores = scores.to(dtype)
        values, index = _first_max(scores)
        expected_values, expected_index = scores.max(dim=-1)
        assert torch.equal(index, expected_index), name
        assert torch.equal(values.nan_to_num(-9.0), expected_values.nan_to_num(-9.0)), name


@pytest.mark.parametrize("sources,destinations,channels", [(3062, 1024, 32), (1331, 1331, 32), (700, 256, 64), (45, 300, 320),
                                                     (993, 16384, 32)])
def test_scores_in_row_blocks_equal_one_matrix_product(sources, destinations, channels):
    """Blocking the score matrix (every block of equal rows, the last one moved back) changes no score: the
    best value and destination of every source are bit-identical to one product over all sources. (993
    sources: 32 blocks of 32 rows, the last one moved back by 31 rows; cut short instead, it would be a
    one-row product, whose entries round differently here.)"""
    from vidbatch.engine.methods.merge import _best_destinations, _score_rows

    g = gen(4)
    a = torch.nn.functional.normalize(torch.randn(3, sources, channels, generator=g), dim=-1)
    bt = torch.nn.functional.normalize(torch.randn(3, destinations, channels, generator=g), dim=-1).transpose(1, 2)
    rows = _score_rows(3, sources, destinations, channels, a.device)
    assert rows < sources or sources <= channels  # blocked (3062 sources: 19 blocks of 162, the last one moved back)
    best, best_idx = _best_destinations(a, bt)
    expected, expected_idx = (a @ bt).max(dim=-1)
    assert torch.equal(best, expected) and torch.equal(best_idx, expected_idx)


@pytest.mark.parametrize("shared", [True, False])
def test_take_tokens_is_a_gather_of_whole_tokens(shared):
    """Row copies give what `gather` with the index expanded over channels gives, for one shared row of
    indices and for one row per batch element."""
    g = gen(6)
    x = torch.randn(3, 50, 7, generator=g)
    index = torch.randint(0, 50, (1 if shared else 3, 80), generator=g)
    expected = x.gather(1, index[..., None].expand(3, -1, 7))
    assert torch.equal(take_tokens(x, index), expected)
    assert torch.equal(take_tokens(x.transpose(0, 1).contiguous().transpose(0, 1), index), expected)  # strided input
    with pytest.raises(ValueError, match="indices of shape"):
        take_tokens(x, torch.zeros(2, 4, dtype=torch.int64))
    # Two batch elements with one index each: not a shared row, however its shape resembles one.
    pair, one_each = x[:2], torch.tensor([[5], [41]])
    assert torch.equal(take_tokens(pair, one_each), torch.stack([pair[0, [5]], pair[1, [41]]]))


@pytest.mark.parametrize("align_batch", [True, False])
@pytest.mark.parametrize("global_is_src", [True, False])
def test_global_then_local_unmerge_in_one_copy_equals_two_steps(align_batch, global_is_src):
    """The one-copy un-merge through the global and then the local matching, and the first positions of
    a global un-merge alone (the new global set), are exactly the two-step results."""
    g = gen(7)
    x = torch.randn(2, 6 * 16, 8, generator=g)
    local = local_merge(x, 6, 0.9, 4, gen(1), align_batch=align_batch)
    tokens = local.merge(x)
    previous = torch.randn(2, 30, 8, generator=g)
    glob = global_merge(tokens, previous, 0.8, align_batch=align_batch, global_is_src=global_is_src)
    merged = glob.merge(torch.cat([tokens, previous], dim=1))
    out = torch.randn(2, merged.shape[1], 5, generator=g)  # an attention output of other channels
    two_steps = local.unmerge(glob.unmerge(out)[:, : local.num_kept])
    assert torch.equal(take_tokens(out, glob.then_unmerge(local)), two_steps)
    assert torch.equal(glob.unmerge_first(merged, local.num_kept), glob.unmerge(merged)[:, : local.num_kept])
