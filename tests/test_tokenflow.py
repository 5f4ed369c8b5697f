"""TokenFlow (`edit.method: tokenflow`): its pure functions, its processor and its invariants through the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from vidbatch.batch.edits import editor_settings
from vidbatch.engine.methods import tokenflow
from vidbatch.config.schema import load_config
from vidbatch.engine.methods.tokenflow import TokenFlowConfig
from vidbatch.engine.editor import EditorSettings, VideoEditor

from vidbatch.engine.methods.tokenflow import (
    TokenFlowProcessor,
    TokenFlowState,
    keyframe_attention,
    keyframe_neighbours,
    nearest_tokens,
    propagate,
    sample_keyframes,
)
from conftest import moving_frames


@pytest.fixture(scope="module")
def inversion(pipe):
    """One inversion for every engine test (it does not depend on the method)."""
    return VideoEditor(pipe, EditorSettings(steps=3)).invert(moving_frames(), "a texture")


def latents(pipe, inversion, seed=0, **settings):
    base = dict(steps=3, chunk_size=3, chunk_order="mix")
    base.update(settings)
    return VideoEditor(pipe, EditorSettings(**base)).denoise(inversion, "a painting", seed, "a texture")


def close(a, b, atol=1e-4) -> bool:
    return bool(torch.allclose(a, b, atol=atol, rtol=1e-4))


# --- pure functions ---------------------------------------------------------------------------


def test_sample_keyframes_one_per_group_and_seeded():
    seen = set()
    for seed in range(40):
        keys = sample_keyframes(19, 8, torch.Generator().manual_seed(seed))
        assert keys.dtype == torch.int64 and len(keys) == 3
        assert 0 <= keys[0] < 8 <= keys[1] < 16 <= keys[2] < 19   # the short last group too
        seen.add(tuple(keys.tolist()))
    assert len(seen) > 10   # really random
    a = sample_keyframes(19, 8, torch.Generator().manual_seed(7))
    assert torch.equal(a, sample_keyframes(19, 8, torch.Generator().manual_seed(7)))
    assert torch.equal(sample_keyframes(5, 1), torch.arange(5))  # batch size 1: every frame


def test_keyframe_neighbours_previous_next_and_weights():
    keys = torch.tensor([2, 9])
    first, second, weight = keyframe_neighbours(torch.arange(12), keys, "sigmoid")
    # Frames 0-2 and 9-11 have one keyframe (own, or the nearest at the ends), weight 1.
    for f in (0, 1, 2):
        assert (first[f], second[f], weight[f]) == (0, 0, 1.0)
    for f in (9, 10, 11):
        assert (first[f], second[f], weight[f]) == (1, 1, 1.0)
    # Frame 4: previous keyframe 2 (d=2) is nearer than 9 (d=5): sigmoid(5/7) on it.
    assert (first[4], second[4]) == (0, 1)
    assert weight[4] == pytest.approx(torch.sigmoid(torch.tensor(5 / 7)).item())
    # Frame 7: the next keyframe (d=2) is nearer.
    assert (first[7], second[7]) == (1, 0)
    assert weight[7] == pytest.approx(torch.sigmoid(torch.tensor(5 / 7)).item())
    _, _, linear = keyframe_neighbours(torch.tensor([4, 5]), keys, "linear")
    assert linear.tolist() == pytest.approx([5 / 7, 4 / 7])
    assert bool((weight[3:9] > 0.5).all() and (weight[3:9] < 0.75).all())


def test_nearest_tokens_finds_the_shifted_token_in_blocks():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 20, 8, generator=g)
    perm = torch.randperm(20, generator=g)
    features = 2.0 * keys[:, perm] + 0.01 * torch.randn(3, 20, 8, generator=g)  # scale: cosine ignores it
    expected = perm.expand(3, 20)
    assert torch.equal(nearest_tokens(features, keys), expected)
    assert torch.equal(nearest_tokens(features, keys, max_scores=7), expected)     # row blocks of 1 (7 // 20 -> 1)
    assert torch.equal(nearest_tokens(features, keys, max_scores=45), expected)    # 2 rows per block
    assert torch.equal(nearest_tokens(keys, keys), torch.arange(20).expand(3, 20))  # identical: itself


def test_propagation_onto_a_frame_identical_to_its_keyframe_reproduces_the_keyframe_output():
    g = torch.Generator().manual_seed(1)
    outputs = torch.randn(3, 2, 16, 8, generator=g)      # B=3 branches, K=2 keyframes
    features = torch.randn(2, 16, 8, generator=g)        # the keyframes' source-branch inputs
    # A frame identical to keyframe 1 that takes only that keyframe (e.g. after the last one).
    frame = features[1:2].clone()
    index = nearest_tokens(frame, features[[1]])
    one = torch.tensor([1])
    out = propagate(outputs, one, one, torch.ones(1), index, index)
    assert torch.equal(out[:, 0], outputs[:, 1])          # exactly, every branch
    # Between two keyframes identical to it, the blend of equal outputs is that output again.
    same = outputs.clone()
    same[:, 0] = same[:, 1]
    out = propagate(same, torch.tensor([0]), one, torch.tensor([0.7]), index, index)
    assert torch.allclose(out[:, 0], outputs[:, 1], atol=1e-6)
    # A permuted frame gets the permuted outputs: the correspondences are used, not the position.
    perm = torch.randperm(16, generator=g)
    index = nearest_tokens(frame[:, perm], features[[1]])
    assert torch.equal(propagate(outputs, one, one, torch.ones(1), index, index)[:, 0], outputs[:, 1, perm])


@pytest.mark.parametrize("keyframes", [8, 32])
def test_keyframe_attention_chunks_queries_and_never_repeats_keys(monkeypatch, keyframes):
    """The scores held at once stay under the budget whatever the keyframe count (no (K*N)^2 matrix),
    the keys/values are the same (B, h, K*N, d) tensors in every call, and the result is exact."""
    b, h, n, d = 3, 2, 16, 8
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(b, h, keyframes * n, d, generator=g) for _ in range(3))
    budget = b * h * 8 * n * 4  # the scores of 4*n query rows over 8 keyframes
    calls = []
    real = F.scaled_dot_product_attention

    def probe(query, key, value, *args, **kwargs):
        calls.append((query.shape, key.shape, key.data_ptr(), value.data_ptr()))
        return real(query, key, value, *args, **kwargs)

    monkeypatch.setattr(tokenflow.F, "scaled_dot_product_attention", probe)
    out = keyframe_attention(q, k, v, max_scores=budget)
    monkeypatch.setattr(tokenflow.F, "scaled_dot_product_attention", real)
    assert torch.allclose(out, real(q, k, v), atol=1e-6)
    tokens = keyframes * n
    assert len(calls) > 1
    for q_shape, k_shape, k_ptr, v_ptr in calls:
        assert k_shape == (b, h, tokens, d)                  # batch = branches: not repeated per frame
        assert (k_ptr, v_ptr) == (k.data_ptr(), v.data_ptr())  # the very same keys/values, no copies
        scores = q_shape[0] * q_shape[1] * q_shape[2] * k_shape[2]
        assert scores <= budget < b * h * tokens * tokens   # never the full (K*N) x (K*N) matrix
    assert sum(s[0][2] for s in calls) == tokens


# --- the processor --------------------------------------------------------------------------------

DECODER = "up_blocks.1.attentions.0.transformer_blocks.0"


def attention_module() -> Attention:
    torch.manual_seed(3)
    return Attention(query_dim=32, heads=2, dim_head=16).eval()


@torch.no_grad()
def test_processor_keyframe_pass_is_extended_attention_and_propagation_copies_it():
    attn = attention_module()
    state = TokenFlowState()
    attn.set_processor(TokenFlowProcessor(state, DECODER))
    g = torch.Generator().manual_seed(4)
    branches, n = 2, 6
    video = torch.randn(branches, 4, n, 32, generator=g)   # 4 frames
    video[:, 0] = video[:, 1]                              # frame 0 is a copy of keyframe 1
    keys = torch.tensor([1, 3])
    state.begin_step()
    state.begin_keyframes(keys)
    state.set_frames(keys)
    state.begin_chunk(2, branches)
    key_in = video[:, keys].reshape(-1, n, 32)
    key_out = attn(key_in)
    # The edit branch (1) is extended attention over both keyframes; the source branch (0) is
    # stock attention of each keyframe alone, as in the reference.
    joint = key_in.reshape(branches, 2 * n, 32)
    assert torch.allclose(key_out.reshape(branches, 2 * n, 32)[1:], _stock(attn, joint[1:]), atol=1e-6)
    assert torch.allclose(key_out.reshape(branches, 2, n, 32)[0], _stock(attn, key_in[:2]), atol=1e-6)
    state.begin_propagation()
    state.set_frames(torch.tensor([0, 1]))
    state.begin_chunk(2, branches)
    out = attn(video[:, :2].reshape(-1, n, 32)).reshape(branches, 2, n, 32)
    key_out = key_out.reshape(branches, 2, n, 32)
    assert torch.equal(out[:, 1], key_out[:, 0])   # a keyframe takes its own output
    assert torch.equal(out[:, 0], key_out[:, 0])   # its copy (before the first keyframe) too, exactly
    with pytest.raises(RuntimeError, match="set_frames"):
        state.set_frames(torch.tensor([0]))
        state.begin_chunk(2, branches)


def _stock(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]

    def heads(t):
        return t.view(b, -1, 2, 16).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x)))
    return attn.to_out[0](out.transpose(1, 2).reshape(b, -1, 32))


def test_propagation_without_a_keyframe_pass_raises():
    attn = attention_module()
    state = TokenFlowState()
    attn.set_processor(TokenFlowProcessor(state, DECODER))
    state.set_frames(torch.tensor([0]))
    state.begin_chunk(1, 2)
    with pytest.raises(RuntimeError, match="keyframe pass"):
        attn(torch.randn(2, 4, 32))


# --- through the engine -------------------------------------------------------------------------


def test_every_frame_a_keyframe_equals_extended_attention_in_one_chunk(pipe, inversion):
    """Without PnP the source branch only supplies correspondences (none needed when every frame is a
    keyframe), so the edit equals extended attention. With PnP it would not: TokenFlow's source branch
    attends per frame (as in the reference), the `extended` method's across the chunk."""
    every = latents(pipe, inversion, method="tokenflow", control="none",
                    method_settings=TokenFlowConfig(batch_size=1, pairing="nearest"))
    extended = latents(pipe, inversion, method="extended", control="none", chunk_size=6, chunk_order="seq")
    assert close(every, extended)
    # The check can fail: fewer keyframes do change the result.
    fewer = latents(pipe, inversion, method="tokenflow", control="none", method_settings=TokenFlowConfig(batch_size=3))
    assert not close(fewer, extended)


