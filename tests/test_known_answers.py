"""Known answers computed independently of the code under test.

The references here are written out from the papers and OpenCV in float64, never by calling the
function they check: the DDIM update (Song et al., eq. 12) with epsilon and v-prediction, the
noise schedule of the tiny model's DDIM scheduler, classifier-free guidance, and OpenCV's Canny.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from conftest import moving_frames, write_shard
from vidbatch.engine import ddim
from vidbatch.engine.controls.controlnet import canny_frames
from vidbatch.engine.editor import EditorSettings, Inversion, VideoEditor

# --- the DDIM closed form, float64 ------------------------------------------------------------


def ref_eps_x0(out, x, alpha, prediction_type):
    """(ε, x0) from a model output read at ᾱ = `alpha` (float64 numpy)."""
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha)
    else:  # v-prediction (Salimans & Ho): v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0
        eps = math.sqrt(alpha) * out + math.sqrt(1 - alpha) * x
        x0 = math.sqrt(alpha) * x - math.sqrt(1 - alpha) * out
    return eps, x0


def ref_sigma(eta, alpha_t, alpha_prev):
    """DDIM's σ_t(η) = η sqrt((1-ᾱ_prev)/(1-ᾱ_t)) sqrt(1-ᾱ_t/ᾱ_prev)."""
    return eta * math.sqrt((1 - alpha_prev) / (1 - alpha_t)) * math.sqrt(1 - alpha_t / alpha_prev)


def ref_denoise(x, out, alpha_t, alpha_prev, prediction_type, eta=0.0, z=None):
    """x_prev = sqrt(ᾱ_prev) x0 + sqrt(1-ᾱ_prev-σ²) ε + σ z."""
    eps, x0 = ref_eps_x0(out, x, alpha_t, prediction_type)
    sigma = ref_sigma(eta, alpha_t, alpha_prev)
    x_prev = math.sqrt(alpha_prev) * x0 + math.sqrt(1 - alpha_prev - sigma**2) * eps
    return x_prev + sigma * z if eta > 0 else x_prev


def ref_invert(x, out, alpha_from, alpha_to, prediction_type):
    """DDIM inversion from ᾱ_from to the noisier ᾱ_to, the model run at the target timestep (output read with ᾱ_to)."""
    eps, _ = ref_eps_x0(out, x, alpha_to, prediction_type)
    x0 = (x - math.sqrt(1 - alpha_from) * eps) / math.sqrt(alpha_from)
    return math.sqrt(alpha_to) * x0 + math.sqrt(1 - alpha_to) * eps


def ref_schedule():
    """The tiny model's DDIM schedule (SD's scaled_linear betas 0.00085..0.012 over 1000 steps), float64.

    Returns (ᾱ over the 1000 training timesteps, the final ᾱ: ᾱ_0, as set_alpha_to_one is False)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas = np.cumprod(1.0 - betas)
    return alphas, alphas[0]


def ref_timesteps(steps):
    """DDIM 'leading' timesteps with steps_offset 1, descending, and each one's previous (cleaner) timestep."""
    ratio = 1000 // steps
    timesteps = [i * ratio + 1 for i in reversed(range(steps))]
    return timesteps, [t - ratio for t in timesteps]


def tensors(seed, *shape, count):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(count)]


