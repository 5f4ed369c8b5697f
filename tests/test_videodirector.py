"""VideoDirector: the motion adapter's loading, and the method's invariants on the tiny video UNet."""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from vidbatch.core.errors import ConfigError, ModelLoadError
from vidbatch.engine import ddim
from vidbatch.engine.editor import EditorSettings, VideoEditor
from vidbatch.engine.method import Inversion
from vidbatch.engine.processors import (installed_patch, motion_blocks, project_heads, restore_processors,
                                        transformer_blocks)
from vidbatch.engine.methods import videodirector as vd
from vidbatch.engine.methods.videodirector import VideoDirectorConfig
from vidbatch.models.loading import load_pipeline
from vidbatch.models.motion import (builtin_adapter_dir, is_motion_unet, load_motion_adapter, motion_unet,
                                    with_motion_adapter)
from vidbatch.testing.checkpoints import make_motion_module_file

from conftest import TINY, moving_frames, read_output, run_cli, video_sample, write_shard

SOURCE, EDIT = "a red square", "a blue circle"


@pytest.fixture(scope="module")
def video_pipe():
    return with_motion_adapter(load_pipeline("tiny"), "tiny")


@pytest.fixture(scope="module")
def half_video_pipe():
    return with_motion_adapter(load_pipeline("tiny", dtype=torch.float16), "tiny")


def editor_for(pipe, steps: int = 3, **config) -> VideoEditor:
    settings = EditorSettings(method="videodirector", control="none", steps=steps,
                              method_settings=VideoDirectorConfig(**config))
    return VideoEditor(pipe, settings)


def centre_mask(frames: int, size: int = 32) -> np.ndarray:
    mask = np.zeros((frames, size, size), dtype=bool)
    mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = True
    return mask


def plain_inversion(editor: VideoEditor, frames: np.ndarray, prompt: str = SOURCE) -> Inversion:
    with torch.no_grad():
        timesteps = editor.timesteps_for(editor.settings.steps)
        clean = editor.encode_frames(frames).float()
        trajectory = vd.invert_video(editor, clean, timesteps, prompt, editor_method_config(editor))
    return Inversion(timesteps=timesteps, trajectory=trajectory, clean=clean.cpu())


def editor_method_config(editor: VideoEditor) -> VideoDirectorConfig:
    return editor.settings.method_settings


# ------------------------------------------------------------------------------------------------
# The motion adapter


def test_zeroed_motion_modules_give_the_per_frame_unet(video_pipe):
    """With every motion module's output projection zeroed, the video UNet is the image UNet frame by frame."""
    image_unet = load_pipeline("tiny").unet
    zeroed = copy.deepcopy(video_pipe.unet)
    for name, module in zeroed.named_modules():
        if name.endswith("proj_out") and "motion_modules" in name:
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 5, 4, 4)                  # (B, C, F, h, w)
    text = torch.randn(10, 77, 32)
    t = torch.tensor(500)
    with torch.no_grad():
        video = zeroed(latents, t, encoder_hidden_states=text).sample
        frames = image_unet(latents.permute(0, 2, 1, 3, 4).flatten(0, 1), t, encoder_hidden_states=text).sample
        moving = video_pipe.unet(latents, t, encoder_hidden_states=text).sample
    frames = frames.unflatten(0, (2, 5)).permute(0, 2, 1, 3, 4)
    assert torch.allclose(video, frames, atol=1e-5)
    assert not torch.allclose(moving, frames, atol=1e-3)    # the untouched modules do mix the frames


def test_v3_random_has_animatediff_v3s_layout():
    """Built on the meta device (no weights): modules at all 4 levels (2 per down, 3 per up block), no mid
    block, 8 heads, two temporal self-attentions each, positions up to 32 frames."""
    from diffusers import MotionAdapter

    from vidbatch.models.motion import v3_adapter_config

    with torch.device("meta"):
        adapter = MotionAdapter(**v3_adapter_config())
    assert [len(b.motion_modules) for b in adapter.down_blocks] == [2, 2, 2, 2]
    assert [len(b.motion_modules) for b in adapter.up_blocks] == [3, 3, 3, 3]
    assert adapter.mid_block is None
    block = adapter.down_blocks[0].motion_modules[0].transformer_blocks[0]
    assert block.attn1.heads == 8 and block.attn2.is_cross_attention is False
    assert block.pos_embed.pe.shape[1] == 32


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_motion_module_loads_offline(tmp_path, suffix):
    folder = builtin_adapter_dir("tiny")
    single = make_motion_module_file(folder, tmp_path / f"mm{suffix}")
    loaded = load_motion_adapter(str(single), config=str(folder))
    expected = load_motion_adapter("tiny").state_dict()
    assert set(loaded.state_dict()) == set(expected)
    assert all(torch.equal(loaded.state_dict()[k], expected[k]) for k in expected)
    with pytest.raises(ModelLoadError, match="motion_adapter_config"):
        load_motion_adapter(str(single))                   # offline (the tests' HF_HUB_OFFLINE) without a config


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    flag = tmp_path / "pwned"
    payload = _RunsCode()
    payload.flag = flag
    evil = tmp_path / "mm.ckpt"
    evil.write_bytes(pickle.dumps({"down_blocks.0.motion_modules.0.proj_in.weight": payload}))
    with pytest.raises(ModelLoadError, match="refused|could not be loaded"):
        load_motion_adapter(str(evil), config=str(builtin_adapter_dir("tiny")))
    assert not flag.exists()


def test_an_adapter_for_another_model_is_a_clear_error(tmp_path):
    from diffusers import MotionAdapter

    MotionAdapter(block_out_channels=(32, 32), motion_layers_per_block=2, motion_num_attention_heads=2,
                  use_motion_mid_block=False).save_pretrained(tmp_path / "other")
    with pytest.raises(ModelLoadError, match="another base model"):
        motion_unet(load_pipeline("tiny").unet, load_motion_adapter(str(tmp_path / "other")))
    with pytest.raises(ModelLoadError, match="no such file"):
        load_motion_adapter(str(tmp_path / "missing.ckpt"))


# ------------------------------------------------------------------------------------------------
# Windows