def test_same_seed_bit_identical_other_seed_differs_and_chunking_does_not_matter(pipe, inversion):
    settings = dict(method="tokenflow", control="pnp", method_settings=TokenFlowConfig(batch_size=3))
    a = latents(pipe, inversion, seed=1, **settings)
    assert torch.equal(a, latents(pipe, inversion, seed=1, **settings))
    assert not close(a, latents(pipe, inversion, seed=3, **settings))        # other keyframes
    # Propagation is frame by frame and the keyframes do not depend on the chunk order's draws:
    # the chunks only change the batching (float noise).
    assert close(a, latents(pipe, inversion, seed=1, **{**settings, "chunk_size": 6, "chunk_order": "seq"}))


def test_still_video_edits_to_identical_frames(pipe):
    still = np.repeat(moving_frames(1), 6, axis=0)
    editor = VideoEditor(pipe, EditorSettings(steps=3, chunk_size=4, method="tokenflow", control="pnp",
                                              method_settings=TokenFlowConfig(batch_size=4)))
    out = editor.edit(still, "a texture", [("e", "a painting")], seed=0, key="k").frames["e"].astype(int)
    assert max(np.abs(out[0] - f).max() for f in out[1:]) <= 1


def test_config_reaches_the_engine():

    config = load_config(None, ["edit.method=tokenflow", "tokenflow.batch_size=4", "tokenflow.blend=linear"])
    settings = editor_settings(config)
    assert settings.method == "tokenflow"
    assert (settings.method_settings.batch_size, settings.method_settings.blend) == (4, "linear")
    with pytest.raises(Exception, match="tokenflow.blend"):
        load_config(None, ["tokenflow.blend=cubic"])


