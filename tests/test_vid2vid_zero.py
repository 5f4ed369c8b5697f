"""vid2vid-zero (`edit.method: vid2vid-zero`): null-text inversion, cross-frame attention, prompt-to-prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from vidbatch.config import Vid2VidZeroConfig, load_config
from vidbatch.editing import EditorSettings, VideoEditor
from vidbatch.errors import ConfigError
from vidbatch.inversion_cache import InversionCache
from vidbatch.models import model_fingerprint
from vidbatch.vid2vid_zero import (
    CrossFrameProcessor,
    PromptToPromptProcessor,
    Vid2VidZeroState,
    optimise_null_embeddings,
    p2p_mode,
    refine_mapping,
    replace_maps,
)
from conftest import moving_frames

pytestmark = pytest.mark.usefixtures("one_thread")

OFF = dict(null_steps=0, cross_frame=False, p2p="none")


def editor(pipe, cache=None, **settings) -> VideoEditor:
    base = dict(steps=3, chunk_size=3, chunk_order="mix", method="vid2vid-zero", control="none")
    v2v = settings.pop("v2v", {})
    base.update(settings)
    return VideoEditor(pipe, EditorSettings(vid2vid_zero=Vid2VidZeroConfig(**v2v), **base), cache,
                       model_fingerprint(pipe) if cache is not None else None)


def edit(pipe, prompt="a painting", source="a texture", frames=None, **settings) -> np.ndarray:
    ed = editor(pipe, **settings)
    frames = moving_frames() if frames is None else frames
    return ed.edit(frames, source, [("e", prompt)], seed=0, key="k").frames["e"]


# --- prompt-to-prompt: pure functions ------------------------------------------------------------


def test_p2p_mode_replace_for_equal_token_counts_else_refine():
    assert p2p_mode("auto", [1, 5, 6, 2], [1, 5, 7, 2]) == "replace"
    assert p2p_mode("auto", [1, 5, 6, 2], [1, 5, 7, 8, 2]) == "refine"
    assert p2p_mode("none", [1, 2], [1, 3, 2]) == "none"
    with pytest.raises(ConfigError, match="same token count"):
        p2p_mode("replace", [1, 2], [1, 3, 2])
    with pytest.raises(ConfigError, match="vid2vid_zero.p2p"):
        p2p_mode("swap", [1, 2], [1, 2])


def test_refine_mapping_aligns_the_shared_words():
    source = [100, 10, 20, 30, 101]             # <start> a cat sitting <end>
    edited = [100, 10, 25, 20, 30, 101]          # <start> a black cat sitting <end>
    mapper, alphas = refine_mapping(source, edited, length=10)
    assert mapper[:6].tolist() == [0, 1, 2, 2, 3, 4] and alphas[:6].tolist() == [1, 1, 0, 1, 1, 1]
    # Padding: the edit's k-th padding position takes the source's k-th, up to the last position.
    assert mapper[6:].tolist() == [5, 6, 7, 8] and alphas[6:].tolist() == [1, 1, 1, 1]
    same, ones = refine_mapping(source, source, length=10)
    assert torch.equal(same, torch.arange(10)) and bool((ones == 1).all())


def test_replace_maps():
    g = torch.Generator().manual_seed(0)
    source, edited = torch.rand(2, 4, 6, generator=g), torch.rand(2, 4, 6, generator=g)
    assert torch.equal(replace_maps(source, edited, "replace"), source)
    mapper = torch.tensor([0, 1, 1, 2, 3, 4])
    alphas = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    out = replace_maps(source, edited, "refine", mapper, alphas)
    assert torch.equal(out[..., 2], edited[..., 2])            # a new word keeps its own map
    assert torch.equal(out[..., 3], source[..., 2])            # a shared word takes its source column


# --- processors ------------------------------------------------------------------------------------

ENCODER = "down_blocks.0.attentions.0.transformer_blocks.0"


def cross_attention() -> Attention:
    torch.manual_seed(3)
    return Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=16).eval()


@torch.no_grad()
def test_p2p_replace_with_identical_branches_changes_nothing_and_otherwise_acts():
    attn = cross_attention()
    state = Vid2VidZeroState(p2p="replace", p2p_active=True)
    attn.set_processor(PromptToPromptProcessor(state, ENCODER, AttnProcessor2_0()))
    g = torch.Generator().manual_seed(1)
    frames, n = 2, 5
    x = torch.randn(3, frames, n, 32, generator=g)      # [source, uncond, cond]
    text = torch.randn(3, 1, 7, 16, generator=g).expand(3, frames, 7, 16).clone()
    x[2], text[2] = x[0], text[0]                       # the edit branch is the source branch
    state.set_frames(torch.arange(frames))
    state.begin_chunk(frames, 3)
    flat_x, flat_text = x.reshape(-1, n, 32), text.reshape(-1, 7, 16)
    controlled = attn(flat_x, flat_text)
    stock = AttnProcessor2_0()(attn, flat_x, flat_text)
    assert torch.allclose(controlled, stock, atol=1e-5)
    # With another edit prompt the edit branch's maps are the source's: its output changes.
    text[2] = torch.randn(frames, 7, 16, generator=g)
    flat_text = text.reshape(-1, 7, 16)
    controlled, stock = attn(flat_x, flat_text), AttnProcessor2_0()(attn, flat_x, flat_text)
    assert torch.allclose(controlled[:2 * frames], stock[:2 * frames], atol=1e-5)   # source, uncond untouched
    assert (controlled[2 * frames:] - stock[2 * frames:]).abs().max() > 1e-3
    # The controlled output is exactly the source's maps applied to the edit prompt's values.
    q = attn.to_q(x[2].reshape(-1, n, 32)).view(frames, n, 2, 16).transpose(1, 2)
    k0 = attn.to_k(text[0]).view(frames, 7, 2, 16).transpose(1, 2)
    v2 = attn.to_v(text[2]).view(frames, 7, 2, 16).transpose(1, 2)
    maps = (q @ k0.transpose(-1, -2) / 4.0).softmax(-1)
    expected = attn.to_out[0]((maps @ v2).transpose(1, 2).reshape(frames, n, 32))
    assert torch.allclose(controlled[2 * frames:], expected, atol=1e-5)


def self_attention() -> Attention:
    torch.manual_seed(4)
    return Attention(query_dim=32, heads=2, dim_head=16).eval()


def attend_over(attn: Attention, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    b = queries.shape[0]

    def heads(t):
        return t.view(b, -1, 2, 16).transpose(1, 2)

    q, k, v = heads(attn.to_q(queries)), heads(attn.to_k(context)), heads(attn.to_v(context))
    out = F.scaled_dot_product_attention(q, k, v)
    return attn.to_out[0](out.transpose(1, 2).reshape(b, -1, 32))


@torch.no_grad()
def test_first_and_previous_frame_attention_carries_across_chunks():
    attn = self_attention()
    state = Vid2VidZeroState(cross_frame=True)
    attn.set_processor(CrossFrameProcessor(state, ENCODER, dense=False))
    g = torch.Generator().manual_seed(2)
    branches, frames, n = 2, 5, 4
    video = torch.randn(branches, frames, n, 32, generator=g)

    def run(chunk: list[int]) -> torch.Tensor:
        state.set_frames(torch.tensor(chunk))
        state.begin_chunk(len(chunk), branches)
        return attn(video[:, chunk].reshape(-1, n, 32)).reshape(branches, len(chunk), n, 32)

    state.begin_step()
    whole = run([0, 1, 2, 3, 4])
    state.begin_step()
    pieces = torch.cat([run([0, 1]), run([2, 3, 4])], dim=1)
    assert torch.allclose(whole, pieces, atol=1e-6)
    for f in range(frames):   # frame f attends over frame 0 and frame f-1 (frame 0: itself twice)
        context = torch.cat([video[:, 0], video[:, max(f - 1, 0)]], dim=1)
        assert torch.allclose(whole[:, f], attend_over(attn, video[:, f], context), atol=1e-5)
    state.begin_step()
    with pytest.raises(RuntimeError, match="in order"):
        run([2, 3])


# --- through the engine ------------------------------------------------------------------------------


def test_everything_off_equals_per_frame_editing(pipe):
    """Comparable conventions: with null_steps 0 the unconditional embedding is the empty prompt's, so the
    per-frame edit gets negative_prompt ''; invert_with_prompt makes vid2vid-zero invert with the source
    prompt like the other methods (by default it inverts with the empty prompt, as vid2vid-zero does)."""
    off = edit(pipe, v2v=dict(OFF, invert_with_prompt=True), negative_prompt="ignored by vid2vid-zero")
    per_frame = edit(pipe, method="per-frame", negative_prompt="")
    assert np.abs(off.astype(int) - per_frame.astype(int)).max() <= 1
    inverted_empty = edit(pipe, v2v=OFF)
    assert np.abs(inverted_empty.astype(int) - per_frame.astype(int)).max() > 1   # the check can fail
    assert np.array_equal(inverted_empty, edit(pipe, method="per-frame", negative_prompt="", source=""))


def test_deterministic_and_sparse_attention_does_not_depend_on_the_chunks(pipe):
    settings = dict(v2v=dict(null_steps=1, dense_blocks=[]), prompt="a black painting")
    a = edit(pipe, **settings)
    assert np.array_equal(a, edit(pipe, **settings))
    # First/previous-frame attention sees across chunk borders, so the chunk size only changes batching.
    b = edit(pipe, **settings, chunk_size=6)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    dense = edit(pipe, **{**settings, "v2v": dict(null_steps=1)})   # dense blocks: attention over the chunk
    assert np.abs(a.astype(int) - dense.astype(int)).max() > 1


def test_null_text_inversion_reduces_the_reconstruction_error(pipe):
    ed = editor(pipe, steps=4, guidance=7.5, v2v=dict(OFF))
    inversion = ed.invert(moving_frames(4), "")

    def reconstruction_error(nulls: torch.Tensor) -> float:
        inversion.extras["null_embeddings"] = nulls
        out = ed.denoise(inversion, "a texture", 0, "a texture")   # guided, with the source prompt
        return float((out.cpu() - inversion.clean).pow(2).mean())

    plain = optimise_null_embeddings(ed, inversion, "a texture", steps=0, lr=0.01)
    tuned = optimise_null_embeddings(ed, inversion, "a texture", steps=10, lr=0.01)
    assert plain.shape == tuned.shape == (4, 77, 32)
    assert torch.equal(plain[0], ed.text_embedding("")[0])
    before, after = reconstruction_error(plain), reconstruction_error(tuned)
    assert after < 0.8 * before, (before, after)   # measured here: 3.43 -> 2.23


def test_p2p_replace_with_identical_prompts_changes_nothing(pipe):
    """One step (x is the inverted latent the source branch runs on): identical prompts give identical maps."""
    one = dict(steps=1, v2v=dict(null_steps=0, cross_replace=1.0))
    same = dict(prompt="a photo", source="a photo")
    replaced = edit(pipe, **same, **{**one, "v2v": dict(one["v2v"], p2p="replace")})
    plain = edit(pipe, **same, **{**one, "v2v": dict(one["v2v"], p2p="none")})
    assert np.abs(replaced.astype(int) - plain.astype(int)).max() <= 1
    other = dict(prompt="a painting", source="a photo")  # the same token count (4): replace acts
    assert not np.array_equal(edit(pipe, **other, **{**one, "v2v": dict(one["v2v"], p2p="replace")}),
                              edit(pipe, **other, **{**one, "v2v": dict(one["v2v"], p2p="none")}))


def test_null_embeddings_go_through_the_inversion_cache(pipe, tmp_path):
    cache = InversionCache(tmp_path / "cache")
    settings = dict(steps=2, v2v=dict(null_steps=1))
    frames = moving_frames(3)
    first = editor(pipe, cache, **settings).edit(frames, "a texture", [("e", "a painting")], seed=0, key="k")
    second = editor(pipe, cache, **settings).edit(frames, "a texture", [("e", "a painting")], seed=0, key="k")
    assert (first.inversion_cache, second.inversion_cache) == ("miss", "hit")
    assert np.array_equal(first.frames["e"], second.frames["e"])
    (entry,) = cache.entries()
    stored = cache.load(entry.key)
    assert stored["null_embeddings"].shape == (2, 77, 32)
    # The null-text settings and the guidance are part of the key.
    for changed in (dict(steps=2, v2v=dict(null_steps=2)), dict(steps=2, guidance=3.0, v2v=dict(null_steps=1))):
        assert editor(pipe, cache, **changed).edit(frames, "a texture", [("e", "a painting")], seed=0,
                                                   key="k").inversion_cache == "miss"
    assert len(cache.entries()) == 3


def test_config_reaches_the_engine():
    from vidbatch.lightning_module import VideoEditModule

    config = load_config(None, ["edit.method=vid2vid-zero", "vid2vid_zero.null_steps=3", "vid2vid_zero.p2p=refine",
                                "vid2vid_zero.dense_blocks=[mid_block]"])
    settings = VideoEditModule.editor_settings(config).vid2vid_zero
    assert (settings.null_steps, settings.p2p, settings.dense_blocks) == (3, "refine", ["mid_block"])
    with pytest.raises(ConfigError, match="vid2vid_zero.p2p"):
        load_config(None, ["vid2vid_zero.p2p=swap"])


def test_cli_run_edits_with_vid2vid_zero_through_the_cache_and_metrics(tmp_path, clips):
    import json

    from conftest import FAST, TINY, run_cli, video_sample, write_shard

    write_shard(tmp_path / "in" / "part-000000.tar", [video_sample("pattern", clips["pattern"])])
    args = ["--set", "edit.method=vid2vid-zero", "--set", "merge.chunk_size=3", "--set", "metrics.clip_model=none",
            "--set", f"inversion.cache_dir={tmp_path / 'cache'}"]   # start cold, whatever ran before
    for s in FAST:
        args += ["--set", s]
    for run in ("first", "second"):
        code = run_cli("run", TINY, "--input", tmp_path / "in" / "part-000000.tar", "--output", tmp_path / run, *args)
        assert code == 0
        (row,) = [json.loads(line) for line in (tmp_path / run / "stats" / "part-000000.jsonl").read_text().splitlines()]
        assert row["status"] == "ok", row["error"]
        assert row["inversion_cache"] == ("miss" if run == "first" else "hit")   # null embeddings cached too
        assert row["metrics"]["warp_error"] is not None and row["metrics"]["interp_psnr"] is not None


def test_a_failing_edit_leaves_the_unet_unpatched(pipe):
    with pytest.raises(ConfigError, match="same token count"):
        edit(pipe, prompt="a black painting", source="a photo", v2v=dict(p2p="replace", null_steps=0))
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    edit(pipe, v2v=dict(null_steps=0), steps=2)
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