def test_windows_cover_every_frame_and_blend_to_one():
    assert vd.frame_windows(12, 16, 4) == [(0, 12)]
    spans = vd.frame_windows(40, 16, 4)
    assert spans == [(0, 16), (12, 28), (24, 40)]
    weights = vd.window_weights(spans, 40, 4)
    total = torch.zeros(40)
    for (start, end), w in zip(spans, weights):
        total[start:end] += w
        assert (w > 0).all()
    assert torch.allclose(total, torch.ones(40))
    # A shared frame leans to the window whose middle is nearer: frame 12 is window 0's 13th of 16, window 1's 1st.
    assert weights[0][12] > weights[1][0]
    with pytest.raises(ConfigError):
        vd.frame_windows(40, 16, 16)


def test_window_weights_by_hand():
    """7 frames in windows of 5 sharing 1 (the last window ends at the last frame, so 3 are shared): raw weights
    ramp over overlap + 1 = 2 frames, [1/2, 1, 1, 1, 1/2], then each frame's are divided by their sum; and 10
    frames in three windows."""
    spans = vd.frame_windows(7, 5, 1)
    assert spans == [(0, 5), (2, 7)]
    first, second = vd.window_weights(spans, 7, 1)
    assert torch.allclose(first, torch.tensor([1, 1, 2 / 3, 1 / 2, 1 / 3]))
    assert torch.allclose(second, torch.tensor([1 / 3, 1 / 2, 2 / 3, 1, 1]))
    # Three windows of 4 sharing 1: the middle window ramps at both of its ends, [1/2, 1, 1, 1/2] like the others.
    spans = vd.frame_windows(10, 4, 1)
    assert spans == [(0, 4), (3, 7), (6, 10)]
    expected = [[1, 1, 1, 1 / 2], [1 / 2, 1, 1, 1 / 2], [1 / 2, 1, 1, 1]]
    assert all(torch.allclose(w, torch.tensor(e)) for w, e in zip(vd.window_weights(spans, 10, 1), expected))


def test_the_mask_follows_the_unets_levels_which_halve_odd_sides_rounding_up():
    """A 5x7 latent's levels are 5x7, 3x4, 2x2, 1x1 (a stride-2 convolution with padding 1 rounds up)."""
    assert [vd.level_grid((5, 7), tokens) for tokens in (35, 12, 4, 1)] == [(5, 7), (3, 4), (2, 2), (1, 1)]
    with pytest.raises(RuntimeError, match="no UNet level"):
        vd.level_grid((5, 7), 6)
    mask = torch.zeros(1, 5, 7, dtype=torch.bool)
    mask[0, :, 3:] = True                     # columns 3..6; nearest resizing to 4 columns samples 0, 1, 3 and 5
    assert vd.mask_at(mask, (5, 7), 12).view(3, 4)[0].tolist() == [False, False, True, True]


# ------------------------------------------------------------------------------------------------
# STDG losses


def _records(frames: int, seed: int) -> vd.AttentionRecord:
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(16, 2, frames, frames, generator=g).softmax(-1)         # (Q = 4x4 tokens, heads, F, F)
    keys = torch.randn(frames, 16, 8, generator=g)
    return vd.AttentionRecord({"up_blocks.1.motion_modules.0.transformer_blocks.0.attn1": maps},
                              {"up_blocks.1.attentions.0.transformer_blocks.0.attn1": keys})


def test_an_all_foreground_mask_zeroes_the_background_terms_and_an_empty_one_the_foreground():
    reference, generated = _records(4, 0), _records(4, 1)
    full = torch.ones(4, 4, 4, dtype=torch.bool)
    terms = vd.stdg_terms(reference, generated, full, (4, 4), ["up_blocks.1"], [2.0], 1)
    assert terms["motion_bg"] == 0 and terms["appearance_bg"] == 0
    assert terms["motion_fg"] > 0 and terms["appearance_fg"] > 0
    empty = vd.stdg_terms(reference, generated, ~full, (4, 4), ["up_blocks.1"], [2.0], 1)
    assert empty["motion_fg"] == 0 and empty["appearance_fg"] == 0           # zero, not NaN
    assert all(torch.isfinite(v) for v in empty.values())
    # No recorded layer at all (stdg_blocks matching nothing): four float zeros, not an error.
    nothing = vd.stdg_terms(vd.AttentionRecord(), vd.AttentionRecord(), full, (4, 4), ["up_blocks.1"], [2.0], 1)
    assert set(nothing) == set(vd.STDG_TERMS)
    assert all(v.dtype == torch.float32 and v.shape == () and v == 0 for v in nothing.values())


def test_the_motion_loss_compares_only_the_reference_top_keys():
    reference = torch.tensor([[[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]]]])   # (1, 1, 3, 3)
    generated = torch.zeros_like(reference)
    everything = torch.ones(1, 3, dtype=torch.bool)
    loss = vd.temporal_map_loss(reference, generated, everything, top_k=1)
    assert torch.isclose(loss, torch.tensor((0.7**2 + 0.8**2 + 0.4**2) / 3))
    only_first = torch.tensor([[True, False, False]])
    assert torch.isclose(vd.temporal_map_loss(reference, generated, only_first, top_k=1), torch.tensor(0.49))
    # Top 2 of each row's 3 keys (one head: K is bounded by the frames, not the heads), and K above the frames.
    two = vd.temporal_map_loss(reference, generated, everything, top_k=2)
    assert torch.isclose(two, torch.tensor((0.7**2 + 0.2**2 + 0.8**2 + 0.1**2 + 0.4**2 + 0.3**2) / 6))
    assert torch.isclose(vd.temporal_map_loss(reference, generated, everything, top_k=5), reference.square().mean())


def test_the_appearance_loss_divides_the_masked_sums_by_the_count_plus_1e5_as_the_authors_do():
    g = torch.Generator().manual_seed(0)
    reference, generated = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 1] = True                                                        # one token: 1e-5 is visible
    mask[1, 2:] = True
    weight = mask[..., None].double()
    count = weight.sum(1) + 1e-5
    means = [(x.double() * weight).sum(1) / count for x in (reference, generated)]
    expected = (means[0] - means[1]).square().mean()
    assert torch.isclose(vd.key_loss(reference, generated, mask).double(), expected, rtol=1e-6, atol=0)