def test_cli_run_edits_with_tokenflow_through_the_cache_and_metrics(tmp_path, clips):
    import json

    from conftest import FAST, TINY, run_cli, video_sample, write_shard

    write_shard(tmp_path / "in" / "part-000000.tar", [video_sample("pattern", clips["pattern"])])
    # A cache of its own: other tests invert the same clip, and the first run here must start cold.
    args = ["--set", "edit.method=tokenflow", "--set", "tokenflow.batch_size=3", "--set", "metrics.clip_model=none",
            "--set", f"inversion.cache_dir={tmp_path / 'cache'}"]
    for s in FAST:
        args += ["--set", s]
    for run in ("first", "second"):
        code = run_cli("run", TINY, "--input", tmp_path / "in" / "part-000000.tar", "--output", tmp_path / run, *args)
        assert code == 0
        (row,) = [json.loads(line) for line in (tmp_path / run / "stats" / "part-000000.jsonl").read_text().splitlines()]
        assert row["status"] == "ok", row["error"]
        assert row["inversion_cache"] == ("miss" if run == "first" else "hit")
        assert row["metrics"]["warp_error"] is not None and row["metrics"]["interp_psnr"] is not None


def test_the_unet_is_unpatched_after_an_edit(pipe, inversion):
    from diffusers.models.attention_processor import AttnProcessor2_0

    latents(pipe, inversion, method="tokenflow", control="pnp")
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())


# --- the reference's semantics -------------------------------------------------------------------


@torch.no_grad()
def test_keyframe_pass_source_branch_equals_per_frame_stock_unet(pipe, inversion):
    """In the keyframe pass the source branch (branch 0) reconstructs each keyframe alone, as in the
    reference's extended attention (only the edit branches attend across keyframes): its UNet output
    equals the stock UNet's on the same frames, one frame per call; the edit branches' does not."""
    editor = VideoEditor(pipe, EditorSettings(steps=3))
    frames = torch.tensor([0, 2, 5])
    k = len(frames)
    t = inversion.timesteps[1]
    latent = inversion.trajectory[1][frames]
    source, uncond, cond = (editor.text_embedding(p) for p in ("a texture", "", "a painting"))
    stock = torch.cat([editor.unet_output(latent[[i]], t, source) for i in range(k)])
    stock_edit = torch.cat([editor.unet_output(latent[[i]], t, cond) for i in range(k)])
    state = tokenflow.apply_tokenflow(pipe.unet)
    try:
        state.begin_keyframes(frames)
        state.set_frames(frames)
        state.begin_chunk(k, 3)
        out = editor.unet_output(torch.cat([latent] * 3), t, torch.cat([e.expand(k, -1, -1) for e in (source, uncond, cond)]))
    finally:
        tokenflow.remove_tokenflow(pipe.unet)
    assert close(out[:k], stock, atol=1e-5)
    assert not close(out[2 * k:], stock_edit, atol=1e-3)   # the edit branch does attend across keyframes


@torch.no_grad()
def test_blend_favours_the_nearer_keyframe():
    """A frame between keyframes 1 and 5 (distances 1 and 3) takes sigmoid(3/4) of keyframe 1's output
    and the rest of keyframe 5's, in every branch (swapping the two weights fails this). The pairing by
    position (`nearest`); the reference pairing's weights are checked against the authors' code below."""
    attn = attention_module()
    state = TokenFlowState(pairing="nearest")
    attn.set_processor(TokenFlowProcessor(state, DECODER))
    g = torch.Generator().manual_seed(5)
    branches, n = 3, 6
    features = torch.randn(n, 32, generator=g)   # every frame the same source features: identity matches
    keys = torch.tensor([1, 5])
    state.begin_step()
    state.begin_keyframes(keys)
    state.set_frames(keys)
    state.begin_chunk(2, branches)
    key_in = torch.randn(branches, 2, n, 32, generator=g)   # the edit branches differ between keyframes
    key_in[0] = features
    key_out = attn(key_in.reshape(-1, n, 32)).view(branches, 2, n, 32)
    assert not torch.allclose(key_out[1:, 0], key_out[1:, 1], atol=1e-2)   # two different keyframe outputs
    state.begin_propagation()
    state.set_frames(torch.tensor([2]))
    state.begin_chunk(1, branches)
    out = attn(features.repeat(branches, 1, 1)).view(branches, n, 32)
    near = torch.sigmoid(torch.tensor(3 / 4))
    assert near > 0.5
    assert torch.allclose(out, near * key_out[:, 0] + (1 - near) * key_out[:, 1], atol=1e-6)


def test_keyframes_are_drawn_anew_in_every_step(pipe, inversion, monkeypatch):
    """As in the reference (a new draw in every `batched_denoise_step`): the keyframes change from step
    to step within one edit, and the same seed draws the same sequence."""
    drawn = []
    real = TokenFlowState.begin_keyframes

    def spy(self, keyframes):
        drawn.append(tuple(keyframes.tolist()))
        return real(self, keyframes)

    monkeypatch.setattr(TokenFlowState, "begin_keyframes", spy)
    settings = dict(method="tokenflow", method_settings=TokenFlowConfig(batch_size=2))
    latents(pipe, inversion, seed=0, **settings)
    first = list(drawn)
    assert len(first) == 3 and len(set(first)) > 1          # one draw per step, not one per edit
    drawn.clear()
    latents(pipe, inversion, seed=0, **settings)
    assert drawn == first


