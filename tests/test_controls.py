"""The controls' own parts, called directly: `edit.control` parsing, SDEdit's first step, PnP's step counts
and residual injector, and the ControlNet's conditioning tensor and loader.

Known answers are worked out by hand; the models are the project's tiny UNet and a tiny ControlNet made from
it (vidbatch.testing.controlnet), saved to and loaded from a real folder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from vidbatch.core.errors import ConfigError, ModelLoadError
from vidbatch.engine.controls import parse_control
from vidbatch.engine.controls.controlnet import cause_line, condition_tensor, load_controlnet
from vidbatch.engine.controls.pnp import PnpResidualInjector, injection_steps
from vidbatch.engine.controls.sdedit import first_step
from vidbatch.models.builtin import tiny_config
from vidbatch.testing.controlnet import make_tiny_controlnet

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DConditionModel:
    """The tiny model's UNet (its vocabulary does not shape the UNet), seeded random weights."""
    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_config(vocab_size=8, bos_token_id=0, eos_token_id=1)["unet"]).eval()


@pytest.fixture(scope="module")
def controlnet_folder(tiny_unet, tmp_path_factory):
    return make_tiny_controlnet(tiny_unet, tmp_path_factory.mktemp("controlnet") / "cn")


# --- edit.control ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, controls", [
    ("none", set()),
    ("pnp", {"pnp"}),
    ("pnp+controlnet", {"pnp", "controlnet"}),
    (" sdedit + pnp ", {"sdedit", "pnp"}),
    ("pnp+sdedit+controlnet", {"pnp", "sdedit", "controlnet"}),
])
def test_parse_control_splits_on_plus_and_drops_none(text, controls):
    assert parse_control(text) == frozenset(controls)


@pytest.mark.parametrize("text", ["nothing", "pnp+nothing", "pnp controlnet", "pnp,controlnet", "", "pnp+",
                                  "none+pnp", "pnp+none", "none+none", "pnp+pnp", "pnp+controlnet+pnp", "auto"])
def test_parse_control_refuses_unknown_names_none_in_a_stack_and_repeats(text):
    with pytest.raises(ConfigError):
        parse_control(text)


# --- SDEdit -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, strength, first", [
    (10, 1.0, 0),     # every step re-done: start from the noisiest
    (10, 0.5, 5),
    (10, 0.26, 7),    # 2.6 steps round to 3 re-done (truncating would re-do 2)
    (10, 0.24, 8),
    (4, 0.75, 1),
    (10, 0.0, 9),     # nothing to re-do still runs the last step
    (10, 0.04, 9),    # 0.4 rounds to none
    (1, 0.3, 0),
])
def test_sdedit_first_step_redoes_the_last_strength_of_the_steps(steps, strength, first):
    assert first_step(steps, strength) == first


# --- PnP ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, f_t, attn_t, counts", [
    (50, 0.8, 0.5, (40, 25)),   # the paper's defaults
    (10, 0.5, 0.3, (5, 3)),
    (10, 0.25, 0.99, (2, 9)),   # the first whole steps: 2.5 -> 2, 9.9 -> 9
    (7, 1.0, 0.0, (7, 0)),
])
def test_pnp_injects_for_the_first_whole_share_of_the_steps(steps, f_t, attn_t, counts):
    assert injection_steps(steps, f_t, attn_t) == counts


def conv_input(unet, rows: int) -> torch.Tensor:
    """Distinct random rows for the injector's convolution (`up_blocks[1].resnets[1].conv2`) at 4x4."""
    conv = unet.up_blocks[1].resnets[1].conv2
    return torch.randn(rows, conv.in_channels, 4, 4, generator=torch.Generator().manual_seed(rows))


@torch.no_grad()
def test_pnp_injector_is_inert_until_activated(tiny_unet):
    """A new injector leaves the convolution alone; declaring branches alone does not start it, and starting
    it without declaring branches treats the batch as one branch."""
    x = conv_input(tiny_unet, 4)
    plain = tiny_unet.up_blocks[1].resnets[1].conv2(x)
    for declare in ("nothing", "branches", "active"):
        injector = PnpResidualInjector(tiny_unet)
        try:
            if declare == "branches":
                injector.num_branches = 2
            elif declare == "active":
                injector.active = True
            assert torch.equal(injector.conv(x), plain), declare
        finally:
            injector.remove()


@torch.no_grad()
@pytest.mark.parametrize("branches", [2, 3])
def test_pnp_injector_copies_branch_zero_rows_into_every_branch(tiny_unet, branches):
    frames = 2
    x = conv_input(tiny_unet, branches * frames)
    injector = PnpResidualInjector(tiny_unet)
    try:
        plain = injector.conv(x)
        injector.active, injector.num_branches = True, branches
        injected = injector.conv(x)
    finally:
        injector.remove()
    assert not torch.equal(plain[:frames], plain[frames:2 * frames])   # branches that differ to begin with
    assert torch.equal(injected, plain[:frames].repeat(branches, 1, 1, 1))