def test_one_fused_backward_equals_the_sum_of_the_four_separate_ones():
    reference = _records(4, 0)
    leaf = torch.randn(4, 16, 8, requires_grad=True)
    per_token = leaf.mean(-1).T                                                # (16 tokens, 4 frames)
    maps = (per_token[:, None, :, None] * per_token[:, None, None, :]).expand(16, 2, 4, 4).softmax(-1)
    generated = vd.AttentionRecord({"up_blocks.1.motion_modules.0.transformer_blocks.0.attn1": maps},
                                   {"up_blocks.1.attentions.0.transformer_blocks.0.attn1": leaf * 2})
    mask = torch.from_numpy(centre_mask(4, 4))
    weights = [0.5, 0.3, 0.2, 0.7]
    terms = vd.stdg_terms(reference, generated, mask, (4, 4), ["up_blocks.1"], [3.0], 1)
    (fused,) = torch.autograd.grad(vd.stdg_loss(terms, weights), leaf, retain_graph=True)
    separate = sum(w * torch.autograd.grad(terms[name], leaf, retain_graph=True)[0]
                   for w, name in zip(weights, vd.STDG_TERMS))
    assert torch.allclose(fused, separate, atol=1e-6)
    assert fused.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Tuning


def test_zero_tuning_iterations_keep_the_empty_prompts_nulls(video_pipe):
    editor = editor_for(video_pipe, null_steps=0)
    inversion = plain_inversion(editor, moving_frames(4))
    tuned = vd.tune(editor, editor_method_config(editor), inversion, SOURCE, None)
    empty = editor.text_embedding("")[0]
    assert tuned.null_embeddings.shape == (3, 4, *empty.shape)
    assert torch.equal(tuned.null_embeddings, empty.expand(3, 4, -1, -1))


def test_the_stdg_gradient_is_zero_at_the_first_step_only(video_pipe):
    editor = editor_for(video_pipe, null_steps=2)
    inversion = plain_inversion(editor, moving_frames(4))
    tuned = vd.tune(editor, editor_method_config(editor), inversion, SOURCE, torch.from_numpy(centre_mask(4)))
    assert tuned.stdg.shape == inversion.trajectory.shape
    assert tuned.stdg[0].abs().max() == 0                   # the reconstruction starts at the inverted latent
    assert tuned.stdg[1:].abs().amax(dim=(1, 2, 3, 4)).min() > 0


def test_tuning_reconstructs_better_than_no_tuning(video_pipe):
    frames = moving_frames(4)
    errors = {}
    for steps in (0, 10):
        editor = editor_for(video_pipe, null_steps=steps, stdg=[0.0, 0.0, 0.0, 0.0])
        inversion = plain_inversion(editor, frames)
        tuned = vd.tune(editor, editor_method_config(editor), inversion, SOURCE, None)
        errors[steps] = float((tuned.reconstruction - inversion.clean).square().mean())
    assert errors[10] < 0.9 * errors[0], errors


def test_no_unet_pass_is_repeated(video_pipe):
    """Per step: the reference pass, the pass at the reconstruction (which also gives the conditional
    prediction) and the step with the tuned nulls; on the first step the reference pass is that same pass."""
    editor = editor_for(video_pipe, null_steps=0)
    inversion = plain_inversion(editor, moving_frames(4))
    calls = []
    handle = video_pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        vd.tune(editor, editor_method_config(editor), inversion, SOURCE, None)
    finally:
        handle.remove()
    assert len(calls) == 2 + 3 + 3


def test_the_processors_cover_every_attention_of_the_video_unet_and_are_named_after_it(video_pipe):
    """Frame attention: attn1 records keys inside stdg_blocks and is mutual inside mutual_blocks, attn2 wraps
    the processor it replaced; temporal attention (both of a motion block's) records inside stdg_blocks. A
    processor's name is its module's path (errors name the layer; the record is keyed by it)."""
    unet = video_pipe.unet
    before = dict(unet.attn_processors)
    config = VideoDirectorConfig(stdg_blocks=["up_blocks.1"], stdg_block_weights=[1.0], mutual_blocks=["up_blocks.0"],
                                 self_replace_max_tokens=7)
    state = vd.apply_videodirector(unet, config)
    try:
        installed = dict(unet.attn_processors)
        assert installed_patch(unet).state is state
    finally:
        restore_processors(unet)
    assert (state.stdg_blocks, state.mutual_blocks, state.self_replace_max_tokens) == \
        (["up_blocks.1"], ["up_blocks.0"], 7)
    assert state.mode == "plain"
    temporal = [path for path in installed if "motion_modules" in path]
    assert temporal and len(temporal) == 2 * len(list(motion_blocks(unet)))
    for path, processor in installed.items():
        assert processor.state is state, path
        module = path.removesuffix(".processor")
        if path in temporal:
            assert isinstance(processor, vd.TemporalProcessor) and processor.name == module
            assert processor.recorded == module.startswith("up_blocks.1.")
        elif module.endswith(".attn1"):
            block = module.removesuffix(".attn1")
            assert isinstance(processor, vd.SpatialSelfProcessor) and processor.name == block
            assert processor.recorded == block.startswith("up_blocks.1.")
            assert processor.mutual == block.startswith("up_blocks.0.")
        else:
            assert isinstance(processor, vd.CrossProcessor) and processor.name == module.removesuffix(".attn2")
            assert processor.original is before[path]
    flags = {(p.recorded, p.mutual) for p in installed.values() if isinstance(p, vd.SpatialSelfProcessor)}
    assert flags == {(True, False), (False, True), (False, False)}              # the tiny UNet has all three


def test_a_recorded_pass_keeps_the_stdg_blocks_temporal_maps_and_spatial_keys_and_changes_no_output(video_pipe):
    editor = editor_for(video_pipe)
    unet = video_pipe.unet
    state = vd.apply_videodirector(unet, VideoDirectorConfig(stdg_blocks=["up_blocks.1"], stdg_block_weights=[1.0]))
    latents = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    embeddings, t = editor.text_embedding(SOURCE).expand(3, -1, -1), torch.tensor(500)
    try:
        with torch.no_grad():
            plain = vd.video_unet(editor, latents[None], t, embeddings)[0]
            assert not state.record.temporal and not state.record.keys         # a plain pass records nothing
            out, record = vd._recorded_pass(state, editor, latents, t, embeddings)
        assert state.mode == "plain" and not state.record.temporal             # the state is left as it was
    finally:
        restore_processors(unet)
    assert torch.allclose(out, plain, atol=1e-5)
    assert set(record.temporal) == {f"{name}.attn{i}" for name, _ in motion_blocks(unet)
                                    if name.startswith("up_blocks.1.") for i in (1, 2)}
    assert set(record.keys) == {name for name, _ in transformer_blocks(unet) if name.startswith("up_blocks.1.")}
    for maps in record.temporal.values():                                    # (Q, heads, F, F), rows sum to 1
        assert maps.shape[-2:] == (3, 3) and torch.allclose(maps.sum(-1), torch.ones(()), atol=1e-5)
    assert all(keys.shape[0] == 3 for keys in record.keys.values())