def test_propagation_matches_the_reference_implementation():
    """Golden values from the authors' code: github.com/omerbt/TokenFlow at commit 5dd6a696277e (HEAD of
    the stored mirror), `tokenflow_utils.make_tokenflow_attention_block(...).forward` (its keyframe
    ("pivotal") pass, then its propagation pass batch by batch with `batch_idx`) and
    `util.batch_cosine_sim`, run on a stub block (norm1 identity, attn1 returning fixed keyframe outputs,
    no cross-attention, zero feed-forward) so that the block's output minus its input is the propagated
    self-attention output. Shapes: T=12 frames, batch_size 4 (K=3 keyframes, drawn by the reference's
    `torch.randint(bs, (T // bs,)) + arange(0, T, bs)`), N=8 tokens, C=4 channels, 3 branches;
    `torch.manual_seed(0)` then features (T, N, C), keyframes, keyframe outputs (3, K, N, C) drawn
    in that order. float32, CPU.

    Our nearest_tokens and propagate must give the same result for the same keyframe pairs. The
    reference pairs every frame of batch b with the keyframes of batches b and b-1 and weighs them by
    the distances to those batches' centres, sigmoid(d2 / (d1 + d2)); :func:`keyframe_neighbours`
    deliberately takes the previous and next keyframe by their actual positions (the paper's
    description) and lets a keyframe keep its own output, so the pairs are given here explicitly.
    """
    from pathlib import Path

    from safetensors.torch import load_file

    from vidbatch.engine.methods.tokenflow import blend_weights

    ref = load_file(str(Path(__file__).parent / "fixtures" / "tokenflow_reference_propagation.safetensors"))
    features, keyframes, outputs = ref["features"], ref["keyframes"], ref["keyframe_outputs"]
    frames, bs = features.shape[0], 4
    batch = torch.arange(frames) // bs                                  # each frame's batch
    own, previous = batch, (batch - 1).clamp(min=0)
    index_own = nearest_tokens(features, features[keyframes[own]])
    index_previous = nearest_tokens(features, features[keyframes[previous]])
    assert torch.equal(index_own, ref["index_own"])
    assert torch.equal(index_previous, ref["index_previous"])
    centre = batch * bs + bs // 2
    d1, d2 = (torch.arange(frames) - centre).abs(), (torch.arange(frames) - (centre - bs)).abs()
    weight = torch.where(batch > 0, blend_weights(d1, d2, "sigmoid"), torch.ones(frames))
    out = propagate(outputs, own, previous, weight, index_own, index_previous)
    assert torch.allclose(out, ref["propagated"], atol=1e-6)
    # The test can fail: the weights swapped, or the own batch's keyframe only, do not reproduce it.
    assert not torch.allclose(propagate(outputs, previous, own, weight, index_previous, index_own),
                              ref["propagated"], atol=1e-3)
    assert not torch.allclose(propagate(outputs, own, own, weight, index_own, index_own), ref["propagated"], atol=1e-3)


def test_auto_chunk_counts_the_source_branch_and_the_keyframe_pass(pipe, monkeypatch, caplog):
    """TokenFlow runs the source branch in every step (3 branches without PnP too), and its keyframe
    pass is one UNet call on ceil(T / batch_size) keyframes whose records stay during propagation."""
    from vidbatch.engine import memory

    seen = {}
    real = memory.pick_chunk_size

    def spy(num_frames, budget, **kwargs):
        seen.update(kwargs)
        return real(num_frames, budget, **kwargs)

    monkeypatch.setattr(memory, "pick_chunk_size", spy)
    editor = VideoEditor(pipe, EditorSettings(method="tokenflow", control="none", chunk_size="auto",
                                              memory_budget_bytes=2**40, method_settings=TokenFlowConfig(batch_size=8)))
    assert editor.chunk_size_for(20, (8, 8)) == 20
    assert (seen["branches"], seen["keyframes"], seen["method"]) == (3, 3, "tokenflow")
    # On SD-like sizes: the chunk chosen leaves room for the records, and the keyframe pass fits too.
    kwargs = dict(latent_hw=(64, 64), branches=3, channels=320, heads=8, method="tokenflow", dtype_bytes=2,
                  materialised_scores=False, keyframes=15)
    budget = 2**36
    chosen = memory.pick_chunk_size(120, budget, **kwargs)
    assert 1 < chosen < 120
    keyframe_pass = tokenflow.estimate_keyframe_pass_bytes(15, (64, 64), branches=3, channels=320, heads=8,
                                                        dtype_bytes=2, materialised_scores=False)
    assert keyframe_pass <= memory.estimate_chunk_bytes(chosen, **kwargs) <= 0.7 * budget
    # The records held during propagation cost frames: fewer than 3-branch activations alone allow.
    assert chosen < memory.pick_chunk_size(120, budget, **{**kwargs, "method": "per-frame"})
    # A budget the keyframe pass alone exceeds: the smallest chunk, and a warning naming the fix.
    editor.settings.memory_budget_bytes = 1
    with caplog.at_level("WARNING", logger="vidbatch"):
        assert editor.chunk_size_for(20, (8, 8)) == 1
    assert "tokenflow.batch_size" in caplog.text


