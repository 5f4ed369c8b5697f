"""The editing engine on the tiny model: chunking, determinism, inversion through the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidbatch.engine.editor import EditorSettings, VideoEditor, chunk_schedule, sample_seed
from vidbatch.engine.inversion_cache import InversionCache
from vidbatch.models.loading import load_pipeline, model_fingerprint


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


def frames_of(seed: int, count: int = 5, size: int = 32) -> np.ndarray:
    """A smooth moving texture: (count, size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size // 4, size // 4, 3)).astype(np.float32)
    big = np.kron(base, np.ones((8, 8, 1)))
    return np.stack([np.roll(big, i, axis=1)[:size, :size] for i in range(count)]).astype(np.uint8)


def count_unet_calls(unet) -> list[int]:
    calls = [0]
    unet.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("order", ["seq", "rand", "mix"])
@pytest.mark.parametrize("frames, chunk", [(1, 4), (4, 4), (5, 4), (17, 4), (64, 5), (9, 1)])
def test_chunk_schedule_covers_every_frame_once_in_consecutive_runs(order, frames, chunk):
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        chunks = chunk_schedule(frames, chunk, order, generator)
        assert sorted(torch.cat(chunks).tolist()) == list(range(frames))
        for c in chunks:
            assert 1 <= len(c) <= chunk
            assert torch.equal(c, torch.arange(int(c[0]), int(c[0]) + len(c)))


def test_chunk_borders_move_between_steps_with_rand():
    generator = torch.Generator().manual_seed(0)
    firsts = {len(sorted(chunk_schedule(16, 4, "rand", generator), key=lambda c: int(c[0]))[0]) for _ in range(20)}
    assert len(firsts) > 1
    assert {len(c) for c in chunk_schedule(16, 4, "seq", generator)} == {4}


def test_sample_seed_depends_on_every_part():
    assert sample_seed(0, "a", "x") == sample_seed(0, "a", "x")
    assert len({sample_seed(0, "a", "x"), sample_seed(1, "a", "x"), sample_seed(0, "b", "x"),
                sample_seed(0, "a", "y")}) == 4


def test_edit_is_deterministic_and_seed_matters_with_eta(pipe):
    editor = VideoEditor(pipe, EditorSettings(steps=3, eta=0.5, guidance=5.0))
    frames = frames_of(0)
    a = editor.edit(frames, "a texture", [("e", "a painting")], seed=1, key="k").frames["e"]
    b = editor.edit(frames, "a texture", [("e", "a painting")], seed=1, key="k").frames["e"]
    c = editor.edit(frames, "a texture", [("e", "a painting")], seed=2, key="k").frames["e"]
    assert a.shape == frames.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_chunk_size_does_not_change_per_frame_output(pipe):
    frames = frames_of(1)
    outputs = [VideoEditor(pipe, EditorSettings(steps=2, chunk_size=size, inversion_batch=size)).edit(
        frames, "x", [("e", "y")], seed=0, key="k").frames["e"] for size in (1, 5)]
    assert np.abs(outputs[0].astype(int) - outputs[1].astype(int)).max() <= 1


def test_inversion_cache_hit_equals_miss_and_skips_the_inversion(pipe, tmp_path):
    cache = InversionCache(tmp_path / "cache")
    editor = VideoEditor(pipe, EditorSettings(steps=3), cache, model_fingerprint(pipe))
    frames = frames_of(2)
    calls = count_unet_calls(pipe.unet)
    first = editor.edit(frames, "src", [("e", "dst")], seed=0, key="k")
    miss_calls = calls[0]
    calls[0] = 0
    second = editor.edit(frames, "src", [("e", "dst")], seed=0, key="other-name")
    assert (first.inversion_cache, second.inversion_cache) == ("miss", "hit")
    assert calls[0] == 3 * 2                   # the hit ran only the denoising calls (3 steps x 2 chunks)
    assert miss_calls == calls[0] + 3          # the miss also inverted (3 steps x 1 batch of 5 frames)
    editor.edit(frames, "another source prompt", [("e", "dst")], seed=0, key="k")
    assert len(cache.entries()) == 2           # the prompt is part of the key
    again = VideoEditor(pipe, EditorSettings(steps=3), cache, model_fingerprint(pipe))
    third = again.edit(frames, "src", [("e", "dst")], seed=0, key="k")
    assert third.inversion_cache == "hit"
    assert np.array_equal(first.frames["e"], third.frames["e"])
    assert VideoEditor(pipe, EditorSettings(steps=4), cache, model_fingerprint(pipe)).edit(
        frames, "src", [("e", "dst")], seed=0, key="k").inversion_cache == "miss"


def test_corrupt_cache_entry_is_recomputed(pipe, tmp_path, caplog):
    cache = InversionCache(tmp_path / "cache")
    editor = VideoEditor(pipe, EditorSettings(steps=2), cache, model_fingerprint(pipe))
    frames = frames_of(3)
    first = editor.edit(frames, "src", [("e", "dst")], seed=0, key="k")
    (entry,) = cache.entries()
    data = bytearray(entry.path.read_bytes())
    data[-10:] = b"\x00" * 10
    entry.path.write_bytes(bytes(data))
    second = editor.edit(frames, "src", [("e", "dst")], seed=0, key="k")
    assert second.inversion_cache == "miss"
    assert np.array_equal(first.frames["e"], second.frames["e"])
    assert editor.edit(frames, "src", [("e", "dst")], seed=0, key="k").inversion_cache == "hit"


def test_cache_command_lists_verifies_and_prunes(pipe, tmp_path, capsys):
    from conftest import run_cli

    cache = InversionCache(tmp_path / "cache")
    editor = VideoEditor(pipe, EditorSettings(steps=2), cache, model_fingerprint(pipe))
    for seed in range(3):
        editor.edit(frames_of(seed), "src", [("e", "dst")], seed=0, key="k")
    editor.edit(frames_of(0), "src", [("e", "dst")], seed=0, key="k")   # one hit
    assert run_cli("cache", "ls", "--dir", tmp_path / "cache") == 0
    assert "3 entries" in capsys.readouterr().out
    assert run_cli("cache", "ls", "--dir", tmp_path / "cache", "--json") == 0
    rows = [__import__("json").loads(l) for l in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and sum(r["hits"] for r in rows) == 1
    assert run_cli("cache", "verify", "--dir", tmp_path / "cache") == 0
    victim = cache.entries()[0].path
    victim.write_bytes(victim.read_bytes()[:-7])
    assert run_cli("cache", "verify", "--dir", tmp_path / "cache") == 1
    assert "1 bad" in capsys.readouterr().out
    one = max(e.size_bytes for e in cache.entries())
    assert run_cli("cache", "prune", "--dir", tmp_path / "cache", "--max-gb", str(one / 1e9)) == 0
    assert len(cache.entries()) == 1
    assert run_cli("cache", "prune", "--dir", tmp_path / "cache") == 2


# --- inversion finer than the edit ----------------------------------------------------------------

METHODS = ["per-frame", "extended", "vidtome", "tokenflow", "vid2vid-zero"]


@pytest.mark.parametrize("method", METHODS)
def test_finer_inversion_keeps_the_latents_at_the_edit_timesteps(pipe, method, monkeypatch):
    """`inversion.steps=20, edit.steps=10` edits with every method, and what the denoiser gets is the
    20-step inversion's latents at the 10 edit timesteps (as TokenFlow inverts with 500 steps and keeps
    the latents of its 50 edit steps)."""
    from vidbatch.engine.methods.vid2vid_zero import Vid2VidZeroConfig

    frames = frames_of(4)
    extra = {"method_settings": Vid2VidZeroConfig(null_steps=1)} if method == "vid2vid-zero" else {}
    editor = VideoEditor(pipe, EditorSettings(steps=10, inversion_steps=20, method=method, chunk_size=3, **extra))
    given = []
    real = VideoEditor.denoise

    def spy(self, inversion, *args, **kwargs):
        given.append(inversion)
        return real(self, inversion, *args, **kwargs)

    monkeypatch.setattr(VideoEditor, "denoise", spy)
    out = editor.edit(frames, "src", [("e", "dst")], seed=0, key="k").frames["e"]
    assert out.shape == frames.shape
    (inversion,) = given
    # A direct 20-step inversion (vid2vid-zero inverts with the empty prompt) at the edit's timesteps.
    direct = VideoEditor(pipe, EditorSettings(steps=20)).invert(frames, "" if method == "vid2vid-zero" else "src")
    edit_timesteps = VideoEditor(pipe, EditorSettings(steps=10)).timesteps_for(10)
    rows = [direct.timesteps.tolist().index(t) for t in edit_timesteps.tolist()]
    assert rows == list(range(1, 20, 2))
    assert torch.equal(inversion.timesteps, edit_timesteps)
    assert torch.equal(inversion.trajectory, direct.trajectory[rows])
    if method == "vid2vid-zero":   # one null embedding per edit step, optimised towards those latents
        assert inversion.extras["null_embeddings"].shape[0] == 10


def test_finer_inversion_through_the_cache_hit_equals_miss(pipe, tmp_path):
    cache = InversionCache(tmp_path / "cache")
    frames = frames_of(5)

    def edit(steps, inversion_steps):
        editor = VideoEditor(pipe, EditorSettings(steps=steps, inversion_steps=inversion_steps, method="tokenflow"),
                             cache, model_fingerprint(pipe))
        return editor.edit(frames, "src", [("e", "dst")], seed=0, key="k")

    miss, hit = edit(10, 20), edit(10, 20)
    assert (miss.inversion_cache, hit.inversion_cache) == ("miss", "hit")
    assert np.array_equal(miss.frames["e"], hit.frames["e"])
    # The entry holds the edit's timesteps only: other edit steps (or inversion steps) are other entries.
    assert edit(5, 20).inversion_cache == "miss"
    assert edit(10, None).inversion_cache == "miss"
    assert len(cache.entries()) == 3


def test_inversion_steps_that_do_not_nest_the_edit_steps_are_a_clear_error(pipe):
    from vidbatch.core.errors import ConfigError

    frames = frames_of(6, count=2)
    with pytest.raises(ConfigError, match=r"inversion.steps \(30\).*edit.steps \(20\).*timestep_spacing.*40"):
        VideoEditor(pipe, EditorSettings(steps=20, inversion_steps=30)).edit(frames, "s", [("e", "d")], seed=0, key="k")
    with pytest.raises(ConfigError, match=r"inversion.steps \(5\) must be at least edit.steps \(10\)"):
        VideoEditor(pipe, EditorSettings(steps=10, inversion_steps=5)).edit(frames, "s", [("e", "d")], seed=0, key="k")


def test_auto_chunk_counts_the_source_branch_of_each_method(pipe, monkeypatch):
    """The memory estimate sees the branches each method runs: the source branch with PnP, TokenFlow
    (every step) and vid2vid-zero (its prompt-to-prompt steps)."""
    from vidbatch.engine import memory
    from vidbatch.engine.methods.vid2vid_zero import Vid2VidZeroConfig

    seen = []
    real = memory.pick_chunk_size
    monkeypatch.setattr(memory, "pick_chunk_size", lambda n, b, **kw: seen.append(kw["branches"]) or real(n, b, **kw))
    cases = [({}, 2), ({"control": "pnp"}, 3), ({"method": "tokenflow"}, 3), ({"method": "vid2vid-zero"}, 3),
             ({"method": "vid2vid-zero", "method_settings": Vid2VidZeroConfig(p2p="none")}, 2)]
    for settings, branches in cases:
        seen.clear()
        VideoEditor(pipe, EditorSettings(chunk_size="auto", memory_budget_bytes=2**30, **settings)).chunk_size_for(8, (4, 4))
        assert seen == [branches], settings


def test_mix_order_is_vidtomes_mix_4():
    """VidToMe's `get_chunks` with `mix-4`: a random quarter of the chunks first, then the rest in
    order (forwards or backwards), starting from the end nearer the last random chunk."""
    generator = torch.Generator().manual_seed(1)
    directions, first_picks = set(), set()
    for _ in range(40):
        chunks = chunk_schedule(32, 4, "mix", generator)      # 8 or 9 chunks: 2 visited at random
        count = len(chunks) // 4
        starts = [int(c[0]) for c in chunks]
        rest = starts[count:]
        assert rest == sorted(rest) or rest == sorted(rest, reverse=True)
        directions.add(rest == sorted(rest))
        first_picks.add(tuple(starts[:count]))
        # The ordered part starts at the end nearer the last random chunk.
        by_position = sorted(starts)
        last_random = by_position.index(starts[count - 1])
        remaining = [by_position.index(s) for s in rest]
        assert abs(remaining[0] - last_random) <= abs(remaining[-1] - last_random)
    assert directions == {True, False} and len(first_picks) > 5


def test_rand_order_is_a_full_permutation_and_short_clips_are_cut_too():
    generator = torch.Generator().manual_seed(2)
    orders = {tuple(int(c[0]) for c in chunk_schedule(32, 4, "rand", generator)) for _ in range(30)}
    assert any(list(o) not in (sorted(o), sorted(o, reverse=True)) for o in orders)
    # As in the reference, a clip no longer than a chunk is still cut at a random border.
    assert {len(chunk_schedule(4, 4, "mix", generator)) for _ in range(30)} == {1, 2}