@pytest.mark.parametrize("window", [5, 3], ids=["one window", "two windows"])
def test_the_stdg_score_is_each_windows_loss_gradient_blended_and_the_condition_that_passs_output(video_pipe, window):
    """Known answer, window by window: the reference pass recorded, the pass at x differentiated (all four
    terms weighted, so STDG is on), both blended with the windows' weights."""
    editor = editor_for(video_pipe)
    config = VideoDirectorConfig(window=window, overlap=1, stdg=[1.0, 1.0, 1.0, 1.0])
    clip = vd._Clip.make(editor, editor.timesteps_for(3), 5, (4, 4), config)
    assert len(clip.spans) == (1 if window == 5 else 2)
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(5, 4, 4, 4, generator=g)
    x = reference + 0.3 * torch.randn(5, 4, 4, 4, generator=g)
    t, cond, mask = torch.tensor(500), editor.text_embedding(SOURCE), torch.from_numpy(centre_mask(5, 4))
    state = vd.apply_videodirector(video_pipe.unet, config)
    try:
        eps_cond, score = vd._condition_and_score(state, editor, clip, config, x, reference, t, cond, mask)
        expected_eps, expected_score = torch.zeros_like(x), torch.zeros_like(x)
        for (start, end), weight in zip(clip.spans, clip.weights):
            embeddings = cond.expand(end - start, -1, -1)
            with torch.no_grad():
                reference_record = vd._recorded_pass(state, editor, reference[start:end], t, embeddings)[1]
            leaf = x[start:end].clone().requires_grad_(True)
            out, record = vd._recorded_pass(state, editor, leaf, t, embeddings)
            terms = vd.stdg_terms(reference_record, record, mask[start:end], (4, 4), config.stdg_blocks,
                                  config.stdg_block_weights, config.top_k)
            (gradient,) = torch.autograd.grad(vd.stdg_loss(terms, config.stdg), leaf)
            expected_eps[start:end] += weight * out.detach()
            expected_score[start:end] += weight * gradient
    finally:
        restore_processors(video_pipe.unet)
    assert torch.allclose(eps_cond, expected_eps, atol=1e-5)
    assert expected_score.abs().max() > 0
    assert torch.allclose(score, expected_score, rtol=1e-4, atol=1e-6 * float(expected_score.abs().max()))


def _tuning_case(video_pipe, window: int, **config):
    """A tuning step's inputs: an editor (guidance 5, 4 steps), its config (STDG scale 2), a 5-frame clip in
    `window`-frame windows, the step's timestep (k = 1), seeded (x, ε_c, score, target) and the empty prompt's nulls."""
    config = VideoDirectorConfig(window=window, overlap=1, stdg_scale=2.0, **config)
    editor = VideoEditor(video_pipe, EditorSettings(method="videodirector", control="none", steps=4, guidance=5.0,
                                                    method_settings=config))
    timesteps = editor.timesteps_for(4)
    clip = vd._Clip.make(editor, timesteps, 5, (4, 4), config)
    g = torch.Generator().manual_seed(0)
    x, eps_cond, score, target = (torch.randn(5, 4, 4, 4, generator=g) for _ in range(4))
    nulls = editor.text_embedding("").expand(5, -1, -1).clone()
    return editor, config, clip, timesteps[1], (x, eps_cond, score, target), nulls


def _steered_step(editor, clip, t, x, eps_cond, score, nulls):
    """The tuning's step at `nulls`, written out (k = 1): every window's ε_u blended in one graph, guidance
    ``ε_c + 5(ε_c − ε_u)``, the STDG-steered DDIM step at scale 2."""
    eps_uncond = torch.zeros_like(x)
    for (start, end), weight in zip(clip.spans, clip.weights):
        eps_uncond[start:end] += weight * vd.video_unet(editor, x[None, start:end], t, nulls[start:end])[0]
    guided = eps_cond + 5.0 * (eps_cond - eps_uncond)
    return ddim.score_guided_step(x, guided, clip.alpha_t[1], clip.alpha_prev[1], "epsilon", score, 2.0)


@pytest.mark.parametrize("window", [5, 3], ids=["one window", "two windows"])
def test_one_tuning_iteration_is_one_adam_step_on_the_guided_steered_reconstruction_error(video_pipe, window):
    """Known answer: Adam's first step is ``-lr·g/(|g| + 1e-8)``, with g the gradient, with respect to the
    nulls, of the MSE between the target and the STDG-steered DDIM step of ``ε_c + s(ε_c − ε_u)``, and lr
    ``null_lr·(1 − k/(2S))``; ε_u the windows' blended prediction with the nulls."""
    editor, config, clip, t, (x, eps_cond, score, target), nulls = _tuning_case(video_pipe, window, null_steps=1,
                                                                                null_lr=0.01)
    tuned = vd._tune_step(editor, clip, config, 1, 4, x, t, eps_cond, score, target, nulls)
    leaf = nulls.clone().requires_grad_(True)
    loss = torch.nn.functional.mse_loss(_steered_step(editor, clip, t, x, eps_cond, score, leaf), target)
    (gradient,) = torch.autograd.grad(loss, leaf)
    lr = 0.01 * (1 - 1 / 8)
    expected = nulls - lr * gradient / (gradient.abs() + 1e-8)
    assert editor.prediction_type == "epsilon" and gradient.abs().max() > 0
    assert torch.allclose(tuned, expected, atol=1e-3 * lr, rtol=0), (tuned - expected).abs().max()


@pytest.mark.parametrize("stops", [True, False], ids=["stops", "goes on"])
def test_a_steps_tuning_stops_once_its_loss_is_below_early_stop_plus_k_times_2e5(video_pipe, stops):
    """Step k = 1 stops after an iteration whose loss L is below ``early_stop + 2e-5``: with early_stop a
    quarter of the 2e-5 below or above ``L − 2e-5``, two iterations give one iteration's nulls or not."""
    editor, config, clip, t, (x, eps_cond, score, noise), nulls = _tuning_case(video_pipe, 16, null_steps=2)
    with torch.no_grad():
        # A target near the first iteration's step: a loss of about 1e-2, which float32 holds to about 1e-9.
        stepped = _steered_step(editor, clip, t, x, eps_cond, score, nulls)
        target = stepped + 0.1 * noise
        loss = float(torch.nn.functional.mse_loss(stepped, target))
    config.early_stop = loss - 2e-5 + (0.5e-5 if stops else -0.5e-5)
    two = vd._tune_step(editor, clip, config, 1, 4, x, t, eps_cond, score, target, nulls)
    config.null_steps = 1
    one = vd._tune_step(editor, clip, config, 1, 4, x, t, eps_cond, score, target, nulls)
    assert 1e-3 < loss < 1e-1 and config.early_stop > 0
    assert torch.equal(two, one) == stops