def test_reference_pairing_is_the_default_and_reproduces_the_reference():
    """`tokenflow.pairing: reference` (the default) pairs and weighs the keyframes exactly as the fixture's
    run of the authors' code did (see test_propagation_matches_the_reference_implementation)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from vidbatch.engine.methods.tokenflow import TokenFlowConfig as Settings
    from vidbatch.engine.methods.tokenflow import reference_neighbours

    assert Settings().pairing == "reference"
    ref = load_file(str(Path(__file__).parent / "fixtures" / "tokenflow_reference_propagation.safetensors"))
    features, keyframes, outputs = ref["features"], ref["keyframes"], ref["keyframe_outputs"]
    frames = torch.arange(features.shape[0])
    first, second, weight = reference_neighbours(frames, keyframes, 4, "sigmoid")
    index_first = nearest_tokens(features, features[keyframes[first]])
    index_second = nearest_tokens(features, features[keyframes[second]])
    assert torch.allclose(propagate(outputs, first, second, weight, index_first, index_second), ref["propagated"],
                          atol=1e-6)
    # The paper-style pairing (previous and next keyframe by position) computes something else.
    first, second, weight = keyframe_neighbours(frames, keyframes, "sigmoid")
    index_first = nearest_tokens(features, features[keyframes[first]])
    index_second = nearest_tokens(features, features[keyframes[second]])
    assert not torch.allclose(propagate(outputs, first, second, weight, index_first, index_second),
                              ref["propagated"], atol=1e-3)


# --- contracts of the pure functions, the state and the memory estimates ---------------------------
# Hand-made inputs whose answer is known, the documented refusals and defaults, and the memory bounds
# observed on the tensor operations actually run (a TorchFunctionMode sees every torch call).


class ProductSizes(torch.overrides.TorchFunctionMode):
    """Records the elements of every matrix product (`bmm`, `matmul`, `@`) and the scores of every
    `scaled_dot_product_attention` call made inside it: what the memory bounds are about."""

    def __init__(self) -> None:
        super().__init__()
        self.products: list[int] = []
        self.scores: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in ("bmm", "matmul", "__matmul__"):
            self.products.append(out.numel())
        elif name == "scaled_dot_product_attention":
            query, key = args[0], args[1]
            self.scores.append(query.shape[:-1].numel() * key.shape[-2])
        return out


def test_sample_keyframes_refuses_no_frames_or_no_batch_and_takes_a_single_frame():
    with pytest.raises(ValueError):
        sample_keyframes(0, 4)
    with pytest.raises(ValueError):
        sample_keyframes(3, 0)
    assert sample_keyframes(1, 4).tolist() == [0]          # one frame: itself
    assert sample_keyframes(1, 1).tolist() == [0]


def test_the_blend_defaults_to_tokenflows_sigmoid():
    """`blend_weights`, both pairings and the config all default to the reference's sigmoid blend."""
    from vidbatch.engine.methods.tokenflow import blend_weights, reference_neighbours

    d1, d2 = torch.tensor([1, 2, 0]), torch.tensor([3, 2, 5])
    assert torch.equal(blend_weights(d1, d2), torch.sigmoid(torch.tensor([3 / 4, 1 / 2, 1.0])))
    frames, keys = torch.arange(10), torch.tensor([1, 6])
    assert all(torch.equal(a, b) for a, b in zip(keyframe_neighbours(frames, keys),
                                                 keyframe_neighbours(frames, keys, "sigmoid")))
    assert all(torch.equal(a, b) for a, b in zip(reference_neighbours(frames, keys, 5),
                                                 reference_neighbours(frames, keys, 5, "sigmoid")))
    assert not torch.equal(keyframe_neighbours(frames, keys)[2], keyframe_neighbours(frames, keys, "linear")[2])
    assert TokenFlowConfig().blend == "sigmoid"


def test_keyframe_neighbours_tie_goes_to_the_previous_keyframe():
    """A frame half-way between two keyframes takes the previous one as `first` (the one weighted
    sigmoid(1/2) > 1/2), the next as `second`."""
    first, second, weight = keyframe_neighbours(torch.tensor([3]), torch.tensor([1, 5]))
    assert (first.item(), second.item()) == (0, 1)
    assert weight.item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item())


def test_reference_neighbours_odd_batch_size_by_hand():
    """Batch size 3: groups {0,1,2}, {3,4,5}, {6,7,8} with centres 1, 4, 7 (integer centres, as the
    reference's ``batch_size // 2``). Linear weights d_previous / (d_own + d_previous), counted by hand;
    group 0 takes its own keyframe alone with weight 1; a frame past the last group is refused."""
    from vidbatch.engine.methods.tokenflow import reference_neighbours

    keys = torch.tensor([2, 3, 8])
    first, second, weight = reference_neighbours(torch.arange(9), keys, 3, "linear")
    assert first.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert second.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    # frame 3: d_own |3-4| = 1, d_previous |3-1| = 2 -> 2/3; frame 4: 0 and 3 -> 1; frame 5: 1 and 4 -> 4/5.
    assert weight.tolist() == pytest.approx([1, 1, 1, 2 / 3, 1, 4 / 5, 2 / 3, 1, 4 / 5])
    with pytest.raises(ValueError):
        reference_neighbours(torch.tensor([9]), keys, 3)   # group 3 of 3 keyframes


def test_nearest_tokens_refuses_features_and_keys_that_do_not_pair_up():
    with pytest.raises(ValueError):
        nearest_tokens(torch.randn(2, 5, 4), torch.randn(3, 5, 4))    # frames differ
    with pytest.raises(ValueError):
        nearest_tokens(torch.randn(2, 5, 4), torch.randn(2, 5, 3))    # channels differ


@pytest.mark.parametrize("max_scores", [None, 800, 500, 45, 7])
def test_nearest_tokens_blocks_hold_at_most_max_scores_and_agree_with_float64(max_scores):
    """Whatever the block size (whole frames, several or one per product, row blocks, a single row),
    the answer is the float64 cosine argmax with ties to the lowest index, every similarity is computed
    exactly once, and no product holds more than `max_scores` similarities (or one row, when a row
    alone is more). Keys have M=20 tokens of C=8 channels, so a bound by C instead of M shows."""
    g = torch.Generator().manual_seed(11)
    frames, n, m, c = 3, 20, 20, 8
    keys = torch.randn(frames, m, c, generator=g)
    keys[:, 13] = keys[:, 4]                                # a tie: token 4 must win
    features = torch.randn(frames, n, c, generator=g)
    features[:, 0] = 2.0 * keys[:, 13]
    x, k = F.normalize(features.double(), dim=-1), F.normalize(keys.double(), dim=-1)
    # Products summed elementwise, so the two identical keys score exactly the same.
    expected = (x[:, :, None, :] * k[:, None, :, :]).sum(-1).argmax(-1)
    assert bool((expected[:, 0] == 4).all())
    with ProductSizes() as seen:
        got = nearest_tokens(features, keys) if max_scores is None else nearest_tokens(features, keys, max_scores)
    assert torch.equal(got, expected)
    assert sum(seen.products) == frames * n * m
    bound = tokenflow.MAX_SCORES if max_scores is None else max_scores
    assert max(seen.products) <= max(bound, m)


