"""Tests of the frame self-attention processors and apply_patch / remove_patch on a tiny UNet."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from vidbatch.engine.methods.vidtome import (
    BlockStats,
    FrameAttentionBatch,
    FrameAttentionState,
    FrameAttnProcessor,
    MergeConfig,
    MergeSettings,
    VidToMe,
    apply_patch,
    apply_patch_videos,
    attended_share,
    remove_patch,
)
from vidbatch.core.errors import ConfigError
from vidbatch.engine.controls.pnp import pnp_attention_blocks
from vidbatch.engine.editor import EditorSettings
from vidbatch.engine.methods.merge import (
    draw_global_side,
    draw_local_offsets,
    global_merge,
    join_frames,
    local_merge,
    size_bias,
    split_frames,
)
from vidbatch.engine.processors import (
    attend,
    check_layout,
    check_self_attention,
    in_blocks,
    install_processors,
    installed_patch,
    motion_blocks,
    project_heads,
    restore_processors,
    transformer_blocks,
)
from vidbatch.models.builtin import tiny_config
from vidbatch.models.motion import motion_unet, tiny_adapter_config

BRANCHES, FRAMES = 2, 4


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    return model.eval()


@pytest.fixture
def model(unet):
    """The shared tiny UNet, unpatched again after every test."""
    yield unet
    remove_patch(unet)


def inputs(frames: int = FRAMES, seed: int = 1, same_frames: bool = False):
    """A chunk for [uncond, cond]: latents (B*F, 4, 8, 8) branch-major, text (B*F, 5, 32)."""
    g = torch.Generator().manual_seed(seed)
    if same_frames:
        lat = torch.randn(BRANCHES, 1, 4, 8, 8, generator=g).expand(BRANCHES, frames, 4, 8, 8)
    else:
        lat = torch.randn(BRANCHES, frames, 4, 8, 8, generator=g)
    text = torch.randn(BRANCHES, 1, 5, 32, generator=g).expand(BRANCHES, frames, 5, 32)
    return lat.reshape(-1, 4, 8, 8), text.reshape(-1, 5, 32)


@torch.no_grad()
def run(unet, lat, text, t: int = 500):
    return unet(lat, t, encoder_hidden_states=text).sample


def chunk(state: FrameAttentionState, frames: int = FRAMES, seed: int = 0, **kw) -> None:
    state.begin_chunk(frames, BRANCHES, torch.Generator().manual_seed(seed), **kw)


def test_per_frame_reproduces_the_stock_processor(model):
    lat, text = inputs()
    stock = run(model, lat, text)
    before = dict(model.attn_processors)
    state = apply_patch(model, "per-frame")
    after = model.attn_processors
    # Only attn1 is replaced; cross-attention keeps its very processor objects.
    assert sum(isinstance(p, FrameAttnProcessor) for p in after.values()) == len(after) // 2 == 7
    for name, proc in after.items():
        if ".attn2." in name:
            assert proc is before[name]
        else:
            assert isinstance(proc, FrameAttnProcessor)
    assert torch.allclose(run(model, lat, text), stock, atol=1e-6)
    chunk(state)  # with the chunk declared too
    assert torch.allclose(run(model, lat, text), stock, atol=1e-6)


def test_extended_one_frame_equals_per_frame_and_more_frames_differ(model):
    lat, text = inputs(frames=1)
    per_frame = run(model, lat, text)
    state = apply_patch(model, "extended")
    chunk(state, frames=1)
    assert torch.allclose(run(model, lat, text), per_frame, atol=1e-6)

    lat4, text4 = inputs()
    chunk(state)
    extended = run(model, lat4, text4)
    apply_patch(model, "per-frame")
    # Cross-frame attention must actually change the result, or the other tests prove nothing.
    assert (extended - run(model, lat4, text4)).abs().max() > 1e-3
    stats = state.stats["down_blocks.0.attentions.0.transformer_blocks.0"]
    assert (stats.tokens, stats.local, stats.attended) == (FRAMES * 64, FRAMES * 64, FRAMES * 64)


def test_vidtome_without_merging_equals_extended(model):
    lat, text = inputs()
    state = apply_patch(model, "extended")
    chunk(state)
    extended = run(model, lat, text)
    state = apply_patch(model, "vidtome", MergeSettings(local_ratio=0.0, global_merge=False))
    chunk(state)
    assert torch.allclose(run(model, lat, text), extended, atol=1e-5)
    assert all(s.attended == s.tokens for s in state.stats.values())
    assert state.global_tokens == {}


def test_vidtome_token_counts_and_global_tokens(model):
    lat, text = inputs()
    state = apply_patch(model, "vidtome", MergeSettings())
    state.begin_step()
    g = torch.Generator().manual_seed(0)
    state.begin_chunk(FRAMES, BRANCHES, g)
    run(model, lat, text)
    top = state.stats["down_blocks.0.attentions.0.transformer_blocks.0"]
    # 8x8 latent, 4 frames: 256 tokens, one level with 192 sources, r = int(192 * 0.9) = 172.
    assert (top.tokens, top.local, top.attended, top.downsample) == (256, 84, 84, 1)
    low = state.stats["down_blocks.1.attentions.0.transformer_blocks.0"]
    # 4x4 grid: 64 tokens, 48 sources, r = int(48 * 0.9) = 43.
    assert (low.tokens, low.local, low.downsample) == (64, 21, 2)
    assert len(state.global_tokens) == 7  # every block is at most 2x downsampled
    for name, tokens in state.global_tokens.items():
        assert tokens.shape[:2] == (BRANCHES, state.stats[name].local)
        assert tokens.device == lat.device
    # The next chunk merges with the global set: 84 local + 84 global, 80% of one side merged.
    state.begin_chunk(FRAMES, BRANCHES, g)
    run(model, lat, text)
    top = state.stats["down_blocks.0.attentions.0.transformer_blocks.0"]
    assert top.attended == 84 + 84 - int(84 * 0.8)
    state.begin_step()
    assert state.global_tokens == {}


def test_vidtome_uses_per_frame_above_max_downsample(model):
    lat, text = inputs()
    state = apply_patch(model, "vidtome", MergeSettings(max_downsample=1))
    chunk(state)
    run(model, lat, text)
    low = state.stats["down_blocks.1.attentions.0.transformer_blocks.0"]
    assert (low.tokens, low.attended, low.downsample) == (64, 16, 2)
    assert "down_blocks.1.attentions.0.transformer_blocks.0" not in state.global_tokens
    assert state.stats["down_blocks.0.attentions.0.transformer_blocks.0"].attended < 256


def test_vidtome_identical_frames_give_identical_outputs(model):
    lat, text = inputs(same_frames=True)
    state = apply_patch(model, "vidtome", MergeSettings())
    state.begin_step()
    chunk(state)
    out = run(model, lat, text).reshape(BRANCHES, FRAMES, 4, 8, 8)
    for f in range(1, FRAMES):
        assert torch.allclose(out[:, f], out[:, 0], atol=1e-5)
    assert state.stats["down_blocks.0.attentions.0.transformer_blocks.0"].local < 256


def two_chunks(model, state, seed: int, global_first: bool = True):
    """One step over two chunks (4 frames, then 3), all randomness from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    state.begin_step()
    outs = []
    for frames, data_seed in ((4, 1), (3, 2)):
        state.begin_chunk(frames, BRANCHES, g)
        outs.append(run(model, *inputs(frames=frames, seed=data_seed)))
    return outs