def test_stdg_blocks_that_match_no_attention_are_reported_once_and_steer_nothing(video_pipe, caplog, monkeypatch):
    monkeypatch.setattr(vd, "_WARNED", set())                               # reported once per process
    editor = editor_for(video_pipe, steps=2, null_steps=0, stdg_blocks=["up_blocks.7"], stdg_block_weights=[1.0])
    inversion = plain_inversion(editor, moving_frames(4))
    with caplog.at_level(logging.WARNING, logger="vidbatch"):
        tuned = vd.tune(editor, editor_method_config(editor), inversion, SOURCE, None)
        vd.apply_videodirector(video_pipe.unet, editor_method_config(editor))
        restore_processors(video_pipe.unet)
        all_there = VideoDirectorConfig(stdg_blocks=["up_blocks.0", "up_blocks.1"], stdg_block_weights=[1.0, 1.0])
        vd.apply_videodirector(video_pipe.unet, all_there)                  # the tiny UNet's two decoder levels
        restore_processors(video_pipe.unet)
    said = [r.getMessage() for r in caplog.records if "stdg_blocks" in r.getMessage()]
    assert said == ["videodirector.stdg_blocks ['up_blocks.7'] match no attention block of this UNet"]
    assert tuned.stdg.abs().max() == 0


def test_the_samples_mask_steers_the_tuning(video_pipe):
    editor = editor_for(video_pipe, steps=2, null_steps=0)
    method, frames = vd.VideoDirector(editor.settings), moving_frames(4)
    masked = method.invert(editor, frames, SOURCE, centre_mask(4))
    whole = method.invert(editor, frames, SOURCE, None)
    assert torch.equal(masked.trajectory, whole.trajectory)                 # the DDIM inversion ignores it
    assert not torch.allclose(masked.extras["stdg"], whole.extras["stdg"])


def test_a_mask_of_another_length_or_rank_is_refused_and_a_0_1_mask_counts_as_a_bool_one(video_pipe):
    editor = editor_for(video_pipe, steps=2, null_steps=0)
    inversion, config = plain_inversion(editor, moving_frames(4)), editor_method_config(editor)
    for bad in (centre_mask(3), np.ones((4, 32), dtype=bool)):
        with pytest.raises(ValueError, match="the mask has shape"):
            vd.tune(editor, config, inversion, SOURCE, bad)
    as_bool = vd.tune(editor, config, inversion, SOURCE, centre_mask(4))
    as_uint8 = vd.tune(editor, config, inversion, SOURCE, centre_mask(4).astype(np.uint8))
    assert torch.equal(as_bool.stdg, as_uint8.stdg)


def test_each_tuning_step_aims_at_the_next_inverted_latent_with_its_own_stdg_and_reports_progress(video_pipe,
                                                                                                  monkeypatch):
    """Step k's target is the inversion's latent of step k + 1 (the clean latents after the last), its tuning
    steers with the STDG gradient it stores for step k; one progress report per step; the processors are
    restored afterwards."""
    editor = editor_for(video_pipe, steps=3, null_steps=1)
    inversion = plain_inversion(editor, moving_frames(4))
    seen, progress = [], []
    real = vd._tune_step

    def recording(editor, clip, config, k, num_steps, x, t, eps_cond, score, target, nulls):
        seen.append((k, target.clone(), score.clone()))
        return real(editor, clip, config, k, num_steps, x, t, eps_cond, score, target, nulls)

    monkeypatch.setattr(vd, "_tune_step", recording)
    editor.on_step = lambda stage, done, total: progress.append((stage, done, total))
    before = dict(video_pipe.unet.attn_processors)
    tuned = vd.tune(editor, editor_method_config(editor), inversion, SOURCE, centre_mask(4))
    assert [k for k, _, _ in seen] == [0, 1, 2]
    for k, target, score in seen:
        assert torch.equal(target, (inversion.trajectory[k + 1] if k < 2 else inversion.clean).float()), k
        assert torch.equal(score, tuned.stdg[k]), k
    assert tuned.stdg[2].abs().max() > 0
    assert progress == [("tune", 1, 3), ("tune", 2, 3), ("tune", 3, 3)]
    assert installed_patch(video_pipe.unet) is None
    assert all(video_pipe.unet.attn_processors[path] is processor for path, processor in before.items())


def test_a_half_precision_models_tuning_is_the_float32_tuning_of_the_same_weights(half_video_pipe):
    """"Runs in float32 whatever the model's dtype": the same inversion tuned by the half model and by a copy whose
    UNet was cast to float32 (the same embeddings: the text encoder stays half) gives the same numbers."""
    half = half_video_pipe
    full = copy.deepcopy(half)
    full.unet.to(torch.float32)
    half_editor, full_editor = editor_for(half, steps=2, null_steps=2), editor_for(full, steps=2, null_steps=2)
    inversion = plain_inversion(half_editor, moving_frames(4))
    results = [vd.tune(e, editor_method_config(e), inversion, SOURCE, centre_mask(4)) for e in (half_editor, full_editor)]
    assert half.unet.dtype == torch.float16 and full_editor.dtype == torch.float32
    for name in ("null_embeddings", "stdg", "reconstruction"):
        ours, reference = (getattr(r, name) for r in results)
        assert ours.dtype == reference.dtype == torch.float32, name
        assert torch.allclose(ours, reference, rtol=0, atol=1e-6), (name, (ours - reference).abs().max())