def test_propagate_keeps_the_outputs_dtype():
    """Half-precision keyframe outputs give half-precision frames (the weights are cast, not the outputs)."""
    g = torch.Generator().manual_seed(12)
    outputs = torch.randn(2, 2, 4, 3, generator=g)
    index = torch.arange(4).expand(2, 4)
    first, second, weight = torch.tensor([0, 0]), torch.tensor([1, 0]), torch.tensor([0.75, 1.0])
    half = propagate(outputs.half(), first, second, weight, index, index)
    assert half.dtype == torch.float16
    exact = propagate(outputs, first, second, weight, index, index)
    assert torch.allclose(exact[:, 0], 0.75 * outputs[:, 0] + 0.25 * outputs[:, 1])
    assert torch.allclose(half.float(), exact, atol=1e-2)


def test_per_frame_attention_is_stock_attention_of_each_frame_in_its_layout():
    """(1, h, F*N, d) in, (1, h, F*N, d) out: each frame's queries over that frame's keys only."""
    g = torch.Generator().manual_seed(13)
    h, frames, n, d = 2, 3, 5, 4
    q, k, v = (torch.randn(1, h, frames * n, d, generator=g) for _ in range(3))
    out = tokenflow._per_frame_attention(q, k, v, frames)
    assert out.shape == (1, h, frames * n, d)
    for f in range(frames):
        rows = slice(f * n, (f + 1) * n)
        assert torch.allclose(out[:, :, rows], F.scaled_dot_product_attention(q[:, :, rows], k[:, :, rows],
                                                                              v[:, :, rows]), atol=1e-6)


