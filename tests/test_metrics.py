"""Known-answer tests of vidbatch.metrics on synthetic videos (a blurred random texture that
translates by a few pixels per frame) and on a tiny random-weight CLIP."""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import pytest
import torch

from vidbatch import metrics
from vidbatch.core.errors import ConfigError
from vidbatch.metrics import flow as flow_module
from vidbatch.metrics import (
    ClipScorer,
    compute_metrics,
    estimate_flow,
    interp_psnr,
    load_clip_scorer,
    make_tiny_clip,
    warp_error,
)

H = W = 64
DX, DY = 2, 1  # content motion per frame, pixels


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random RGB texture, `(h, w, 3)` uint8, full 0..255 range."""
    noise = np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)
    tex = cv2.GaussianBlur(noise, (0, 0), 3.0)
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    return (tex * 255).round().astype(np.uint8)


def translating_video(t: int = 6, dx: int = DX, dy: int = DY, seed: int = 0) -> np.ndarray:
    """`(t, H, W, 3)` crops of a larger texture; the window moves by (dx, dy) each frame, so the
    content moves by (-dx, -dy): the true flow from frame i to i+1 is (-dx, -dy)."""
    pad = 4 + max(abs(dx), abs(dy)) * t
    tex = texture(H + 2 * pad, W + 2 * pad, seed)
    return np.stack([tex[pad + i * dy : pad + i * dy + H, pad + i * dx : pad + i * dx + W] for i in range(t)])


def noise_frame(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def video() -> np.ndarray:
    return translating_video()


@pytest.fixture(scope="module")
def static() -> np.ndarray:
    return np.repeat(texture(H, W)[None], 6, axis=0)


# --- optical flow -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_flow_recovers_translation(video, method):
    flow = estimate_flow(video[0], video[1], method)
    assert flow.shape == (H, W, 2) and flow.dtype == np.float32
    inner = flow[8:-8, 8:-8].reshape(-1, 2)  # away from the borders where content enters
    np.testing.assert_allclose(np.median(inner, axis=0), [-DX, -DY], atol=0.25)


def test_unknown_flow_method_is_a_config_error(video):
    with pytest.raises(ConfigError, match="raft"):
        estimate_flow(video[0], video[1], "raft")


# --- occlusion mask ---------------------------------------------------------------------------


def test_valid_mask_consistency_and_frame_border():
    fw = np.zeros((16, 20, 2), np.float32)
    fw[..., 0] = 3.0  # everything moves 3 px right
    consistent = flow_module._valid_mask(fw, -fw, metrics.DEFAULT_OCCLUSION_THRESHOLD)
    # Only the 3 right-most columns leave the frame.
    assert consistent[:, :17].all() and not consistent[:, 17:].any()
    # A backward flow that does not undo the forward one (|3 + 3|^2 = 36 > 0.01 * 18 + 0.5).
    inconsistent = flow_module._valid_mask(fw, fw.copy(), metrics.DEFAULT_OCCLUSION_THRESHOLD)
    assert not inconsistent.any()


# --- warp error -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_static_video_has_no_warp_error(static, method):
    assert warp_error(static, static, flow_method=method) < 1e-3


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_warp_error_small_on_moving_video_and_catches_bad_frames(video, method):
    clean = warp_error(video, video, flow_method=method)
    assert 0.0 <= clean < 5e-3

    corrupted = video.copy()
    corrupted[3] = noise_frame()
    assert warp_error(video, corrupted, flow_method=method) > 5 * clean + 0.02

    # Consecutive edited frames that are not consecutive in time: no pair follows the source motion.
    shuffled = video[[3, 5, 2, 0, 4, 1]]
    assert warp_error(video, shuffled, flow_method=method) > 5 * clean + 0.02


def test_warp_error_measures_the_edit_not_the_source(video):
    # A temporally consistent edit (a fixed colour change) keeps a low error; flickering
    # brightness of the edit does not, although the flow is the same (it comes from the source).
    consistent = (255 - video).astype(np.uint8)
    flicker = video.astype(np.int16) + np.array([0, 40, 0, 40, 0, 40], np.int16)[:, None, None, None]
    flicker = flicker.clip(0, 255).astype(np.uint8)
    assert warp_error(video, consistent) < 5e-3
    assert warp_error(video, flicker) > 0.1


def test_warp_error_with_edited_at_another_size(video):
    # Edited at 1.5x the source size: the source is resized before the flow, so the flow is in
    # edited pixels and a faithful (upscaled) edit still has a small error.
    big = np.stack([cv2.resize(f, (96, 96), interpolation=cv2.INTER_LINEAR) for f in video])
    clean = warp_error(video, big)
    assert clean < 5e-3
    corrupted = big.copy()
    corrupted[2] = cv2.resize(noise_frame(), (96, 96), interpolation=cv2.INTER_NEAREST)
    assert warp_error(video, corrupted) > 5 * clean + 0.02


def test_warp_error_input_errors(video):
    with pytest.raises(ValueError, match="at least 2 frames"):
        warp_error(video[:1], video[:1])
    with pytest.raises(ValueError, match="same number of frames"):
        warp_error(video, video[:4])
    with pytest.raises(ValueError, match="uint8"):
        warp_error(video, video.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        warp_error(video[..., 0], video[..., 0])


# --- interpolation PSNR -----------------------------------------------------------------------


def test_interp_psnr_known_value():
    # Neighbours at 100, middle frame at 110: MSE = (10/255)^2, PSNR = 20 log10(25.5).
    frames = np.full((3, 8, 8, 3), 100, np.uint8)
    frames[1] = 110
    assert interp_psnr(frames) == pytest.approx(20 * math.log10(25.5), abs=1e-9)
    # Linear ramps are predicted exactly by the neighbour average: capped, not inf.
    ramp = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (10, 20, 30, 40)])
    assert interp_psnr(ramp) == metrics.PSNR_CAP_DB


def test_interp_psnr_static_moving_and_corrupted(static, video):
    assert interp_psnr(static) == metrics.PSNR_CAP_DB
    moving = interp_psnr(video)
    assert 15.0 < moving < metrics.PSNR_CAP_DB
    corrupted = video.copy()
    corrupted[3] = noise_frame()
    assert interp_psnr(corrupted) < moving - 3.0


def test_interp_psnr_needs_three_frames(video):
    with pytest.raises(ValueError, match="at least 3 frames"):
        interp_psnr(video[:2])


# --- CLIP -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def scorer(clip_dir) -> ClipScorer:
    return ClipScorer(str(clip_dir))


def test_tiny_clip_loads_offline_with_processor(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir)
    processor = CLIPProcessor.from_pretrained(clip_dir)
    assert model.config.vision_config.image_size == 32
    assert model.config.text_config.hidden_size == 32
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    ids = processor.tokenizer(["a red car"], return_tensors="pt").input_ids
    assert ids[0, 0] == processor.tokenizer.bos_token_id and ids[0, -1] == processor.tokenizer.eos_token_id
    pixels = processor(images=[texture(40, 56)], return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 32, 32)


def test_make_tiny_clip_is_seeded_and_leaves_global_rng_alone(tmp_path, clip_dir):
    from transformers import CLIPModel

    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    make_tiny_clip(tmp_path / "same", seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    make_tiny_clip(tmp_path / "other", seed=1)
    def weight(folder):
        return CLIPModel.from_pretrained(folder).visual_projection.weight

    assert torch.equal(weight(clip_dir), weight(tmp_path / "same"))
    assert not torch.equal(weight(clip_dir), weight(tmp_path / "other"))


def test_preprocessing_matches_clip_processor(scorer, clip_dir):
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(clip_dir)
    for h, w in [(48, 80), (80, 48)]:  # landscape and portrait: resize and crop on either axis
        frames = np.stack([texture(h, w, seed=s) for s in range(2)])
        ours = scorer._preprocess(frames)
        theirs = processor(images=list(frames), return_tensors="pt")["pixel_values"]
        assert ours.shape == theirs.shape
        # torch vs PIL bicubic differ slightly; channel order, crop or normalisation errors would not.
        assert (ours - theirs).abs().mean() < 0.02


def test_clip_scores_equal_model_outputs(scorer, clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    # At the model's size no resampling happens, so our preprocessing and the processor agree.
    source = np.stack([texture(32, 32, seed=s) for s in range(3)])
    edited = np.stack([texture(32, 32, seed=10 + s) for s in range(3)])
    prompts = ["a red car", "a blue car"]
    with torch.no_grad():
        out = model(**processor(text=prompts, images=list(edited) + list(source), return_tensors="pt", padding=True))
    cosine = (out.logits_per_image[:3, 0] / model.logit_scale.exp()).mean().item()
    img, txt = out.image_embeds, out.text_embeds  # normalised by CLIPModel
    frame = (img[0] @ img[1] + img[1] @ img[2]).item() / 2
    d_img = img[:3].mean(0) - img[3:].mean(0)
    direction = torch.nn.functional.cosine_similarity(d_img, txt[0] - txt[1], dim=0).item()

    s = scorer.scores(edited, "a red car", source=source, source_prompt="a blue car")
    assert s["clip_text"] == pytest.approx(cosine, abs=1e-4)
    assert s["clip_frame"] == pytest.approx(frame, abs=1e-4)
    assert s["clip_dir"] == pytest.approx(direction, abs=1e-4)


def test_clip_scores_ranges_and_known_values(scorer, video, static):
    s = scorer.scores(video, "a red car")
    assert set(s) == {"clip_text", "clip_frame", "clip_dir"}
    assert -1.0 <= s["clip_text"] <= 1.0
    assert -1.0 <= s["clip_frame"] <= 1.0
    assert s["clip_dir"] is None  # no source

    assert scorer.scores(static, "a red car")["clip_frame"] == pytest.approx(1.0, abs=1e-5)

    edited = (255 - video).astype(np.uint8)
    with_dir = scorer.scores(edited, "a blue car", source=video, source_prompt="a red car")
    assert -1.0 <= with_dir["clip_dir"] <= 1.0
    # The same prompt twice has no text direction: not computable rather than 0.
    assert scorer.scores(edited, "a car", source=video, source_prompt="a car")["clip_dir"] is None


def test_clip_scores_are_batch_size_independent(scorer, video):
    one_batch = scorer.image_embeddings(video, batch_size=32)
    small_batches = scorer.image_embeddings(video, batch_size=4)
    torch.testing.assert_close(one_batch, small_batches, atol=1e-5, rtol=0)


def test_load_clip_scorer(tmp_path, clip_dir):
    missing = tmp_path / "no_such_clip"
    scorer, reason = load_clip_scorer(str(missing), "cpu")
    assert scorer is None and str(missing) in reason and "\n" not in reason
    assert load_clip_scorer(None, "cpu") == (None, "disabled")
    assert load_clip_scorer("none", "cpu") == (None, "disabled")
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    scorer, reason = load_clip_scorer(str(not_a_model), "cpu")
    assert scorer is None and str(not_a_model) in reason and "\n" not in reason
    scorer, reason = load_clip_scorer(str(clip_dir), "cpu")
    assert isinstance(scorer, ClipScorer) and reason is None


# --- compute_metrics --------------------------------------------------------------------------


def test_compute_metrics_all_off(video):
    assert compute_metrics(video, video, "p", "s", warp=False, interp=False, clip=None) == dict.fromkeys(
        metrics.METRIC_KEYS
    )


def test_compute_metrics_all_on(video, scorer):
    edited = (255 - video).astype(np.uint8)
    out = compute_metrics(video, edited, "a blue car", "a red car", warp=True, interp=True, clip=scorer)
    assert set(out) == set(metrics.METRIC_KEYS)
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values()), out
    assert out["warp_error"] == pytest.approx(warp_error(video, edited))
    assert out["interp_psnr"] == pytest.approx(interp_psnr(edited))


def test_compute_metrics_not_computable_is_none(video, scorer):
    two = compute_metrics(video[:2], video[:2], "p", None, warp=True, interp=True, clip=scorer)
    assert two["interp_psnr"] is None and two["clip_dir"] is None
    assert two["warp_error"] is not None and two["clip_frame"] is not None
    one = compute_metrics(video[:1], video[:1], "p", "s", warp=True, interp=True, clip=scorer)
    assert one["warp_error"] is None and one["interp_psnr"] is None and one["clip_frame"] is None
    assert one["clip_text"] is not None


# --- the registry -----------------------------------------------------------------------------


def test_registry_entries_and_config_agree():
    """Every metric has labels and a direction; the config's flow choices are the metrics' flows;
    a metric key cannot be registered twice."""
    from vidbatch.config.schema import MetricsConfig

    registered = metrics.registered_metrics()
    assert tuple(m.key for m in registered) == metrics.METRIC_KEYS == metrics.metric_keys()
    assert all(m.label and m.short_label and m.direction in ("higher", "lower") for m in registered)
    assert [m.key for m in registered if m.lower_is_better] == ["warp_error"]
    flow_field = next(f for f in dataclasses.fields(MetricsConfig) if f.name == "flow")
    assert tuple(flow_field.metadata["choices"]) == metrics.FLOW_METHODS
    with pytest.raises(ValueError, match="registered already"):
        metrics.register(registered[0])
    with pytest.raises(ValueError, match="direction"):
        metrics.Metric("x", "x", "x", "up", lambda inputs: 0.0)


def test_clip_metrics_share_one_clip_pass(video, scorer, monkeypatch):
    calls = []
    original = ClipScorer.scores

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ClipScorer, "scores", counting)
    compute_metrics(video, video, "a blue car", "a red car", warp=False, interp=False, clip=scorer)
    assert len(calls) == 1