def test_a_half_precision_video_model_inverts_and_edits_in_its_dtype_and_tunes_in_float32(half_video_pipe):
    half = half_video_pipe
    editor = editor_for(half, steps=2, null_steps=1)
    inversion = vd.VideoDirector(editor.settings).invert(editor, moving_frames(4), SOURCE)
    assert inversion.trajectory.dtype == inversion.extras["null_embeddings"].dtype == torch.float16
    assert inversion.extras["stdg"].dtype == torch.float32 and half.unet.dtype == torch.float16
    # The prompts the tuning embeds are cached in the model's dtype, not in the tuning's float32.
    assert editor.text_embedding("").dtype == editor.text_embedding(SOURCE).dtype == torch.float16
    edited = editor.denoise(inversion, EDIT, seed=0, source_prompt=SOURCE)
    assert edited.dtype == torch.float32 and torch.isfinite(edited).all()


# ------------------------------------------------------------------------------------------------
# Editing


@pytest.mark.parametrize("stdg, scale", [([0.0, 0.0, 0.0, 0.0], 1.0), ([0.5, 0.5, 0.0, 0.5], 2.0)])
def test_without_control_the_edit_of_the_source_prompt_is_the_tuned_reconstruction(video_pipe, stdg, scale):
    """The edit replays the tuning's steps: same nulls, same STDG gradients and scale, same guidance."""
    editor = editor_for(video_pipe, null_steps=3, stdg=stdg, stdg_scale=scale, tau_s=0.0, tau_c=0.0)
    frames = moving_frames(4)
    inversion = plain_inversion(editor, frames)
    tuned = vd.tune(editor, editor_method_config(editor), inversion, SOURCE, None)
    inversion.extras = {"null_embeddings": tuned.null_embeddings, "stdg": tuned.stdg}
    edited = editor.denoise(inversion, SOURCE, seed=0, source_prompt=SOURCE)
    assert torch.allclose(edited, tuned.reconstruction, atol=1e-4), (edited - tuned.reconstruction).abs().max()
    other = editor.denoise(inversion, EDIT, seed=0, source_prompt=SOURCE)
    assert not torch.allclose(other, tuned.reconstruction, atol=1e-2)


def test_the_mask_shapes_the_edit(video_pipe):
    """With mutual attention on from the first step, the mask decides which source keys the edit sees."""
    editor = editor_for(video_pipe, null_steps=0, tau_s=0.0)
    frames = moving_frames(4)
    results = []
    for mask in (None, centre_mask(4)):
        result = editor.edit(frames, SOURCE, [("e", EDIT)], seed=0, key="k", mask=mask)
        results.append(result.frames["e"].astype(int))
    assert np.abs(results[0] - results[1]).max() > 0


def test_a_second_style_reuses_the_tuning_and_the_mask_is_part_of_the_key(video_pipe, tmp_path):
    from vidbatch.engine.inversion_cache import InversionCache

    settings = EditorSettings(method="videodirector", control="none", steps=2,
                              method_settings=VideoDirectorConfig(null_steps=1))
    editor = VideoEditor(video_pipe, settings, InversionCache(tmp_path / "cache"), model_identity="tiny+motion")
    frames, mask = moving_frames(4), centre_mask(4)
    first = editor.edit(frames, SOURCE, [("a", EDIT)], seed=0, key="k", mask=mask)
    second = editor.edit(frames, SOURCE, [("b", "a green star")], seed=0, key="k", mask=mask)
    again = editor.edit(frames, SOURCE, [("a", EDIT)], seed=0, key="k", mask=mask)
    other_mask = editor.edit(frames, SOURCE, [("a", EDIT)], seed=0, key="k", mask=~mask)
    assert (first.inversion_cache, second.inversion_cache, again.inversion_cache) == ("miss", "hit", "hit")
    assert other_mask.inversion_cache == "miss"
    assert np.array_equal(first.frames["a"], again.frames["a"])


MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from vidbatch.engine.editor import EditorSettings, VideoEditor
    from vidbatch.engine.methods.videodirector import VideoDirectorConfig
    from vidbatch.models.loading import load_pipeline
    from vidbatch.models.motion import with_motion_adapter
    frames = int(sys.argv[1])
    video = np.random.default_rng(0).integers(0, 255, (frames, 128, 128, 3), dtype=np.uint8)
    settings = EditorSettings(method="videodirector", control="none", steps=2, vae_batch=4,
                              method_settings=VideoDirectorConfig(null_steps=1))
    editor = VideoEditor(with_motion_adapter(load_pipeline("tiny"), "tiny"), settings)
    editor.edit(video, "a", [("e", "b")], seed=0, key="k")
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def test_peak_memory_of_a_long_clip_stays_near_one_window():
    peaks = {}
    for frames in (16, 48):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(frames)], capture_output=True, text=True,
                             check=True)
        peaks[frames] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    assert peaks[48] <= 1.15 * peaks[16], peaks


# ------------------------------------------------------------------------------------------------
# Through the CLI


def mask_clip(path: Path, frames: int = 8, size: int = 32) -> Path:
    from vidbatch.io.video import encode_mp4

    mask = np.repeat(centre_mask(frames, size)[..., None], 3, axis=-1).astype(np.uint8) * 255
    path.write_bytes(encode_mp4(mask, 8.0))
    return path


def test_a_run_with_videodirector_and_a_mask(tmp_path, clips):
    clip = clips["fractal"]                                # 64x64, 6 frames
    masked = video_sample("masked", clip)
    masked["mask.mp4"] = mask_clip(tmp_path / "m.mp4", frames=6, size=64).read_bytes()
    bad = video_sample("badmask", clip)
    bad["mask.mp4"] = mask_clip(tmp_path / "short.mp4", frames=2, size=64).read_bytes()
    shard = write_shard(tmp_path / "in" / "p0.tar", [masked, video_sample("plain", clip), bad])
    out = tmp_path / "out"
    code = run_cli("run", TINY, "--input", shard, "--output", out, "--set", "edit.method=videodirector",
                   "--set", "model.motion_adapter=tiny", "--set", "edit.steps=2", "--set", "video.size=32",
                   "--set", "videodirector.null_steps=1")
    assert code == 0
    rows = {json.loads(r)["key"]: json.loads(r) for r in (out / "stats" / "p0.jsonl").read_text().splitlines()}
    assert rows["masked"]["status"] == "ok" and rows["plain"]["status"] == "ok"
    assert rows["badmask"]["status"] == "failed" and "mask.mp4" in rows["badmask"]["error"]
    samples = read_output(out / "shards" / "p0.tar")
    assert any(k.endswith(".mp4") and k != "mp4" for k in samples["masked"])