def test_state_refuses_bad_keyframes_and_chunks_and_propagation_before_a_keyframe_pass():
    state = TokenFlowState()
    for bad in ([], [3, 1], [2, 2], [1, 5, 3]):                # empty, descending, repeated, unsorted
        with pytest.raises(ValueError):
            state.begin_keyframes(torch.tensor(bad, dtype=torch.int64))
    state.begin_keyframes(torch.tensor([0, 4]))
    assert state.mode == "keyframes"
    state.begin_propagation()
    assert state.mode == "propagate"
    state.begin_keyframes(torch.tensor([1, 5]))
    state.begin_step()                                       # a new step forgets the keyframe pass
    assert state.mode == "propagate" and state.keyframes is None
    with pytest.raises(RuntimeError):
        state.begin_propagation()
    state.set_frames(torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        state.begin_chunk(0, 2)
    with pytest.raises(ValueError):
        state.begin_chunk(2, 0)
    state.begin_chunk(2, 1)                                  # one branch is a valid chunk
    assert (state.num_frames, state.num_branches, state.inject_qk) == (2, 1, False)


def test_state_neighbours_searches_non_keyframes_and_blends_frames_between_two():
    state = TokenFlowState(pairing="nearest", blend="linear")
    state.begin_keyframes(torch.tensor([1, 5]))
    state.set_frames(torch.tensor([0, 1, 3, 4, 6]))
    first, second, weight, search, blended = state.neighbours()
    assert search.tolist() == [0, 2, 3, 4]        # every frame but keyframe 1
    assert blended.tolist() == [2, 3]             # frames 3 and 4 lie between keyframes 1 and 5
    assert weight.tolist() == pytest.approx([1, 1, 1 / 2, 3 / 4, 1])


# --- the memory estimates, against hand counts on a non-square latent ------------------------------
# latent 4 x 6 (24 tokens), 3 branches, 5 channels, 2 heads, 2 bytes, 3 keyframes (72 tokens).


def test_keyframe_records_estimate_by_hand():
    # 10 (blocks factor) x (3 branches' outputs + 1 source input) x 3 keyframes x 24 tokens x 5 channels x 2 bytes
    assert tokenflow.RECORD_FACTOR == 10
    assert tokenflow.estimate_keyframe_records_bytes(3, (4, 6), branches=3, channels=5, dtype_bytes=2) == 28_800


def test_keyframe_pass_estimate_by_hand():
    from vidbatch.engine import memory

    assert memory.ACTIVATION_FACTOR == 64
    kwargs = dict(branches=3, channels=5, heads=2, dtype_bytes=2)
    # activations 64 x 3 branches x 72 tokens x 5 x 2 = 138,240; records 28,800 (above).
    assert tokenflow.estimate_keyframe_pass_bytes(3, (4, 6), materialised_scores=False, **kwargs) == 167_040
    # + scores: edit 2 branches x 2 heads x 72 x 72 = 20,736; source 2 heads x 3 keyframes x 24 x 24 = 3,456;
    # scores and softmax: 2 x (20,736 + 3,456) x 2 bytes = 96,768.
    assert tokenflow.estimate_keyframe_pass_bytes(3, (4, 6), materialised_scores=True, **kwargs) == 263_808
    # Past the chunking bound both score blocks are MAX_SCORES: 8 keyframes of 40 x 56 latents.
    big = tokenflow.estimate_keyframe_pass_bytes(8, (40, 56), branches=3, channels=4, heads=8, dtype_bytes=4,
                                                 materialised_scores=True)
    # activations 64 x 3 x 17,920 x 4 x 4; records 10 x 4 x 8 x 2,240 x 4 x 4; scores 2 x 2 x 2^24 x 4
    assert big == 55_050_240 + 11_468_800 + 268_435_456


def test_tokenflow_chunk_estimate_is_the_larger_of_propagation_and_keyframe_pass():
    from vidbatch.engine.methods.tokenflow import TokenFlow

    kwargs = dict(branches=3, channels=5, heads=2, dtype_bytes=2)
    # 10 frames: activations 64 x 3 x 240 x 5 x 2 = 460,800 + records 28,800 + search 4 x 2^24 bytes.
    assert TokenFlow.chunk_bytes(10, (4, 6), materialised_scores=False, keyframes=3, **kwargs) == 67_598_464
    assert TokenFlow.chunk_bytes(1, (4, 6), materialised_scores=False, keyframes=1, **kwargs) > 4 * 2**24
    # The keyframe pass (above: 334,954,496) outweighs one frame's propagation (85,458,944).
    assert TokenFlow.chunk_bytes(1, (40, 56), branches=3, channels=4, heads=8, dtype_bytes=4,
                                 materialised_scores=True, keyframes=8) == 334_954_496
    with pytest.raises(ValueError):
        TokenFlow.chunk_bytes(10, (4, 6), materialised_scores=False, **kwargs)   # keyframes not given


def test_check_budget_warns_exactly_when_the_keyframe_pass_is_over_budget(caplog):
    """12 frames in groups of 4: 3 keyframes on the 4 x 6 latent with 21 channels: 701,568 bytes
    (activations 64 x 3 x 72 x 21 x 2 = 580,608 + records 10 x 4 x 3 x 24 x 21 x 2 = 120,960), exactly
    70% of 1,002,240; with materialised scores 96,768 more (as in the hand count above)."""
    from vidbatch.engine import memory
    from vidbatch.engine.method import EditorSettings
    from vidbatch.engine.methods.tokenflow import TokenFlow

    method = TokenFlow(EditorSettings(method="tokenflow", method_settings=TokenFlowConfig(batch_size=4)))
    kwargs = dict(branches=3, channels=21, heads=2, dtype_bytes=2)
    assert memory.BUDGET_SHARE * 1_002_240 == 701_568

    def warns(budget, materialised=False) -> bool:
        caplog.clear()
        with caplog.at_level("WARNING", logger="vidbatch"):
            method.check_budget(12, (4, 6), budget, materialised_scores=materialised, **kwargs)
        return "tokenflow.batch_size" in caplog.text

    assert not warns(1_002_240)          # exactly fits
    assert warns(1_002_239)
    assert not warns(10**12)
    assert warns(1_002_240, materialised=True)


# --- the processor's contracts --------------------------------------------------------------------


@torch.no_grad()
def test_keyframe_pass_is_stock_attention_with_qk_norms_residual_rescale_and_bounded_scores():
    """With q/k norms, a residual connection and an output rescale, the source branch equals diffusers'
    own processor on each keyframe alone and the edit branch on the keyframes joined; no SDPA call
    holds more than the state's `max_scores` scores."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(14)
    attn = Attention(query_dim=32, heads=2, dim_head=16, qk_norm="layer_norm", residual_connection=True,
                     rescale_output_factor=2.0).eval()
    for norm in (attn.norm_q, attn.norm_k):
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    state = TokenFlowState(max_scores=48)
    attn.set_processor(TokenFlowProcessor(state, DECODER))
    branches, k, n = 2, 2, 6
    x = torch.randn(branches, k, n, 32, generator=torch.Generator().manual_seed(15))
    keys = torch.tensor([0, 3])
    state.begin_keyframes(keys)
    state.set_frames(keys)
    state.begin_chunk(k, branches)
    with ProductSizes() as seen:
        out = attn(x.reshape(-1, n, 32)).view(branches, k, n, 32)
    stock = AttnProcessor2_0()
    assert torch.allclose(out[0], stock(attn, x[0]), atol=1e-5)
    assert torch.allclose(out[1], stock(attn, x[1].reshape(1, k * n, 32)).view(k, n, 32), atol=1e-5)
    assert len(seen.scores) > 2 and max(seen.scores) <= 48     # unbounded: 144 (source), 288 (edit)


def _joint_attention(attn, q_from, k_from, v_from):
    """Attention of the keyframes joined: queries, keys and values from the given (K*N, C) inputs."""
    def heads(t):
        return t.view(1, -1, attn.heads, 16).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(attn.to_q(q_from)), heads(attn.to_k(k_from)), heads(attn.to_v(v_from)))
    return attn.to_out[0](out.transpose(1, 2).reshape(-1, 32))


@torch.no_grad()
def test_pnp_qk_injection_in_the_keyframe_pass_only_where_both_the_block_and_the_step_ask():
    """A PnP block (`pnp_qk`) in a step with `inject_qk`: the edit branch attends with the source
    branch's queries and keys (and its own values); without either it keeps its own (both default off)."""
    attn = attention_module()
    branches, k, n = 2, 2, 6
    x = torch.randn(branches, k, n, 32, generator=torch.Generator().manual_seed(16))
    source, edit = x[0].reshape(k * n, 32), x[1].reshape(k * n, 32)
    keys = torch.tensor([1, 2])

    def keyframe_pass(processor, **chunk):
        state = processor.state
        attn.set_processor(processor)
        state.begin_keyframes(keys)
        state.set_frames(keys)
        state.begin_chunk(k, branches, **chunk)
        return attn(x.reshape(-1, n, 32)).view(branches, k * n, 32)

    injected = _joint_attention(attn, source, source, edit)
    own = _joint_attention(attn, edit, edit, edit)
    assert not torch.allclose(injected, own, atol=1e-3)
    pnp = keyframe_pass(TokenFlowProcessor(TokenFlowState(), DECODER, pnp_qk=True), inject_qk=True)
    assert torch.allclose(pnp[1], injected, atol=1e-5)
    assert torch.allclose(keyframe_pass(TokenFlowProcessor(TokenFlowState(), DECODER, pnp_qk=True))[1], own, atol=1e-5)
    assert torch.allclose(keyframe_pass(TokenFlowProcessor(TokenFlowState(), DECODER), inject_qk=True)[1], own,
                          atol=1e-5)


@torch.no_grad()
def test_propagation_follows_the_correspondences_to_both_keyframes_within_the_score_bound():
    """Keyframes 1 and 4 with source features `base` and `base[pk]`; frame 2's are `base[pf]`. Frame 2
    takes 2/3 (linear: distances 1 and 2) of keyframe 1's outputs at tokens `pf` and 1/3 of keyframe 4's
    at tokens `pk^-1[pf]`; keyframe 1 takes its own outputs. The similarity search holds at most
    `max_scores` similarities per product."""
    attn = attention_module()
    state = TokenFlowState(pairing="nearest", blend="linear", max_scores=12)
    attn.set_processor(TokenFlowProcessor(state, DECODER))
    g = torch.Generator().manual_seed(17)
    branches, n = 2, 6
    base = torch.randn(n, 32, generator=g)
    pk, pf = torch.randperm(n, generator=g), torch.randperm(n, generator=g)
    key_in = torch.randn(branches, 2, n, 32, generator=g)
    key_in[0, 0], key_in[0, 1] = base, base[pk]
    keys = torch.tensor([1, 4])
    state.begin_keyframes(keys)
    state.set_frames(keys)
    state.begin_chunk(2, branches)
    key_out = attn(key_in.reshape(-1, n, 32)).view(branches, 2, n, 32)
    state.begin_propagation()
    state.set_frames(torch.tensor([1, 2]))
    state.begin_chunk(2, branches)
    hidden = torch.randn(branches, 2, n, 32, generator=g)    # the edit branches' inputs are not used
    hidden[0, 0], hidden[0, 1] = base, base[pf]
    with ProductSizes() as seen:
        out = attn(hidden.reshape(-1, n, 32)).view(branches, 2, n, 32)
    assert torch.equal(out[:, 0], key_out[:, 0])
    inverse_pk = torch.argsort(pk)
    expected = 2 / 3 * key_out[:, 0, pf] + 1 / 3 * key_out[:, 1, inverse_pk[pf]]
    assert torch.allclose(out[:, 1], expected, atol=1e-6)
    assert seen.products and max(seen.products) <= 12        # unbounded: 36 per frame


@torch.no_grad()
def test_processor_refuses_a_context_or_a_mask():
    attn = attention_module()
    state = TokenFlowState()
    attn.set_processor(TokenFlowProcessor(state, DECODER))
    state.begin_keyframes(torch.tensor([0]))
    state.set_frames(torch.tensor([0]))
    state.begin_chunk(1, 2)
    x = torch.randn(2, 4, 32)
    with pytest.raises(NotImplementedError):
        attn(x, encoder_hidden_states=torch.randn(2, 3, 32))
    with pytest.raises(NotImplementedError):
        attn(x, attention_mask=torch.zeros(2, 4, 4))


# --- patching -------------------------------------------------------------------------------------


def test_apply_tokenflow_state_carries_the_settings_and_remove_restores_only_its_own_patch(pipe):
    """The state drives every patched block with the blend, pairing, batch size and score bound given
    (the batch size defaults to the config's 8); removing the patch drops the records, and
    remove_tokenflow leaves another method's patch alone."""
    from vidbatch.engine.methods.tokenflow import apply_tokenflow, reference_neighbours, remove_tokenflow
    from vidbatch.engine.processors import install_processors, installed_patch, restore_processors

    unet = pipe.unet
    keys, frames = torch.tensor([1, 4, 6]), torch.arange(9)
    state = apply_tokenflow(unet, "linear", max_scores=1000, pairing="reference", batch_size=3)
    try:
        processors = [p for p in unet.attn_processors.values() if isinstance(p, TokenFlowProcessor)]
        assert processors and all(p.state is state for p in processors)
        assert installed_patch(unet).state is state and state.max_scores == 1000
        state.begin_keyframes(keys)
        state.set_frames(frames)
        for got, want in zip(state.neighbours(), reference_neighbours(frames, keys, 3, "linear")):
            assert torch.equal(got, want)
        state.records["block"] = tokenflow.KeyframeRecord(torch.zeros(1), torch.zeros(1))
    finally:
        remove_tokenflow(unet)
    assert state.records == {} and installed_patch(unet) is None

    state = apply_tokenflow(unet, pairing="reference")
    remove_tokenflow(unet)
    keys, frames = torch.tensor([3, 10, 17]), torch.arange(20)
    state.begin_keyframes(keys)
    state.set_frames(frames)
    assert torch.equal(state.neighbours()[0], reference_neighbours(frames, keys, 8)[0])

    install_processors(unet, "someone-else", object(), lambda name, block: {})
    try:
        remove_tokenflow(unet)
        assert installed_patch(unet).owner == "someone-else"
    finally:
        restore_processors(unet)


def test_tokenflow_method_patches_with_its_config_and_seeds_the_keyframes_from_the_engine(pipe):
    """`TokenFlow.patch` hands the config's blend, pairing and batch size to the processors;
    `begin_step` draws one keyframe per group, runs the keyframe pass on them, leaves the state
    propagating, and seeds the keyframe generator once from the engine's over its whole range."""
    from vidbatch.engine.method import EditorSettings
    from vidbatch.engine.methods.tokenflow import TokenFlow, reference_neighbours

    settings = EditorSettings(method="tokenflow",
                              method_settings=TokenFlowConfig(batch_size=3, blend="linear", pairing="reference"))
    editor = VideoEditor(pipe, settings)
    method = TokenFlow(settings)
    state = method.patch(editor, "a painting", "a texture")
    try:
        drawn = []
        method.begin_step(0, 9, drawn.append, torch.Generator().manual_seed(5))
        (keys,) = drawn
        assert torch.equal(state.keyframes, keys) and state.mode == "propagate"
        assert torch.equal(keys // 3, torch.arange(3))
        state.set_frames(torch.arange(9))
        for got, want in zip(state.neighbours(), reference_neighbours(torch.arange(9), keys, 3, "linear")):
            assert torch.equal(got, want)
    finally:
        method.unpatch(editor.unet)
    seeds = set()
    for seed in range(64):
        fresh = TokenFlow(settings)
        fresh.state, fresh.device = TokenFlowState(), torch.device("cpu")
        fresh.begin_step(0, 9, lambda keys: None, torch.Generator().manual_seed(seed))
        seeds.add(fresh.generator.initial_seed())
    assert len(seeds) == 64