# ᾱ pairs (noisy, clean) from the ends and the middle of SD's schedule.
ALPHA_PAIRS = [(0.0047, 0.0060), (0.30, 0.55), (0.9, 0.9991)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("alpha_t, alpha_prev", ALPHA_PAIRS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_denoising_step_is_ddim_closed_form(prediction_type, alpha_t, alpha_prev, eta):
    x, out, z = tensors(0, 2, 4, 3, 5, count=3)
    got = ddim.denoising_step(x.float(), out.float(), torch.tensor(alpha_t), torch.tensor(alpha_prev),
                              prediction_type, eta, z.float() if eta > 0 else None)
    want = ref_denoise(x.numpy(), out.numpy(), alpha_t, alpha_prev, prediction_type, eta, z.numpy())
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("alpha_to, alpha_from", ALPHA_PAIRS)
def test_inversion_step_is_ddim_closed_form(prediction_type, alpha_from, alpha_to):
    x, out = tensors(1, 2, 4, 3, 5, count=2)
    got = ddim.inversion_step(x.float(), out.float(), torch.tensor(alpha_from), torch.tensor(alpha_to),
                              prediction_type)
    want = ref_invert(x.numpy(), out.numpy(), alpha_from, alpha_to, prediction_type)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-4, atol=2e-5)


def test_eta_sigma_known_values():
    # σ at η = 1 between ᾱ_t = 0.3 and ᾱ_prev = 0.55: sqrt(0.45/0.7 * (1 - 0.3/0.55)), by hand.
    sigma = math.sqrt(0.45 / 0.7 * (1 - 0.3 / 0.55))
    assert sigma == pytest.approx(0.54060, abs=1e-4)
    x = torch.zeros(1, 4, 2, 2)
    z = torch.ones(1, 4, 2, 2)
    # ε = 0 and x = 0: x0 = 0, so the step's output is the noise term σ z alone.
    got = ddim.denoising_step(x, torch.zeros_like(x), torch.tensor(0.3), torch.tensor(0.55), "epsilon", 1.0, z)
    np.testing.assert_allclose(got.numpy(), np.full((1, 4, 2, 2), sigma), rtol=1e-5)


# --- the same maths through the editor, with a UNet stand-in ------------------------------------


class StandInUnet:
    """Replaces `VideoEditor.unet_output`: output = a·latents + b·(t/1000) per branch, the branch told by its
    text embedding, so tests know every UNet output. Records the timesteps it was run at."""

    def __init__(self, branches: dict[str, tuple[torch.Tensor, float, float]]):
        self.branches = branches  # name -> (embedding (1, 77, C), a, b)
        self.calls: list[tuple[int, list[str]]] = []

    def __call__(self, latents, t, embeddings, condition=None):
        out = torch.empty(latents.shape, dtype=torch.float32)
        names = []
        for i in range(len(latents)):
            name = next((n for n, (e, _, _) in self.branches.items() if torch.equal(embeddings[i], e[0])), None)
            assert name is not None, "the UNet got an embedding of no known prompt"
            _, a, b = self.branches[name]
            out[i] = a * latents[i].float() + b * float(t) / 1000
            names.append(name)
        self.calls.append((int(t), names))
        return out

    def output(self, name, x, t):
        _, a, b = self.branches[name]
        return a * x + b * t / 1000


def stand_in_editor(pipe, monkeypatch, prediction_type, **settings):
    editor = VideoEditor(pipe, EditorSettings(**settings))
    editor.prediction_type = prediction_type
    unet = StandInUnet({
        "neg": (editor.text_embedding("a negative prompt"), 0.3, -0.7),
        "dst": (editor.text_embedding("the edit prompt"), -0.2, 0.9),
        "src": (editor.text_embedding("the source prompt"), 0.5, 0.4),
    })
    monkeypatch.setattr(editor, "unet_output", unet)
    return editor, unet


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_editor_denoise_is_guided_ddim(pipe, monkeypatch, prediction_type):
    steps, guidance = 3, 6.0
    editor, unet = stand_in_editor(pipe, monkeypatch, prediction_type, steps=steps, guidance=guidance,
                                   negative_prompt="a negative prompt", chunk_size=2, control="none")
    timesteps, prev = ref_timesteps(steps)
    alphas, final = ref_schedule()
    (start,) = tensors(2, 3, 4, 2, 3, count=1)
    trajectory = torch.zeros(steps, 3, 4, 2, 3)
    trajectory[0] = start.float()
    inversion = Inversion(timesteps=torch.tensor(timesteps), trajectory=trajectory, clean=trajectory[0])
    got = editor.denoise(inversion, "the edit prompt", seed=0, source_prompt="the source prompt")

    x = start.numpy()
    for t, p in zip(timesteps, prev):
        uncond, cond = unet.output("neg", x, t), unet.output("dst", x, t)
        guided = uncond + guidance * (cond - uncond)      # classifier-free guidance (Ho & Salimans)
        x = ref_denoise(x, guided, alphas[t], alphas[p] if p >= 0 else final, prediction_type)
    np.testing.assert_allclose(got.double().numpy(), x, rtol=1e-4, atol=1e-4)
    assert [t for t, _ in unet.calls] == [t for t in timesteps for _ in range(2)]   # 2 chunks per step
    assert all(names == ["neg"] * 2 + ["dst"] * 2 or names == ["neg", "dst"] for _, names in unet.calls)


def test_guidance_reads_uncond_and_cond_with_a_source_branch(pipe, monkeypatch):
    # PnP runs a leading source branch: guidance must still combine the last two (uncond, cond).
    steps, guidance = 2, 4.0
    editor, unet = stand_in_editor(pipe, monkeypatch, "epsilon", steps=steps, guidance=guidance, method="per-frame",
                                   negative_prompt="a negative prompt", control="pnp", pnp_f_t=1.0, pnp_attn_t=0.0)
    timesteps, prev = ref_timesteps(steps)
    alphas, final = ref_schedule()
    trajectory = torch.stack(tensors(3, 2, 4, 2, 2, count=steps)).float()
    inversion = Inversion(timesteps=torch.tensor(timesteps), trajectory=trajectory, clean=trajectory[0])
    got = editor.denoise(inversion, "the edit prompt", seed=0, source_prompt="the source prompt")

    x = trajectory[0].double().numpy()
    for t, p in zip(timesteps, prev):
        uncond, cond = unet.output("neg", x, t), unet.output("dst", x, t)
        x = ref_denoise(x, uncond + guidance * (cond - uncond), alphas[t], alphas[p] if p >= 0 else final, "epsilon")
    np.testing.assert_allclose(got.double().numpy(), x, rtol=1e-4, atol=1e-4)
    assert all(names == ["src"] * 2 + ["neg"] * 2 + ["dst"] * 2 for _, names in unet.calls)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_editor_inversion_is_ddim_inversion(pipe, monkeypatch, prediction_type):
    steps = 4
    editor, unet = stand_in_editor(pipe, monkeypatch, prediction_type, steps=steps, inversion_batch=2)
    timesteps, _ = ref_timesteps(steps)
    alphas, final = ref_schedule()
    inversion = editor.invert(moving_frames(3, 32), "the source prompt")
    assert inversion.timesteps.tolist() == timesteps

    x = inversion.clean.double().numpy()   # the VAE latents: not what is checked here
    alpha_from = final
    want = {}
    for t in reversed(timesteps):          # ascending noise level
        x = ref_invert(x, unet.output("src", x, t), alpha_from, alphas[t], prediction_type)
        alpha_from = alphas[t]
        want[t] = x
    np.testing.assert_allclose(inversion.trajectory.double().numpy(), np.stack([want[t] for t in timesteps]),
                               rtol=1e-4, atol=1e-4)


# --- ControlNet Canny conditioning ------------------------------------------------------------


def rgb_to_gray_bt601(frame: np.ndarray) -> np.ndarray:
    """OpenCV's RGB2GRAY on uint8, written out: Y = 0.299 R + 0.587 G + 0.114 B in 15-bit fixed point, rounded."""
    r, g, b = (frame[..., i].astype(np.int64) for i in range(3))
    return ((r * 9798 + g * 19235 + b * 3735 + (1 << 14)) >> 15).astype(np.uint8)


def reference_canny(frames: np.ndarray, low: int, high: int) -> np.ndarray:
    """What a Canny ControlNet is trained on: cv2.Canny of the luma, repeated to 3 channels."""
    edges = np.stack([cv2.Canny(rgb_to_gray_bt601(f), low, high) for f in frames])
    return np.repeat(edges[..., None], 3, axis=-1)


def edge_test_frames(count: int = 2, size: int = 64, seed: int = 7) -> np.ndarray:
    """Blocks of random colours (steps of every contrast, with red-green/blue differences that a
    wrong channel order would weigh differently) over a smooth ramp."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 120, size)[None, :, None]
    frames = []
    for _ in range(count):
        blocks = np.kron(rng.integers(0, 136, (size // 8, size // 8, 3)), np.ones((8, 8, 1)))
        frames.append((blocks + ramp).clip(0, 255).astype(np.uint8))
    return np.stack(frames)


def test_gray_reference_is_opencv_luma():
    # Every one of the 2^24 colours, as one 4096 x 4096 image.
    v = np.arange(1 << 24, dtype=np.uint32)
    image = np.stack([v >> 16, (v >> 8) & 255, v & 255], -1).astype(np.uint8).reshape(4096, 4096, 3)
    assert np.array_equal(rgb_to_gray_bt601(image), cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))


@pytest.mark.parametrize("low, high", [(30, 70), (100, 200), (150, 250)])
def test_canny_frames_equal_opencv_canny_of_the_luma(low, high):
    frames = edge_test_frames()
    got = canny_frames(frames, low, high)
    assert got.shape == frames.shape and got.dtype == np.uint8
    want = reference_canny(frames, low, high)
    assert 0.02 < (want > 0).mean() < 0.5        # an image with edges, not a blank or solid map
    assert np.array_equal(got, want)


def test_canny_thresholds_come_from_the_config(tmp_path):
    """controlnet.canny_low/high reach the edges a sample is conditioned on (decode included)."""
    from vidbatch.batch.module import ShardDataset
    from vidbatch.config.schema import load_config
    from vidbatch.io.video import encode_mp4
    from conftest import TINY

    low, high = 30, 70
    frames = edge_test_frames(count=3)
    write_shard(tmp_path / "in.tar", [{"__key__": "k", "mp4": encode_mp4(frames, 8, crf=0), "txt": "x"}])
    config = load_config(TINY, ["edit.control=controlnet", f"controlnet.model={tmp_path / 'cn'}",
                                f"controlnet.canny_low={low}", f"controlnet.canny_high={high}", "video.size=64"])
    (prepared,) = ShardDataset(str(tmp_path / "in.tar"), config, size_multiple=8)
    assert prepared.error is None and prepared.frames.shape == frames.shape
    want = reference_canny(prepared.frames, low, high)
    # The thresholds matter on these frames: the defaults, or either one left at its default, differ.
    for other in [(100, 200), (low, 200), (100, high)]:
        assert not np.array_equal(want, reference_canny(prepared.frames, *other)), other
    assert np.array_equal(prepared.control_frames, want)


# --- warp error's occlusion mask --------------------------------------------------------------

OCC_SIZE, OCC_OBJECT, OCC_STEP, OCC_AT, OCC_FRAMES = 64, 16, 4, (24, 12), 3


def occlusion_clip():
    """A textured square sliding OCC_STEP px right per frame over a still textured background.

    Returns (frames (T, H, W, 3) uint8, true flows {(t, t+1) and (t+1, t): (H, W, 2)}, the pixels of
    frame 0 the square covers in frame 1 (occluded there), the square's pixels in frame 0)."""
    rng = np.random.default_rng(3)
    n, s, d, (y0, x0) = OCC_SIZE, OCC_OBJECT, OCC_STEP, OCC_AT
    background = np.kron(rng.integers(0, 256, (n // 4, n // 4, 3)), np.ones((4, 4, 1))).astype(np.uint8)
    square = np.kron(rng.integers(0, 256, (s // 4, s // 4, 3)), np.ones((4, 4, 1))).astype(np.uint8)
    frames, flows = [], {}
    for t in range(OCC_FRAMES):
        frame = background.copy()
        frame[y0:y0 + s, x0 + d * t:x0 + d * t + s] = square
        frames.append(frame)
    for t in range(OCC_FRAMES - 1):
        forward = np.zeros((n, n, 2), np.float32)
        forward[y0:y0 + s, x0 + d * t:x0 + d * t + s, 0] = d          # the square moves right
        backward = np.zeros((n, n, 2), np.float32)
        backward[y0:y0 + s, x0 + d * (t + 1):x0 + d * (t + 1) + s, 0] = -d
        flows[t, t + 1], flows[t + 1, t] = forward, backward
    occluded = np.zeros((n, n), bool)
    occluded[y0:y0 + s, x0 + s:x0 + s + d] = True   # background of frame 0 the square moves onto
    on_square = np.zeros((n, n), bool)
    on_square[y0:y0 + s, x0:x0 + s] = True
    return np.stack(frames), flows, occluded, on_square


@pytest.fixture
def true_flow(monkeypatch):
    """The clip and its exact flows, which `warp_error` then uses instead of estimating them."""
    from vidbatch.metrics import flow as flow_module

    frames, flows, occluded, on_square = occlusion_clip()

    def estimate(a, b, method="dis"):
        (i,) = [t for t in range(len(frames)) if np.array_equal(frames[t], a)]
        (j,) = [t for t in range(len(frames)) if np.array_equal(frames[t], b)]
        return flows[i, j].copy()

    monkeypatch.setattr(flow_module, "estimate_flow", estimate)
    return frames, flows, occluded, on_square


def test_occlusion_mask_is_the_occluded_region(true_flow):
    from vidbatch.metrics import flow as flow_module

    frames, flows, occluded, _ = true_flow
    mask = flow_module._valid_mask(flows[0, 1], flows[1, 0], flow_module.DEFAULT_OCCLUSION_THRESHOLD)
    assert np.array_equal(mask, ~occluded)


def test_warp_error_ignores_exactly_the_occluded_pixels(true_flow):
    from vidbatch.metrics import warp_error

    frames, _, occluded, on_square = true_flow
    assert warp_error(frames, frames) < 1e-7             # exact flows, integer shifts: a perfect warp
    # An edit that differs from the perfectly warped video only where frame 0 is occluded in frame 1
    # (there is no frame before 0 to warp it onto): the mask hides it all.
    inside = frames.copy()
    inside[0][occluded] = 255 - inside[0][occluded]
    assert warp_error(frames, inside) < 1e-7
    # Without the mask these pixels would count: 64 of 4096, each ~0.5 off, over 2 pairs (~4e-3).
    unmasked = np.abs(inside[0].astype(float) - frames[0]).mean(-1)[occluded].sum() / 255 / occluded.size / 2
    assert unmasked > 2e-3
    # The same change on pixels that are visible in both frames (the moving square) is measured, exactly.
    visible = frames.copy()
    visible[0][on_square] = 255 - visible[0][on_square]
    want = np.abs(visible[0].astype(float) - frames[0]).mean(-1)[on_square].sum() / 255 / (~occluded).sum() / 2
    assert warp_error(frames, visible) == pytest.approx(want, rel=1e-5)