def test_the_config_names_the_missing_adapter_and_refuses_it_for_image_methods(tmp_path):
    from vidbatch.config.schema import load_config

    with pytest.raises(ConfigError, match="model.motion_adapter"):
        load_config(TINY, ["edit.method=videodirector"])
    with pytest.raises(ConfigError, match="image"):
        load_config(TINY, ["model.motion_adapter=tiny"])
    with pytest.raises(ConfigError, match="edit.control"):
        load_config(TINY, ["edit.method=videodirector", "model.motion_adapter=tiny", "edit.control=pnp"])
    assert is_motion_unet(motion_unet(load_pipeline("tiny").unet, load_motion_adapter("tiny")))


# ------------------------------------------------------------------------------------------------
# The attention control, one processor call at a time


def _attention_call(processor, frames: int = 2, tokens: int = 16, context=None, seed: int = 0, heads: int = 2,
                    cross_norm: str | None = None):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(seed)
    attn = Attention(query_dim=8, heads=heads, dim_head=8 // heads, cross_attention_dim=None if context is None else 6,
                     cross_attention_norm=cross_norm)
    hidden = torch.randn(vd.BRANCHES * frames, tokens, 8)
    with torch.no_grad():
        out = processor(attn, hidden, context)
        q, k, v = project_heads(attn, hidden, attn.norm_encoder_hidden_states(context) if attn.norm_cross else context)
    return attn, out, q.unflatten(0, (4, -1)), k.unflatten(0, (4, -1)), v.unflatten(0, (4, -1))


def _state(step: int, self_replace_steps: int, mask=None) -> vd.DirectorState:
    state = vd.DirectorState(stdg_blocks=[], mutual_blocks=["up_blocks"], self_replace_max_tokens=1024, mode="edit",
                             self_replace_steps=self_replace_steps)
    state.begin_call(step, 2, mask, (4, 4))
    return state


def _expected(attn, probs_or_out, v=None):
    out = probs_or_out if v is None else probs_or_out @ v
    out = out.transpose(1, 2).reshape(out.shape[0], -1, 8)
    return attn.to_out[0](out)


def test_before_tau_s_the_edit_takes_the_sources_self_attention_maps_with_its_own_values():
    state = _state(step=0, self_replace_steps=1)
    attn, out, q, k, v = _attention_call(vd.SpatialSelfProcessor(state, "up_blocks.1.x", False, True))
    probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
    with torch.no_grad():
        edit_cond = _expected(attn, probs[vd.SOURCE_COND], v[vd.EDIT_COND])
        edit_uncond = _expected(attn, probs[vd.EDIT_UNCOND], v[vd.EDIT_UNCOND])
    rows = out.unflatten(0, (4, -1))
    assert torch.allclose(rows[vd.EDIT_COND], edit_cond, atol=1e-5)
    assert torch.allclose(rows[vd.EDIT_UNCOND], edit_uncond, atol=1e-5)     # the reference leaves uncond alone


@pytest.mark.parametrize("limit, replaced", [(16, True), (15, False)])
def test_the_source_maps_replace_the_edits_only_at_layers_of_at_most_self_replace_max_tokens(limit, replaced):
    state = _state(step=0, self_replace_steps=1)
    state.self_replace_max_tokens = limit
    attn, out, q, k, v = _attention_call(vd.SpatialSelfProcessor(state, "up_blocks.1.x", False, True))   # 16 tokens
    probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
    rows = out.unflatten(0, (4, -1))
    with torch.no_grad():
        for branch in range(vd.BRANCHES):
            maps = probs[vd.SOURCE_COND] if replaced and branch == vd.EDIT_COND else probs[branch]
            assert torch.allclose(rows[branch], _expected(attn, maps, v[branch]), atol=1e-5), branch