@torch.no_grad()
def test_pnp_injector_takes_each_video_source_branch_within_its_segment(tiny_unet):
    """Three videos in one call: 2 branches x 2 frames, 1 branch x 1 frame, 3 branches x 1 frame."""
    x = conv_input(tiny_unet, 8)
    injector = PnpResidualInjector(tiny_unet)
    try:
        plain = injector.conv(x)
        injector.active, injector.segments = True, [(2, 2), (1, 1), (3, 1)]
        injected = injector.conv(x)
    finally:
        injector.remove()
    want = plain[[0, 1, 0, 1, 4, 5, 5, 5]]
    assert torch.equal(injected, want)


@torch.no_grad()
@pytest.mark.parametrize("branches, segments, rows", [(2, None, 5), (3, None, 4), (1, [(2, 2), (1, 1)], 6)])
def test_pnp_injector_refuses_a_batch_that_does_not_split_into_the_declared_branches(tiny_unet, branches,
                                                                                      segments, rows):
    injector = PnpResidualInjector(tiny_unet)
    try:
        injector.active, injector.num_branches, injector.segments = True, branches, segments
        with pytest.raises(RuntimeError):
            injector.conv(conv_input(tiny_unet, rows))
    finally:
        injector.remove()


# --- ControlNet -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_condition_tensor_is_channels_first_in_unit_range(dtype):
    """(T, H, W, 3) uint8 -> (T, 3, H, W) / 255 in the asked dtype; a channel-reversed view (BGR read as
    RGB, negative strides) is taken as it reads."""
    rgb = np.random.default_rng(0).integers(0, 256, (2, 3, 5, 3), dtype=np.uint8)
    rgb[0, 0, 0] = (0, 255, 128)
    bgr_view = rgb[..., ::-1]
    got = condition_tensor(bgr_view, CPU, dtype)
    assert got.shape == (2, 3, 3, 5) and got.dtype == dtype and got.device == CPU
    for t in range(2):
        for c in range(3):
            want = torch.from_numpy(bgr_view[t, :, :, c].astype(np.float64) / 255.0).to(dtype)
            torch.testing.assert_close(got[t, c], want, rtol=1e-3 if dtype == torch.float16 else 1e-12, atol=0)
    assert got[0, :, 0, 0].tolist() == pytest.approx([128 / 255, 1.0, 0.0], abs=1e-3)


def test_condition_tensor_lands_on_the_asked_device():
    images = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    assert condition_tensor(images, torch.device("meta"), torch.float32).device.type == "meta"


def test_load_controlnet_gives_a_frozen_model_in_the_asked_dtype_and_device(controlnet_folder):
    controlnet = load_controlnet(str(controlnet_folder), dtype=torch.float16, device=CPU)
    params = list(controlnet.parameters())
    assert {p.dtype for p in params} == {torch.float16}
    assert not controlnet.training
    assert not any(p.requires_grad for p in params)
    on_meta = load_controlnet(str(controlnet_folder), dtype=torch.float32, device=torch.device("meta"))
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}


def test_load_controlnet_names_a_folder_without_a_model_as_a_folder(tmp_path):
    with pytest.raises(ModelLoadError) as caught:
        load_controlnet(str(tmp_path), dtype=torch.float32, device=CPU)
    cause = caught.value.__cause__
    assert isinstance(cause, OSError) and len(str(cause).strip().splitlines()) == 1
    assert f"as a diffusers folder: {str(cause).strip()}. Fix:" in str(caught.value)


def test_load_controlnet_names_a_missing_path_as_a_hub_id_with_its_cause_first_line(tmp_path):
    """Offline (the tests' HF_HUB_OFFLINE), a path that does not exist is tried as a hub id; the cause
    runs to several lines and only the first is quoted."""
    with pytest.raises(ModelLoadError) as caught:
        load_controlnet(str(tmp_path / "missing"), dtype=torch.float32, device=CPU)
    cause_lines = str(caught.value.__cause__).strip().splitlines()
    assert len(cause_lines) > 1
    message = str(caught.value)
    assert f"as a diffusers hub id (is the hub reachable?): {cause_lines[0]}. Fix:" in message
    assert cause_lines[1] not in message


def test_cause_line_is_the_first_message_line_or_the_type_name():
    assert cause_line(OSError("  no config.json here\nsee the docs\n")) == "no config.json here"
    assert cause_line(ValueError("one line")) == "one line"
    assert cause_line(KeyError()) == "KeyError"
    assert cause_line(RuntimeError("   \n ")) == "RuntimeError"