def test_vidtome_same_seed_is_bit_identical_other_seed_differs(model):
    state = apply_patch(model, "vidtome", MergeSettings())
    a = two_chunks(model, state, seed=0)
    b = two_chunks(model, state, seed=0)
    c = two_chunks(model, state, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_global_tokens_carry_information_between_chunks(model):
    state = apply_patch(model, "vidtome", MergeSettings(global_rand=0.0))
    lat, text = inputs(frames=3, seed=2)
    # The second chunk after a first chunk differs from the same chunk run alone...
    after_first = two_chunks(model, state, seed=0)[1]
    g = torch.Generator().manual_seed(0)
    state.begin_step()
    state.begin_chunk(3, BRANCHES, g)
    alone = run(model, lat, text)
    assert (after_first - alone).abs().max() > 1e-4
    # ...but not without global merging.
    state = apply_patch(model, "vidtome", MergeSettings(global_merge=False))
    outs = two_chunks(model, state, seed=0)
    g = torch.Generator().manual_seed(0)
    state.begin_chunk(4, BRANCHES, g)  # consume the first chunk's draws in the same order
    run(model, *inputs(frames=4, seed=1))
    state.begin_chunk(3, BRANCHES, g)
    assert torch.equal(run(model, lat, text), outs[1])
    assert state.global_tokens == {}


def test_global_set_is_replaced_by_the_last_chunks_local_tokens(model):
    # global_rand 1: the global set is always the source side, so the chunk's tokens stay as they
    # are and the new global set is exactly the chunk's locally merged tokens.
    state = apply_patch(model, "vidtome", MergeSettings(global_rand=1.0))
    name = "down_blocks.0.attentions.0.transformer_blocks.0"
    seen = []
    handle = model.get_submodule(name).attn1.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        two_chunks(model, state, seed=0)
    finally:
        handle.remove()
    # Second chunk: 3 frames x 64 tokens, 128 sources, r = int(128 * 0.9) = 115 -> 77 tokens.
    glob = state.global_tokens[name]
    assert glob.shape == (BRANCHES, 77, 32)
    chunk_tokens = join_frames(seen[-1], 3)  # (B, 192, C), the second chunk's attn1 input
    for b in range(BRANCHES):
        match = (glob[b][:, None, :] == chunk_tokens[b][None]).all(-1)  # (77, 192)
        assert match.any(1).all()


def test_vidtome_one_frame_chunk_then_a_full_chunk(model):
    # The engine's first chunk may hold a single frame: no local merging, it seeds the global set.
    state = apply_patch(model, "vidtome", MergeSettings(global_rand=1.0))
    name = "down_blocks.0.attentions.0.transformer_blocks.0"
    g = torch.Generator().manual_seed(0)
    state.begin_step()
    state.begin_chunk(1, BRANCHES, g)
    out = run(model, *inputs(frames=1))
    assert out.shape == (BRANCHES, 4, 8, 8) and torch.isfinite(out).all()
    assert state.stats[name].local == 64 and state.global_tokens[name].shape[1] == 64
    state.begin_chunk(FRAMES, BRANCHES, g)
    run(model, *inputs())
    # 84 local tokens; the 64 global ones are the source side, int(64 * 0.8) = 51 of them merge.
    assert state.stats[name].attended == 84 + 64 - 51


def test_remove_patch_restores_stock_processors_and_output(model):
    lat, text = inputs()
    stock = run(model, lat, text)
    hooks = len(model._forward_pre_hooks)
    apply_patch(model, "extended")
    state = apply_patch(model, "vidtome", MergeSettings())  # re-patching replaces the patch
    chunk(state)
    assert not torch.allclose(run(model, lat, text), stock, atol=1e-4)
    remove_patch(model)
    assert all(isinstance(p, AttnProcessor2_0) for p in model.attn_processors.values())
    assert len(model._forward_pre_hooks) == hooks
    assert torch.equal(run(model, lat, text), stock)
    remove_patch(model)  # no-op when not patched


def test_patch_errors(model):
    with pytest.raises(ConfigError, match="method"):
        apply_patch(model, "tokenflow")
    with pytest.raises(ConfigError, match="local_ratio"):
        apply_patch(model, "vidtome", MergeSettings(local_ratio=1.5))
    state = apply_patch(model, "vidtome", MergeSettings(align_batch=False))
    with pytest.raises(ConfigError, match="align_batch"):
        state.begin_chunk(FRAMES, 3, torch.Generator(), inject_qk=True)
    state = apply_patch(model, "extended")
    lat, text = inputs()
    with pytest.raises(RuntimeError, match="begin_chunk"):
        run(model, lat, text)
    state.begin_chunk(3, BRANCHES)
    with pytest.raises(RuntimeError, match="3 frames"):
        run(model, lat, text)


# --- PnP query/key injection on a single Attention module -------------------------------------

DECODER = "up_blocks.1.attentions.0.transformer_blocks.0"
ENCODER = "down_blocks.0.attentions.0.transformer_blocks.0"


def attention_module() -> Attention:
    torch.manual_seed(3)
    return Attention(query_dim=32, heads=2, dim_head=16).eval()


def expected_injected(attn: Attention, q_in: torch.Tensor, kv_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
    """Attention with queries/keys from q_in/kv_in and values from v_in: (b, M, C) each."""
    b = q_in.shape[0]

    def heads(t):
        return t.view(b, -1, 2, 16).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(attn.to_q(q_in)), heads(attn.to_k(kv_in)), heads(attn.to_v(v_in)))
    return attn.to_out[0](out.transpose(1, 2).reshape(b, -1, 32))


def call(method: str, x: torch.Tensor, name: str, inject: bool, settings: MergeSettings | None = None):
    attn = attention_module()
    state = FrameAttentionState(method, settings or MergeSettings(global_merge=False))
    attn.set_processor(FrameAttnProcessor(state, name, pnp_qk=name == DECODER))
    state.begin_chunk(3, BRANCHES, torch.Generator().manual_seed(0), inject_qk=inject, latent_hw=(2, 2))
    with torch.no_grad():
        return attn, attn(x)


@pytest.mark.parametrize("method", ["per-frame", "extended", "vidtome"])
def test_inject_qk_is_a_no_op_when_branches_agree(method):
    torch.manual_seed(4)
    branch = torch.randn(3, 4, 32)  # 3 frames of 4 tokens
    x = torch.cat([branch, branch])
    _, plain = call(method, x, DECODER, inject=False)
    _, injected = call(method, x, DECODER, inject=True)
    assert torch.allclose(injected, plain, atol=1e-6)


@pytest.mark.parametrize("method", ["per-frame", "extended", "vidtome"])
def test_inject_qk_uses_branch_zero_queries_and_keys(method):
    torch.manual_seed(5)
    x = torch.randn(BRANCHES * 3, 4, 32)
    x0, x1 = x[:3], x[3:]
    _, plain = call(method, x, DECODER, inject=False)
    attn, injected = call(method, x, DECODER, inject=True)
    assert torch.allclose(injected[:3], plain[:3], atol=1e-6)  # the source branch is untouched
    assert (injected[3:] - plain[3:]).abs().max() > 1e-3
    with torch.no_grad():
        if method == "per-frame":
            expected = expected_injected(attn, x0, x0, x1)
        elif method == "extended":
            j0, j1 = join_frames(x0, 3), join_frames(x1, 3)
            expected = split_frames(expected_injected(attn, j0, j0, j1), 3)
        else:
            # The aligned matching the processor computed with the same generator seed.
            joined = join_frames(x, 3)
            m = local_merge(joined, 3, 0.9, 4, torch.Generator().manual_seed(0), align_batch=True)
            assert not m.is_identity
            t = m.merge(joined)
            expected = split_frames(m.unmerge(expected_injected(attn, t[:1], t[:1], t[1:])), 3)
    assert torch.allclose(injected[3:], expected, atol=1e-5)
    # Encoder blocks are never injected.
    _, encoder = call(method, x, ENCODER, inject=True)
    assert torch.allclose(encoder, plain, atol=1e-6)


# --- One set of draws per UNet call ----------------------------------------------------------------


def record_decisions(monkeypatch) -> list[tuple[str, object]]:
    """Wraps the merge functions the processors call; records every block's final destination frame
    (the frame all of whose tokens survive local merging) and global side (True: the global set was
    the source side, i.e. every local token survived). Works on any version of the processors."""
    import vidbatch.engine.methods.vidtome as processors

    seen: list[tuple[str, object]] = []
    real_local, real_global = processors.local_merge, processors.global_merge

    def local(x, num_frames, *args, **kwargs):
        m = real_local(x, num_frames, *args, **kwargs)
        kept = torch.zeros(x.shape[1], dtype=torch.bool)
        kept[m.keep[0]] = True
        whole = kept.view(num_frames, -1).all(1).nonzero().flatten().tolist()
        seen.append(("dst", whole))
        return m

    def glob(x, global_tokens, *args, **kwargs):
        m = real_global(x, global_tokens, *args, **kwargs)
        if global_tokens is not None and not m.is_identity:
            seen.append(("side", bool(torch.isin(torch.arange(x.shape[1]), m.keep[0]).all())))
        return m

    monkeypatch.setattr(processors, "local_merge", local)
    monkeypatch.setattr(processors, "global_merge", glob)
    return seen


@pytest.mark.parametrize("frames", [4, 8])
def test_every_block_of_a_call_merges_into_the_same_destination_frames(model, monkeypatch, frames):
    # The reference forks every block's generator from one state, so all blocks of a UNet call draw
    # the same numbers: the same destination frames and the same global side, which keeps token
    # correspondences consistent across layers. (Drawing anew in every block fails this.)
    seen = record_decisions(monkeypatch)
    state = apply_patch(model, "vidtome", MergeSettings())
    g = torch.Generator().manual_seed(7)
    calls = []
    for _ in range(2):  # steps
        state.begin_step()
        for data_seed in range(3):  # chunks
            seen.clear()
            state.begin_chunk(frames, BRANCHES, g)
            run(model, *inputs(frames=frames, seed=data_seed))
            calls.append(list(seen))
    merged_blocks = len(state.global_tokens)
    assert merged_blocks == 7
    dst_frames = set()
    for i, call_seen in enumerate(calls):
        dst = [v for k, v in call_seen if k == "dst"]
        sides = [v for k, v in call_seen if k == "side"]
        assert len(dst) == merged_blocks and all(len(d) == 1 for d in dst)
        assert all(d == dst[0] for d in dst), f"call {i}: blocks chose destination frames {dst}"
        assert len(sides) == (0 if i % 3 == 0 else merged_blocks)  # no global set in a step's first chunk
        assert len(set(sides)) <= 1, f"call {i}: blocks chose global sides {sides}"
        dst_frames.add(dst[0][0])
    assert len(dst_frames) > 1  # the draw does change from call to call


def test_merge_draws_are_made_in_begin_chunk_not_in_the_blocks(model):
    state = apply_patch(model, "vidtome", MergeSettings())
    g = torch.Generator().manual_seed(0)
    state.begin_step()
    for _ in range(2):  # the second chunk also draws the global side
        state.begin_chunk(8, BRANCHES, g)
        drawn = g.get_state()
        run(model, *inputs(frames=8))
        assert torch.equal(g.get_state(), drawn)
    assert len(state.draws.local_offsets) == 2 and state.draws.global_is_src is not None
    # The draws are the reference's, in its order: the local levels first (then the global side).
    from vidbatch.engine.methods.merge import draw_local_offsets

    state.begin_step()
    state.begin_chunk(8, BRANCHES, torch.Generator().manual_seed(0))
    expected = draw_local_offsets(8, 4, torch.Generator().manual_seed(0))
    assert [int(o) for o in state.draws.local_offsets] == [int(o) for o in expected]
    assert state.draws.global_is_src is None  # no global set yet in this step


# --- Proportional attention --------------------------------------------------------------------


def static_chunks(settings: MergeSettings, method: str = "vidtome", chunks: int = 2) -> list[torch.Tensor]:
    """Attention outputs of `chunks` chunks of 4 identical frames (a static clip), 16 tokens a frame."""
    attn = attention_module()
    state = FrameAttentionState(method, settings)
    attn.set_processor(FrameAttnProcessor(state, ENCODER))
    g = torch.Generator().manual_seed(0)
    frame = torch.randn(BRANCHES, 1, 16, 32, generator=torch.Generator().manual_seed(9))
    x = frame.expand(BRANCHES, 4, 16, 32).reshape(BRANCHES * 4, 16, 32)
    outs = []
    state.begin_step()
    with torch.no_grad():
        for _ in range(chunks):
            state.begin_chunk(4, BRANCHES, g, latent_hw=(4, 4))
            outs.append(attn(x))
    return outs


@pytest.mark.parametrize("global_rand", [0.0, 1.0])
@pytest.mark.parametrize("align_batch", [True, False])
def test_proportional_attention_over_identical_frames_equals_extended_attention(global_rand, align_batch):
    extended = static_chunks(MergeSettings(), method="extended")[0]
    settings = MergeSettings(proportional_attention=True, global_rand=global_rand, align_batch=align_batch)
    first, second = static_chunks(settings)
    # The first chunk (local merging only) and the second (merged with the global set too): every
    # merged key weighs as the tokens it stands for, so the merged set attends like the unmerged one.
    torch.testing.assert_close(first, extended, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(second, extended, atol=1e-6, rtol=1e-5)
    # Without it the duplicates left unmerged (10% of the sources) and the global set skew attention.
    plain = static_chunks(MergeSettings(global_rand=global_rand, align_batch=align_batch))
    assert max((p - extended).abs().max() for p in plain) > 1e-3


def static_clip_pixels(pipe, proportional: bool) -> torch.Tensor:
    """12 identical 32x32 frames edited with VidToMe in 3 chunks of 4; decoded pixels in float grey levels."""
    from vidbatch.engine.editor import EditorSettings, VideoEditor

    rng = np.random.default_rng(0)
    frame = np.kron(rng.integers(0, 255, (4, 4, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    frames = np.repeat(frame[None], 12, axis=0)
    editor = VideoEditor(pipe, EditorSettings(method="vidtome", steps=5, chunk_size=4, chunk_order="seq",
                                              method_settings=MergeConfig(proportional_attention=proportional)))
    inversion, _ = editor.cached_invert(frames, "a texture")
    latents = editor.denoise(inversion, "a painting", 0, "a texture")
    with torch.no_grad():
        pixels = editor.vae.decode(latents / editor.vae.config.scaling_factor).sample
    return (pixels.float().clamp(-1, 1) + 1) * 127.5


def test_static_clip_stays_static_with_proportional_attention(pipe):
    # Every chunk attends over a different mix of duplicates and global tokens; with proportional
    # attention each chunk's attention equals per-frame attention on a static clip, so all frames agree.
    def spread(pixels: torch.Tensor) -> float:
        return float((pixels.amax(0) - pixels.amin(0)).max())

    on = spread(static_clip_pixels(pipe, True))
    off = spread(static_clip_pixels(pipe, False))
    assert on < 1.0, f"spread across frames {on:.3f} grey levels with proportional attention"
    # Measured here (float pixels, 5 steps): spread at most 0.005 grey levels on (mean 0.001); off at
    # most 125 (mean 22): the tiny random model amplifies the differences between chunks.
    assert off > 10.0


# --- found by `make mutate` (engine/processors.py): block-prefix matching, the checks that refuse what
# --- frame attention cannot handle, frame vs motion-module blocks, a model with nothing to patch, the patch's
# --- state and on_restore, cross-attention and the q/k norms. Real diffusers parts at toy sizes.

@pytest.mark.parametrize("name, inside", [
    ("up_blocks.1", True),                                   # the block itself
    ("up_blocks.1.attentions.0.transformer_blocks.0", True),  # inside it
    ("up_blocks.10.attentions.0", False),                     # a longer index is another block
    ("up_blocks.2.attentions.0", False),
    ("down_blocks.1", False),
])
def test_in_blocks_is_the_prefix_or_inside_it(name, inside):
    assert in_blocks(name, ["mid_block", "up_blocks.1"]) is inside


def test_self_attention_check_refuses_a_context_or_a_mask_alone():
    attn = Attention(query_dim=8, heads=1, dim_head=8)
    x = torch.zeros(2, 4, 8)
    check_self_attention("vidtome", "b", attn, x, None, None)   # plain self-attention passes
    with pytest.raises(NotImplementedError, match="encoder_hidden_states"):
        check_self_attention("vidtome", "b", attn, x, torch.zeros(2, 3, 8), None)
    with pytest.raises(NotImplementedError, match="attention mask"):
        check_self_attention("vidtome", "b", attn, x, None, torch.zeros(2, 1, 4, 4))


def test_self_attention_check_refuses_spatial_input_and_each_norm_alone():
    with pytest.raises(NotImplementedError, match="batch, tokens, channels"):
        check_self_attention("vidtome", "b", Attention(query_dim=8, heads=1, dim_head=8), torch.zeros(2, 8, 2, 2),
                             None, None)
    spatial = Attention(query_dim=32, heads=1, dim_head=8, spatial_norm_dim=32)
    assert spatial.spatial_norm is not None and spatial.group_norm is None
    with pytest.raises(NotImplementedError, match="spatial/group norm"):
        check_self_attention("vidtome", "b", spatial, torch.zeros(2, 4, 32), None, None)
    grouped = Attention(query_dim=8, heads=1, dim_head=8, norm_num_groups=2)
    assert grouped.group_norm is not None and grouped.spatial_norm is None
    with pytest.raises(NotImplementedError, match="spatial/group norm"):
        check_self_attention("vidtome", "b", grouped, torch.zeros(2, 4, 8), None, None)


def test_layout_check_needs_both_frames_and_branches():
    assert check_layout("vidtome", "b", 6, 3, 2) == (2, 3)
    with pytest.raises(RuntimeError, match="begin_chunk"):
        check_layout("vidtome", "b", 6, None, 2)
    with pytest.raises(RuntimeError, match="begin_chunk"):
        check_layout("vidtome", "b", 6, 3, None)
    with pytest.raises(RuntimeError, match="2 branches x 4 frames"):
        check_layout("vidtome", "b", 6, 4, 2)


class VideoLikeModel(torch.nn.Module):
    """Frame-attention blocks next to AnimateDiff-style motion modules (which hold a block and a plain layer)."""

    def __init__(self):
        super().__init__()
        self.down = torch.nn.ModuleDict({"block": BasicTransformerBlock(8, 1, 8)})
        self.motion_modules = torch.nn.ModuleList([
            torch.nn.ModuleDict({"block": BasicTransformerBlock(8, 1, 8), "proj": torch.nn.Linear(8, 8)})])
        self.up = torch.nn.ModuleDict({"block": BasicTransformerBlock(8, 1, 8)})


def test_frame_blocks_and_motion_blocks_split_the_transformer_blocks():
    model = VideoLikeModel()
    assert [name for name, _ in transformer_blocks(model)] == ["down.block", "up.block"]
    assert [name for name, _ in motion_blocks(model)] == ["motion_modules.0.block"]


def test_installing_on_a_model_without_transformer_blocks_is_refused():
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, layers_per_block=1)
    before = dict(vae.attn_processors)
    with pytest.raises(ValueError, match="no BasicTransformerBlock"):
        install_processors(vae, "test", object(), lambda name, block: {})
    assert dict(vae.attn_processors) == before


def test_temporal_processors_go_to_the_motion_blocks_and_frame_processors_to_the_others():
    # The tiny model's UNet with random weights, inflated by the tiny motion adapter (no pipeline to load).
    unet = motion_unet(UNet2DConditionModel(**tiny_config(64, 0, 1)["unet"]), MotionAdapter(**tiny_adapter_config()))
    stock = dict(unet.attn_processors)
    made: dict[str, tuple[str, torch.nn.Module, AttnProcessor2_0]] = {}

    def make(kind):
        def factory(name, block):
            made[f"{name}.attn1.processor"] = (kind, block, AttnProcessor2_0())
            return {"attn1": made[f"{name}.attn1.processor"][2]}
        return factory

    install_processors(unet, "test", object(), make("frame"), make_temporal=make("motion"))
    motion = {name for name, _ in motion_blocks(unet)}
    assert motion and {n.rsplit(".attn1", 1)[0] for n, m in made.items() if m[0] == "motion"} == motion
    assert {n.rsplit(".attn1", 1)[0] for n, m in made.items() if m[0] == "frame"} == {n for n, _ in transformer_blocks(unet)}
    after = unet.attn_processors
    for path, (kind, block, processor) in made.items():
        assert after[path] is processor
        assert unet.get_submodule(path.rsplit(".attn1", 1)[0]) is block   # each factory got its own block
    assert all(after[path] is stock[path] for path in stock if path not in made)


def heads(x: torch.Tensor, count: int) -> torch.Tensor:
    """(b, n, h*d) -> (b, h, n, d)."""
    b, n, _ = x.shape
    return x.view(b, n, count, -1).transpose(1, 2)


def test_project_heads_takes_keys_and_values_from_the_context():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    x, context = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    q, k, v = project_heads(attn, x, context)
    torch.testing.assert_close(q, heads(attn.to_q(x), 2))
    torch.testing.assert_close(k, heads(attn.to_k(context), 2))
    torch.testing.assert_close(v, heads(attn.to_v(context), 2))
    q, k, v = project_heads(attn := Attention(query_dim=8, heads=2, dim_head=4), x)   # self-attention
    torch.testing.assert_close(k, heads(attn.to_k(x), 2))


def test_project_heads_applies_the_query_and_key_norms():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4, qk_norm="layer_norm")
    for norm in (attn.norm_q, attn.norm_k):   # non-trivial affine parameters, so a skipped norm shows
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 5, 8)
    q, k, v = project_heads(attn, x)
    torch.testing.assert_close(q, attn.norm_q(heads(attn.to_q(x), 2)))
    torch.testing.assert_close(k, attn.norm_k(heads(attn.to_k(x), 2)))
    torch.testing.assert_close(v, heads(attn.to_v(x), 2))


def tiny_unet() -> torch.nn.Module:
    return UNet2DConditionModel(**tiny_config(64, 0, 1)["unet"])


def test_a_patch_keeps_its_state_and_restoring_calls_on_restore_once():
    unet = tiny_unet()
    stock = dict(unet.attn_processors)
    state, restored = object(), []
    patch = install_processors(unet, "mine", state, lambda name, block: {"attn1": AttnProcessor2_0()},
                               on_restore=lambda: restored.append(True))
    assert installed_patch(unet) is patch and patch.state is state and patch.owner == "mine"
    restore_processors(unet, owner="someone else")          # not theirs to restore
    assert installed_patch(unet) is patch and restored == []
    restore_processors(unet, owner="mine")
    assert installed_patch(unet) is None and restored == [True]
    assert dict(unet.attn_processors) == stock
    # Without an on_restore callback, restoring just puts the processors back.
    install_processors(unet, "mine", state, lambda name, block: {"attn1": AttnProcessor2_0()})
    restore_processors(unet)
    assert installed_patch(unet) is None and dict(unet.attn_processors) == stock


def test_attend_with_a_context_is_diffusers_cross_attention():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    attn.set_processor(AttnProcessor2_0())
    x, context = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    with torch.no_grad():
        torch.testing.assert_close(attend(attn, x, context), attn(x, encoder_hidden_states=context))


def _per_frame_pair(**attention) -> tuple[Attention, FrameAttentionState]:
    """A diffusers Attention module with random norms, running the per-frame mode of FrameAttnProcessor."""
    torch.manual_seed(21)
    attn = Attention(query_dim=32, heads=2, dim_head=16, **attention).eval()
    for module in attn.modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and module.weight is not None:
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_()
    state = FrameAttentionState("per-frame", MergeSettings())
    attn.set_processor(FrameAttnProcessor(state, ENCODER))
    return attn, state


@pytest.mark.parametrize("attention", [
    dict(residual_connection=True, rescale_output_factor=2.0, qk_norm="layer_norm"),
    dict(residual_connection=True, norm_num_groups=4, spatial_norm_dim=3),
    dict(cross_attention_dim=24, cross_attention_norm="layer_norm"),
], ids=["3d-residual-rescale-qknorm", "4d-groupnorm-spatialnorm", "cross-norm-mask"])
@torch.no_grad()
def test_per_frame_mode_is_diffusers_stock_attention_with_its_optional_parts(attention):
    """Per-frame attention is diffusers' AttnProcessor2_0 frame by frame, with each optional part of an Attention
    module (residual, output rescale, q/k norms, 4-D input with group and spatial norms, a normalised context
    with a mask), and it records the block's statistics: F*N tokens, each attending over its frame's N."""
    attn, state = _per_frame_pair(**attention)
    frames, g = 3, torch.Generator().manual_seed(22)
    state.begin_chunk(frames, BRANCHES, torch.Generator().manual_seed(0), latent_hw=(2, 3))
    kwargs = {}
    if "spatial_norm_dim" in attention:
        x = torch.randn(BRANCHES * frames, 32, 2, 3, generator=g)
        kwargs["temb"] = torch.randn(BRANCHES * frames, 3, 2, 3, generator=g)
    else:
        x = torch.randn(BRANCHES * frames, 6, 32, generator=g)
    if "cross_attention_dim" in attention:
        kwargs["encoder_hidden_states"] = torch.randn(BRANCHES * frames, 5, 24, generator=g)
        kwargs["attention_mask"] = torch.tensor([[0.0, 0.0, -1e4, 0.0, -1e4]]).repeat(BRANCHES * frames, 1)
    ours = attn(x, **kwargs)
    stock = AttnProcessor2_0()(attn, x, **kwargs)
    assert ours.shape == x.shape and torch.allclose(ours, stock, atol=1e-5)
    assert state.stats[ENCODER] == BlockStats(tokens=frames * 6, local=frames * 6, attended=6, downsample=0)


def test_merge_section_reaches_the_processors_setting_by_setting():
    """Every merging setting of the `merge` section is the processors' own (no default silently kept): each
    one set to a value other than its default. (`merge_mode` is no config setting: VidToMe's replace.)"""
    config = MergeConfig(local_ratio=0.3, global_ratio=0.6, global_merge=False, global_rand=0.25, target_stride=3,
                         align_batch=False, max_downsample=4, proportional_attention=True)
    defaults = asdict(MergeSettings())
    chosen = asdict(config.merge_settings())
    from_config = {name: getattr(config, name) for name in defaults if name != "merge_mode"}
    assert chosen == {**from_config, "merge_mode": "replace"}
    assert all(chosen[name] != defaults[name] for name in from_config)


@pytest.mark.parametrize("local_ratio, global_ratio, global_merge, stride, share", [
    (0.5, 0.2, True, 4, (1 - 0.5 * 0.75) * 1.8),   # 62.5% kept locally; the global set adds up to (1 - 0.2)
    (0.5, 0.2, False, 4, 1 - 0.5 * 0.75),
    (0.9, 0.8, False, 2, 1 - 0.9 * 0.5),
    (0.0, 0.0, True, 4, 2.0),                        # nothing merged: the chunk and a global set as large
])
def test_attended_share_counts_the_tokens_left_by_merging(local_ratio, global_ratio, global_merge, stride, share):
    """The memory estimate's share of the chunk's F*N tokens one query attends over under VidToMe merging,
    by hand: a local level keeps 1 - r(1 - 1/stride) (one destination frame per stride stays whole); global
    merging joins a set of the chunk's size of which 1 - global_ratio is left."""
    assert attended_share(local_ratio, global_ratio, global_merge, stride) == pytest.approx(share, rel=1e-12)
    config = MergeConfig(local_ratio=local_ratio, global_ratio=global_ratio, global_merge=global_merge,
                         target_stride=stride)
    method = VidToMe(EditorSettings(method="vidtome", method_settings=config))
    assert method.attended_share() == pytest.approx(share, rel=1e-12)


# --- merge_chunk on hand-made tokens ------------------------------------------------------------


def merging_state(settings: MergeSettings, frames: int, branches: int = BRANCHES,
                  generator: torch.Generator | None = None) -> tuple[FrameAttentionState, FrameAttnProcessor]:
    """A vidtome state in a fresh step with one chunk declared, and the processor of the ENCODER block."""
    state = FrameAttentionState("vidtome", settings)
    state.begin_step()
    state.begin_chunk(frames, branches, generator)
    return state, FrameAttnProcessor(state, ENCODER)


def chunk_tokens(frames: int, seed: int, branches: int = BRANCHES, per_frame: int = 6, channels: int = 8,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random ``(B, F*N, C)`` tokens of a chunk, frames joined."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(branches, frames * per_frame, channels, generator=g, dtype=dtype)


@pytest.mark.parametrize("local_ratio, frames, global_merge, refused", [
    (0.5, 2, False, True),    # local merging of two frames draws a destination frame
    (0.0, 2, True, True),     # global merging draws a side
    (0.0, 2, False, False),   # nothing merged: nothing to draw
    (0.5, 1, False, False),   # one frame has nothing to merge locally
])
def test_merge_chunk_needs_a_generator_exactly_when_it_has_something_to_draw(local_ratio, frames, global_merge,
                                                                             refused):
    """Without a generator a chunk is refused only when its merging draws (local merging of more than one
    frame, or global merging); otherwise every token stands for itself."""
    settings = MergeSettings(local_ratio=local_ratio, global_merge=global_merge)
    state, proc = merging_state(settings, frames)
    x = chunk_tokens(frames, seed=1)
    if refused:
        with pytest.raises(RuntimeError):
            proc.merge_chunk(x, frames, BRANCHES)
        return
    merged = proc.merge_chunk(x, frames, BRANCHES)
    assert merged.local.is_identity and merged.glob is None and merged.bias is None
    assert torch.equal(merged.tokens, x)


def test_merge_chunk_merges_locally_with_the_settings_stride_mode_and_batch_alignment():
    """Local merging of a chunk is merge.local_merge with the call's draws and every setting passed on: a
    stride of 2 (two levels for 4 frames), mean merging and one matching per branch."""
    settings = MergeSettings(local_ratio=0.5, target_stride=2, merge_mode="mean", align_batch=False,
                             global_merge=False)
    state, proc = merging_state(settings, 4, generator=torch.Generator().manual_seed(5))
    x = chunk_tokens(4, seed=2)
    merged = proc.merge_chunk(x, 4, BRANCHES)
    offsets = draw_local_offsets(4, 2, torch.Generator().manual_seed(5))
    expected = local_merge(x, 4, 0.5, 2, align_batch=False, offsets=offsets)
    assert torch.equal(merged.local.keep, expected.keep) and torch.equal(merged.local.back, expected.back)
    torch.testing.assert_close(merged.tokens, expected.merge(x, "mean"), rtol=0, atol=0)
    assert merged.glob is None and state.global_tokens == {}


@pytest.mark.parametrize("global_rand, global_is_src", [(0.0, False), (1.0, True)])
def test_a_second_call_meeting_a_global_set_draws_the_side_from_the_chunks_generator(global_rand, global_is_src):
    """Two UNet calls after one begin_chunk: the first leaves the block's global set, the second merges with it
    on a side drawn once from the state's generator with merge.global_rand (after the local offsets), in the
    settings' merge mode; the new global set is the second chunk's local tokens as the global matching left them."""
    settings = MergeSettings(local_ratio=0.5, global_ratio=0.5, global_rand=global_rand, merge_mode="mean")
    state, proc = merging_state(settings, 4, generator=torch.Generator().manual_seed(7))
    assert state.draws.global_is_src is None  # no global set when the chunk was declared
    first, second = chunk_tokens(4, seed=3), chunk_tokens(4, seed=4)
    proc.merge_chunk(first, 4, BRANCHES)
    merged = proc.merge_chunk(second, 4, BRANCHES)

    reference = torch.Generator().manual_seed(7)
    offsets = draw_local_offsets(4, 4, reference)
    assert draw_global_side(global_rand, reference) is global_is_src
    assert state.draws.global_is_src is global_is_src
    assert torch.equal(state.generator.get_state(), reference.get_state())  # one draw, from this generator

    previous = local_merge(first, 4, 0.5, offsets=offsets).merge(first, "mean")
    local = local_merge(second, 4, 0.5, offsets=offsets)
    tokens = local.merge(second, "mean")
    glob = global_merge(tokens, previous, 0.5, global_is_src=global_is_src)
    expected = glob.merge(torch.cat([tokens, previous], dim=1), "mean")
    assert torch.equal(merged.glob.back, glob.back)
    torch.testing.assert_close(merged.tokens, expected, rtol=0, atol=0)
    torch.testing.assert_close(state.global_tokens[ENCODER], glob.unmerge_first(expected, tokens.shape[1]),
                               rtol=0, atol=0)


@pytest.mark.parametrize("branches, channels", [(1, 8), (BRANCHES, 5)], ids=["branches", "channels"])
def test_merge_chunk_refuses_a_global_set_of_another_layout(branches, channels):
    """A global set left by chunks of another branch count, or another width, is refused (begin_step() was
    missed between runs), each mismatch on its own."""
    state, proc = merging_state(MergeSettings(), 4, generator=torch.Generator().manual_seed(0))
    proc.merge_chunk(chunk_tokens(4, seed=1), 4, BRANCHES)
    state.begin_chunk(4, branches, torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError):
        proc.merge_chunk(chunk_tokens(4, seed=2, branches=branches, channels=channels), 4, branches)


def test_a_global_set_of_another_dtype_is_merged_in_the_chunks_dtype():
    """The global set left by a float64 chunk joins a float32 chunk as float32: the attended tokens and the
    next global set keep the chunk's dtype."""
    state, proc = merging_state(MergeSettings(), 4, generator=torch.Generator().manual_seed(0))
    proc.merge_chunk(chunk_tokens(4, seed=1, dtype=torch.float64), 4, BRANCHES)
    state.begin_chunk(4, BRANCHES, torch.Generator().manual_seed(1))
    merged = proc.merge_chunk(chunk_tokens(4, seed=2), 4, BRANCHES)
    assert merged.glob is not None
    assert merged.tokens.dtype == torch.float32 and state.global_tokens[ENCODER].dtype == torch.float32


def test_proportional_attention_counts_a_global_set_left_without_it_as_single_tokens():
    """When the global set came from a call without proportional attention (no sizes recorded), each of its
    tokens stands for one token: the bias is log of the global matching's sizes over [local sizes | ones]."""
    settings = MergeSettings(local_ratio=0.5, global_ratio=0.5, global_rand=1.0)
    state, proc = merging_state(settings, 4, generator=torch.Generator().manual_seed(0))
    first, second = chunk_tokens(4, seed=1, channels=16), chunk_tokens(4, seed=2, channels=16)
    proc.merge_chunk(first, 4, BRANCHES)
    previous = state.global_tokens[ENCODER]
    assert state.global_sizes == {} and previous.shape[1] != previous.shape[2]
    settings.proportional_attention = True
    state.begin_chunk(4, BRANCHES, torch.Generator().manual_seed(1))
    merged = proc.merge_chunk(second, 4, BRANCHES)

    local = local_merge(second, 4, 0.5, offsets=state.draws.local_offsets)
    glob = global_merge(local.merge(second), previous, 0.5, global_is_src=True)
    sizes = glob.sizes(torch.cat([local.sizes(), torch.ones(1, previous.shape[1])], dim=1))
    assert sizes.shape[0] == 1 and sizes.sum() == second.shape[1] + previous.shape[1]
    torch.testing.assert_close(merged.bias, size_bias(sizes), rtol=0, atol=0)
    torch.testing.assert_close(state.global_sizes[ENCODER], local.sizes(), rtol=0, atol=0)


def test_proportional_attention_without_local_merging_biases_only_a_global_merge_in_the_tokens_dtype():
    """With nothing merged locally, a chunk without a global set attends without a bias (every token stands for
    itself), and a chunk merged with the global set gets the log-size bias in its own dtype (float64 here)."""
    settings = MergeSettings(local_ratio=0.0, global_ratio=0.5, global_rand=0.0, proportional_attention=True)
    state, proc = merging_state(settings, 2, generator=torch.Generator().manual_seed(0))
    first = chunk_tokens(2, seed=1, dtype=torch.float64)
    assert proc.merge_chunk(first, 2, BRANCHES).bias is None
    state.begin_chunk(2, BRANCHES, torch.Generator().manual_seed(1))
    second = chunk_tokens(2, seed=2, dtype=torch.float64)
    merged = proc.merge_chunk(second, 2, BRANCHES)

    glob = global_merge(second, first, 0.5, global_is_src=False)
    sizes = glob.sizes(torch.ones(1, second.shape[1] + first.shape[1], dtype=torch.float64))
    assert sizes.max() > 1  # the merged global tokens stand for more than one token
    assert merged.bias.dtype == torch.float64
    torch.testing.assert_close(merged.bias, size_bias(sizes), rtol=0, atol=1e-6)  # sizes are counted in float32


def test_merge_settings_accept_the_bounds_of_every_setting():
    """The ratios at 0 and at 1, the smallest target stride (2) and the smallest max_downsample (1) are valid."""
    MergeSettings(local_ratio=0.0, global_ratio=1.0, global_rand=0.0, target_stride=2, max_downsample=1).validate()
    MergeSettings(local_ratio=1.0, global_ratio=0.0, global_rand=1.0, target_stride=2).validate()
    with pytest.raises(ConfigError):
        MergeSettings(target_stride=1).validate()


# --- Several videos per call, and the patch on a UNet ------------------------------------------


@pytest.mark.parametrize("attention", [
    dict(residual_connection=True, norm_num_groups=4, spatial_norm_dim=3),
    dict(cross_attention_dim=24, cross_attention_norm="layer_norm"),
], ids=["4d-groupnorm-spatialnorm", "cross-norm-mask"])
@torch.no_grad()
def test_a_batch_of_videos_attends_every_video_with_the_calls_context_mask_and_temb(attention):
    """A FrameAttentionBatch hands each video's rows the call's context, mask and temb: per-frame attention of two
    videos in one call (all videos active until begin_call), then of the second alone, is diffusers' stock."""
    attn, _ = _per_frame_pair(**attention)
    videos = [FrameAttentionState("per-frame", MergeSettings()) for _ in range(2)]
    batch = FrameAttentionBatch(videos)
    attn.set_processor(FrameAttnProcessor(batch, ENCODER))
    videos[0].begin_chunk(2, BRANCHES)
    videos[1].begin_chunk(1, BRANCHES)
    g = torch.Generator().manual_seed(23)
    for rows in (6, 2):   # both videos' rows, then (begin_call([1])) the second's alone
        kwargs = {}
        if "spatial_norm_dim" in attention:
            x = torch.randn(rows, 32, 2, 3, generator=g)
            kwargs["temb"] = torch.randn(rows, 3, 2, 3, generator=g)
        else:
            x = torch.randn(rows, 6, 32, generator=g)
            kwargs["encoder_hidden_states"] = torch.randn(rows, 5, 24, generator=g)
            kwargs["attention_mask"] = torch.tensor([[0.0, -1e4, 0.0, 0.0, -1e4]]).repeat(rows, 1)
        torch.testing.assert_close(attn(x, **kwargs), AttnProcessor2_0()(attn, x, **kwargs), atol=1e-5, rtol=1e-5)
        batch.begin_call([1])


def test_apply_patch_videos_gives_every_video_the_settings_and_its_own_state(model):
    """One video is a batch too; every video's state holds the given settings; the patch is the batch's; the
    PnP blocks take query/key injection; restoring forgets every video's global tokens."""
    settings = MergeSettings(local_ratio=0.3, global_ratio=0.6, target_stride=3)
    batch = apply_patch_videos(model, "vidtome", 1, settings)
    assert len(batch.videos) == 1 and batch.videos[0].settings is settings
    batch = apply_patch_videos(model, "vidtome", 2, settings)
    assert installed_patch(model).state is batch and batch.active == batch.videos
    assert all(video.settings is settings for video in batch.videos) and batch.videos[0] is not batch.videos[1]
    processors = {path.rsplit(".attn1", 1)[0]: p for path, p in model.attn_processors.items() if ".attn1." in path}
    pnp = pnp_attention_blocks(model)
    assert pnp and {name for name, p in processors.items() if p.pnp_qk} == pnp
    assert all(p.state is batch for p in processors.values())
    for video in batch.videos:
        video.global_tokens["block"], video.global_sizes["block"] = torch.ones(1, 2, 3), torch.ones(1, 2)
    remove_patch(model)
    assert all(video.global_tokens == {} and video.global_sizes == {} for video in batch.videos)
    with pytest.raises(ValueError):
        apply_patch_videos(model, "vidtome", 0, settings)
    with pytest.raises(ConfigError):
        apply_patch_videos(model, "vidtome", 2, MergeSettings(target_stride=1))


def test_apply_patch_keeps_its_state_with_the_patch_and_remove_patch_leaves_another_owners_patch(model):
    state = apply_patch(model, "vidtome", MergeSettings())
    assert installed_patch(model).state is state
    state.global_tokens["block"] = torch.ones(1, 2, 3)
    remove_patch(model)
    assert installed_patch(model) is None and state.global_tokens == {}
    theirs = install_processors(model, "another method", object(), lambda name, block: {"attn1": AttnProcessor2_0()})
    remove_patch(model)
    assert installed_patch(model) is theirs
    restore_processors(model)


@torch.no_grad()
def test_the_patch_records_the_latent_size_at_every_call_positional_or_keyword(model):
    """The latent's h*w is recorded in every video's state whether the UNet gets its sample by position or by
    keyword; a non-square latent with as many channels as rows tells height, width and channels apart."""
    batch = apply_patch_videos(model, "per-frame", 2)
    for video in batch.videos:
        video.begin_chunk(1, 1)
    batch.begin_call([0])
    text = torch.zeros(1, 5, 32)
    model(sample=torch.zeros(1, 4, 4, 6), timestep=1, encoder_hidden_states=text)
    assert [video.latent_tokens for video in batch.videos] == [24, 24]
    model(torch.zeros(1, 4, 8, 2), 1, encoder_hidden_states=text)
    assert [video.latent_tokens for video in batch.videos] == [16, 16]


def test_vidtome_patch_videos_passes_the_merge_section_to_every_video(pipe):
    from vidbatch.engine.editor import VideoEditor

    config = MergeConfig(local_ratio=0.3, target_stride=3, proportional_attention=True)
    editor = VideoEditor(pipe, EditorSettings(method="vidtome", method_settings=config))
    method = VidToMe(EditorSettings(method="vidtome", method_settings=config))
    batch = method.patch_videos(editor, 2)
    try:
        assert [video.settings for video in batch.videos] == [config.merge_settings()] * 2
        assert all(video.method == "vidtome" for video in batch.videos)
    finally:
        method.unpatch(editor.unet)
    assert installed_patch(editor.unet) is None


# --- Declaring chunks, and what each mode accepts ----------------------------------------------


def test_begin_chunk_refuses_an_empty_chunk_and_records_the_latent_size():
    state = FrameAttentionState("vidtome", MergeSettings())
    for frames, branches in [(0, 2), (2, 0)]:
        with pytest.raises(ValueError):
            state.begin_chunk(frames, branches)
    state.begin_chunk(1, 1, latent_hw=(2, 3))   # the smallest chunk: one frame of one branch
    assert (state.num_frames, state.num_branches, state.latent_tokens) == (1, 1, 6)


@pytest.mark.parametrize("method, settings, frames", [
    ("extended", MergeSettings(), 4),                     # only vidtome draws
    ("vidtome", MergeSettings(local_ratio=0.0), 4),       # nothing merged locally, no global set yet
    ("vidtome", MergeSettings(), 1),                      # one frame: no local level
])
def test_begin_chunk_draws_nothing_when_nothing_is_merged(method, settings, frames):
    """The generator is left untouched (the next draws stay the reference's) when no local level and no global
    side is drawn; vidtome's draws then hold no offsets."""
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    state = FrameAttentionState(method, settings)
    state.begin_chunk(frames, BRANCHES, g)
    assert torch.equal(g.get_state(), before)
    assert state.draws is None if method != "vidtome" else state.draws.local_offsets == []


def test_merge_chunk_before_any_chunk_is_refused():
    proc = FrameAttnProcessor(FrameAttentionState("vidtome", MergeSettings()), ENCODER)
    with pytest.raises(RuntimeError):
        proc.merge_chunk(chunk_tokens(2, seed=0), 2, BRANCHES)


@torch.no_grad()
def test_vidtome_needs_the_latent_size_when_called_outside_the_unet():
    attn = attention_module()
    state = FrameAttentionState("vidtome", MergeSettings())
    attn.set_processor(FrameAttnProcessor(state, ENCODER))
    state.begin_chunk(2, BRANCHES, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):
        attn(torch.randn(BRANCHES * 2, 4, 32))


@pytest.mark.parametrize("method", ["extended", "vidtome"])
@torch.no_grad()
def test_joint_attention_modes_refuse_a_context_or_a_mask(method):
    attn = Attention(query_dim=32, cross_attention_dim=32, heads=2, dim_head=16).eval()
    state = FrameAttentionState(method, MergeSettings(global_merge=False))
    attn.set_processor(FrameAttnProcessor(state, ENCODER))
    state.begin_chunk(2, BRANCHES, torch.Generator().manual_seed(0), latent_hw=(2, 2))
    x = torch.randn(BRANCHES * 2, 4, 32)
    with pytest.raises(NotImplementedError):
        attn(x, encoder_hidden_states=torch.randn(BRANCHES * 2, 3, 32))
    with pytest.raises(NotImplementedError):
        attn(x, attention_mask=torch.zeros(BRANCHES * 2, 4))


@pytest.mark.parametrize("method", ["extended", "vidtome"])
@torch.no_grad()
def test_joint_attention_of_one_frame_keeps_the_residual_and_the_output_rescale(method):
    """One frame attended jointly is diffusers' stock attention, residual connection and output rescale included."""
    torch.manual_seed(6)
    attn = Attention(query_dim=32, heads=2, dim_head=16, residual_connection=True, rescale_output_factor=2.0).eval()
    state = FrameAttentionState(method, MergeSettings(global_merge=False))
    attn.set_processor(FrameAttnProcessor(state, ENCODER))
    state.begin_chunk(1, BRANCHES, torch.Generator().manual_seed(0), latent_hw=(2, 2))
    x = torch.randn(BRANCHES, 4, 32)
    torch.testing.assert_close(attn(x), AttnProcessor2_0()(attn, x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_video_of_a_batch_attends_per_frame_above_max_downsample_with_its_own_state():
    """In a batch of videos, a vidtome block too far below the latent grid is per-frame attention, with that
    video's state (its statistics; the stock output)."""
    attn = attention_module()
    video = FrameAttentionState("vidtome", MergeSettings(max_downsample=1))
    attn.set_processor(FrameAttnProcessor(FrameAttentionBatch([video]), ENCODER))
    video.begin_chunk(2, BRANCHES, torch.Generator().manual_seed(0), latent_hw=(4, 4))
    x = torch.randn(BRANCHES * 2, 4, 32)   # 4 tokens of a 16-token latent: downsampled 2x
    torch.testing.assert_close(attn(x), AttnProcessor2_0()(attn, x), atol=1e-5, rtol=1e-5)
    assert video.stats[ENCODER] == BlockStats(tokens=8, local=8, attended=4, downsample=2)


def test_a_processor_takes_no_query_key_injection_unless_built_for_it():
    """PnP injection reaches only the blocks built with pnp_qk (apply_patch marks the decoder's): by default a
    processor attends each branch with its own queries and keys."""
    torch.manual_seed(5)
    x = torch.randn(BRANCHES * 3, 4, 32)
    attn = attention_module()
    state = FrameAttentionState("extended", MergeSettings())
    attn.set_processor(FrameAttnProcessor(state, DECODER))
    state.begin_chunk(3, BRANCHES, inject_qk=True)
    with torch.no_grad():
        _, plain = call("extended", x, DECODER, inject=False)
        torch.testing.assert_close(attn(x), plain, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_per_frame_mode_takes_a_mask_per_query_and_a_cross_norm_module_without_context():
    """Per-frame attention is the stock processor with a (batch, queries, keys) mask too, and with a module that
    normalises contexts but is called without one (its norm then unused)."""
    attn, state = _per_frame_pair(cross_attention_dim=32, cross_attention_norm="layer_norm")
    g = torch.Generator().manual_seed(24)
    x, context = torch.randn(BRANCHES * 2, 6, 32, generator=g), torch.randn(BRANCHES * 2, 5, 32, generator=g)
    state.begin_chunk(2, BRANCHES)
    mask = torch.where(torch.rand(BRANCHES * 2, 6, 5, generator=g) < 0.3, -1e4, 0.0)
    stock = AttnProcessor2_0()
    torch.testing.assert_close(attn(x, encoder_hidden_states=context, attention_mask=mask),
                               stock(attn, x, encoder_hidden_states=context, attention_mask=mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn(x), stock(attn, x), atol=1e-5, rtol=1e-5)