@pytest.mark.parametrize("kind", ["spatial", "spatial recorded", "temporal", "temporal recorded"])
def test_outside_the_edit_each_processor_is_diffusers_stock_attention(kind):
    """Plain and record modes (with a residual connection and an output rescale, which SD's blocks do not use)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    state = vd.DirectorState(stdg_blocks=[], mutual_blocks=["up_blocks"], self_replace_max_tokens=1024,
                             mode="record" if kind.endswith("recorded") else "plain")
    make = vd.SpatialSelfProcessor if kind.startswith("spatial") else vd.TemporalProcessor
    processor = make(state, "up_blocks.1.x", True, True) if make is vd.SpatialSelfProcessor else make(state, "up_blocks.1.x", True)
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4, residual_connection=True, rescale_output_factor=2.0)
    hidden = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert torch.allclose(processor(attn, hidden), AttnProcessor2_0()(attn, hidden), atol=1e-5)
    assert bool(state.record.keys or state.record.temporal) == kind.endswith("recorded")


@pytest.mark.parametrize("foreground", [True, False])
def test_after_tau_s_the_edit_attends_to_the_sources_background_and_itself(foreground):
    mask = torch.full((2, 4, 4), foreground)
    state = _state(step=1, self_replace_steps=1, mask=mask)
    # Four heads, not two (the branches the mask is expanded over): the mask must broadcast over the heads.
    attn, out, q, k, v = _attention_call(vd.SpatialSelfProcessor(state, "up_blocks.1.x", False, True), heads=4)
    keys = k[vd.EDIT_COND] if foreground else torch.cat([k[vd.SOURCE_COND], k[vd.EDIT_COND]], dim=-2)
    values = v[vd.EDIT_COND] if foreground else torch.cat([v[vd.SOURCE_COND], v[vd.EDIT_COND]], dim=-2)
    with torch.no_grad():
        expected = _expected(attn, torch.nn.functional.scaled_dot_product_attention(q[vd.EDIT_COND], keys, values))
        source = _expected(attn, torch.nn.functional.scaled_dot_product_attention(
            q[vd.SOURCE_COND], k[vd.SOURCE_COND], v[vd.SOURCE_COND]))
    rows = out.unflatten(0, (4, -1))
    assert torch.allclose(rows[vd.EDIT_COND], expected, atol=1e-5)
    assert torch.allclose(rows[vd.SOURCE_COND], source, atol=1e-5)


@pytest.mark.parametrize("passed", ["context", "mask"])
@pytest.mark.parametrize("kind", ["temporal", "spatial"])
def test_self_attention_refuses_a_context_or_a_mask_naming_its_kind_and_layer(kind, passed):
    from diffusers.models.attention_processor import Attention

    name = "up_blocks.1.motion_modules.0.transformer_blocks.0.attn1" if kind == "temporal" else "up_blocks.1.x"
    state = _state(step=0, self_replace_steps=0)
    processor = vd.TemporalProcessor(state, name, True) if kind == "temporal" else vd.SpatialSelfProcessor(
        state, name, True, True)
    hidden = torch.randn(8, 4, 8)
    given = {"encoder_hidden_states": hidden} if passed == "context" else {"attention_mask": torch.zeros(8, 4, 4)}
    with pytest.raises(NotImplementedError, match=rf"^VideoDirector {kind} attention .* block {name} passed"):
        processor(Attention(query_dim=8, heads=2, dim_head=4), hidden, **given)


@pytest.mark.parametrize("cross_norm", [None, "layer_norm"])
def test_cross_attention_is_refined_from_the_source_before_tau_c(cross_norm):
    """Where the layer normalises its context (`cross_attention_norm`), the refined maps come from the normalised one."""
    from vidbatch.engine.prompt_to_prompt import refine_mapping

    state = _state(step=0, self_replace_steps=0)
    state.cross_steps = 1
    state.mapper, state.alphas = refine_mapping([0, 5, 6, 9], [0, 5, 7, 6, 9], length=7)
    context = torch.randn(vd.BRANCHES * 2, 7, 6)
    attn, out, q, k, v = _attention_call(vd.CrossProcessor(state, "up_blocks.1.x", None), context=context,
                                         cross_norm=cross_norm)
    probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
    refined = probs[vd.SOURCE_COND][..., state.mapper] * state.alphas + probs[vd.EDIT_COND] * (1 - state.alphas)
    with torch.no_grad():
        expected = _expected(attn, refined, v[vd.EDIT_COND])
    assert torch.allclose(out.unflatten(0, (4, -1))[vd.EDIT_COND], expected, atol=1e-5)


def test_cross_attention_elsewhere_is_the_processor_it_replaced_and_refine_refuses_what_it_cannot_do():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4, cross_attention_dim=6)
    hidden, context = torch.randn(8, 16, 8), torch.randn(8, 7, 6)
    mask = torch.zeros(8, 1, 7)
    mask[..., -2:] = -1e4                                                   # the last two context tokens masked
    state = _state(step=1, self_replace_steps=0)
    state.cross_steps = 1                                                   # step 1 is past the refine window
    processor = vd.CrossProcessor(state, "up_blocks.1.x", AttnProcessor2_0())
    with torch.no_grad():
        assert torch.equal(processor(attn, hidden, context), AttnProcessor2_0()(attn, hidden, context))
        state.mode, state.step = "plain", 0
        assert torch.equal(processor(attn, hidden, context, mask), AttnProcessor2_0()(attn, hidden, context, mask))
        state.mode = "edit"
        with pytest.raises(NotImplementedError, match=r"block up_blocks\.1\.x: prompt-to-prompt supports"):
            processor(attn, hidden, context, mask)
        grouped = Attention(query_dim=8, heads=2, dim_head=4, cross_attention_dim=6, norm_num_groups=4)
        with pytest.raises(NotImplementedError, match=r"block up_blocks\.1\.x: prompt-to-prompt supports"):
            processor(grouped, hidden, context)


# ------------------------------------------------------------------------------------------------
# Against the authors' code (tests/fixtures/videodirector_reference.safetensors: their
# calculate_motion_rank_with_mask, calculate_semantic_loss_with_mask and customized_step_with_grad,
# from Yukun66/Video_Director d1b7168, run on these seeded tensors)


def test_losses_and_steered_step_match_the_authors_code():
    from safetensors.torch import load_file

    ref = load_file(str(Path(__file__).parent / "fixtures" / "videodirector_reference.safetensors"))
    mask = ref["mask"].bool()
    for region, region_mask in (("fg", mask), ("bg", ~mask)):
        query_mask = vd.mask_at(region_mask, (4, 4), 16).T
        motion = vd.temporal_map_loss(ref["ref_maps"], ref["gen_maps"], query_mask, top_k=1)
        appearance = vd.key_loss(ref["ref_keys"], ref["gen_keys"], vd.mask_at(region_mask, (4, 4), 16))
        assert torch.allclose(motion, ref[f"motion_{region}"][0], rtol=1e-5), region
        assert torch.allclose(appearance, ref[f"appearance_{region}"][0], rtol=1e-5), region
    pipe = with_motion_adapter(load_pipeline("tiny"), "tiny")
    assert pipe.scheduler.config.beta_schedule == "linear"                # AnimateDiff's, as the authors run it
    alphas = pipe.scheduler.alphas_cumprod
    t = int(ref["step_t"][0])
    per_frame = lambda x: x[0].permute(1, 0, 2, 3)                            # (1, 4, F, h, w) -> (F, 4, h, w)
    ours = ddim.score_guided_step(per_frame(ref["sample"]), per_frame(ref["model_output"]), alphas[t],
                                  alphas[t - 1000 // 50], "epsilon", per_frame(ref["score"]), 1.0)
    assert torch.allclose(ours, per_frame(ref["stepped"]), atol=1e-5)


def test_inversion_key_parts_are_every_setting_the_tuned_inversion_depends_on():
    """The null-text tuning and the STDG-guided inversion depend on these settings (and on no other of the
    section): each one, set to a value other than its default, is in the cache key's parts under its own name
    (the names are the key format of the entries already on disk)."""
    changed = dict(null_steps=3, null_lr=0.05, early_stop=0.001, stdg=[0.1, 0.2, 0.3, 0.4], stdg_scale=2.0,
                   stdg_blocks=["up_blocks.1"], stdg_block_weights=[5.0], top_k=2, window=8, overlap=2)
    method = vd.VideoDirector(EditorSettings(method="videodirector", guidance=5.0,
                                             method_settings=VideoDirectorConfig(**changed)))
    assert method.inversion_parts() == {"videodirector": {**changed, "guidance": 5.0}}
    defaults = vd.VideoDirector(EditorSettings(method="videodirector")).inversion_parts()["videodirector"]
    assert all(defaults[name] != value for name, value in changed.items()) and defaults["guidance"] != 5.0
    # Settings of the edit alone (the attention control's windows) leave the inversion's key as it is.
    edit_only = VideoDirectorConfig(tau_s=0.1, tau_c=0.2, mutual_blocks=["down_blocks"], self_replace_max_tokens=64)
    assert vd.VideoDirector(EditorSettings(method="videodirector", method_settings=edit_only)).inversion_parts() == \
        {"videodirector": defaults}
