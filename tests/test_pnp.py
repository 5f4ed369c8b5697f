"""Plug-and-Play injection: where it acts, what it copies, and agreement with the authors' code.

A UNet call on ``F`` frames has batch ``3*F``, branch-major ``[source, uncond, cond]``. PnP copies
branch 0's (the source branch's) ``conv2`` output of ``up_blocks[1].resnets[1]`` into the other
branches (each keeps its own skip path) and, in the decoder self-attentions of
``pnp_attention_blocks``, branch 0's queries and keys.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

from vidbatch.engine.controls.pnp import PnpResidualInjector
from vidbatch.engine.methods.vidtome import apply_patch, remove_patch
from vidbatch.models.builtin import sd15_random_config

FIXTURE = Path(__file__).parent / "fixtures" / "pnp_reference.json"
BRANCHES, FRAMES, LATENT, TOKENS = 3, 2, 16, 8
TIMESTEP = 501  # one of the 50 DDIM timesteps of SD (1 + 20k)

# The reference's 8 query/key injection sites (pnp-diffusers, register_attention_control_efficient).
SD15_QK_BLOCKS = frozenset(
    [f"up_blocks.1.attentions.{j}.transformer_blocks.0" for j in (1, 2)]
    + [f"up_blocks.{i}.attentions.{j}.transformer_blocks.0" for i in (2, 3) for j in (0, 1, 2)]
)
# The same rule (every decoder self-attention but the first) on the 2-level tiny model.
TINY_QK_BLOCKS = frozenset(
    [f"up_blocks.0.attentions.{j}.transformer_blocks.0" for j in (1, 2)]
    + [f"up_blocks.1.attentions.{j}.transformer_blocks.0" for j in (0, 1, 2)]
)


# --- models and inputs (the golden fixture was made with exactly these) -------------------------

def sd15_layout_config() -> dict:
    """SD 1.5's UNet config (vidbatch.models.builtin.sd15_random_config) with small widths.

    Same block types, levels, layers per block, heads and resnet/attention structure; channels
    (32, 32, 64, 64) instead of (320, 640, 1280, 1280), cross-attention width 16, 16x16 latents.
    """
    config = dict(sd15_random_config()["unet"])
    config.update(block_out_channels=(32, 32, 64, 64), cross_attention_dim=16, sample_size=LATENT)
    return config


@torch.no_grad()
def seeded_unet(config: dict, seed: int = 0) -> UNet2DConditionModel:
    """A UNet whose weights depend only on `seed` and the parameter names, not on diffusers' init code.

    Parameters in sorted name order, from one CPU generator: matrices and kernels uniform in
    +-1/sqrt(fan_in); GroupNorm/LayerNorm weights 1 + 0.1 N(0, 1); every other vector 0.1 N(0, 1).
    """
    unet = UNet2DConditionModel(**config).eval()
    modules = dict(unet.named_modules())
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(unet.named_parameters()):
        owner = modules[name.rpartition(".")[0]]
        if param.ndim >= 2:
            bound = 1.0 / math.sqrt(param[0].numel())
            param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
        elif isinstance(owner, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and name.endswith("weight"):
            param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
        else:
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return unet


def pnp_inputs(text_dim: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk as the engine builds it: latents `(3F, 4, 16, 16)` = [source, x, x], text `(3F, 8, text_dim)`.

    The source branch has its own latents; uncond and cond share latents and differ by text only.
    """
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(FRAMES, 4, LATENT, LATENT, generator=g)
    edit = torch.randn(FRAMES, 4, LATENT, LATENT, generator=g)
    text = torch.randn(BRANCHES, 1, TOKENS, text_dim, generator=g).expand(BRANCHES, FRAMES, TOKENS, text_dim)
    return torch.cat([source, edit, edit]), text.reshape(BRANCHES * FRAMES, TOKENS, text_dim)


def digest(t: torch.Tensor) -> dict:
    """A compact float64 fingerprint of a tensor: shape, sums, per-branch sums and 48 sampled values.

    The index-weighted sum changes when values move between positions (e.g. branches swapped).
    """
    x = t.detach().double().flatten()
    ramp = torch.linspace(-1.0, 1.0, len(x), dtype=torch.float64)
    picks = torch.linspace(0, len(x) - 1, 48).round().long()
    return {
        "shape": list(t.shape),
        "sum": x.sum().item(),
        "sum_sq": (x * x).sum().item(),
        "ramp_sum": (x * ramp).sum().item(),
        "branch_sums": [b.sum().item() for b in x.reshape(BRANCHES, -1)],
        "picks": x[picks].tolist(),
    }


def digest_distance(a: dict, b: dict) -> float:
    """Largest difference between two digests, each entry scaled by its magnitude (sums by sqrt(n))."""
    assert a["shape"] == b["shape"]
    n = math.prod(a["shape"])
    worst = 0.0
    for key in ("sum", "sum_sq", "ramp_sum"):
        worst = max(worst, abs(a[key] - b[key]) / math.sqrt(n))
    for key in ("branch_sums", "picks"):
        scale = math.sqrt(n / BRANCHES) if key == "branch_sums" else 1.0
        worst = max(worst, max(abs(x - y) / scale for x, y in zip(a[key], b[key])))
    return worst


# --- running a UNet with PnP and watching it ------------------------------------------------------

def shortcut(resnet, x: torch.Tensor) -> torch.Tensor:
    return resnet.conv_shortcut(x) if resnet.conv_shortcut is not None else x


@torch.no_grad()
def run_pnp(unet, latents: torch.Tensor, text: torch.Tensor, *, features: bool, qk: bool) -> dict:
    """One UNet call with our PnP (per-frame attention), recording what the tests look at.

    Returns:
        "out": UNet output `(3F, 4, h, w)`; "resnet_in" / "resnet_out": input and output of
        `up_blocks[1].resnets[1]`; "attn": block name -> (attn1 input `(3F, N, C)`, attn1 output).
    """
    seen: dict = {"attn": {}}
    resnet = unet.up_blocks[1].resnets[1]

    def on_resnet(module, args, output):
        seen["resnet_in"], seen["resnet_out"] = args[0].clone(), output.clone()

    def on_attn(name):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            seen["attn"][name] = (x.clone(), output.clone())
        return hook

    handles = [resnet.register_forward_hook(on_resnet)]
    handles += [block.attn1.register_forward_hook(on_attn(name), with_kwargs=True)
                for name, block in unet.named_modules() if isinstance(block, BasicTransformerBlock)]
    state = apply_patch(unet, "per-frame")
    injector = PnpResidualInjector(unet)
    try:
        state.begin_chunk(FRAMES, BRANCHES, inject_qk=qk)
        injector.active, injector.num_branches = features, BRANCHES
        seen["out"] = unet(latents, TIMESTEP, encoder_hidden_states=text).sample
    finally:
        injector.remove()
        remove_patch(unet)
        for handle in handles:
            handle.remove()
    return seen


def residuals(unet, seen: dict) -> torch.Tensor:
    """What each branch's `up_blocks[1].resnets[1]` added to its skip path, `(3, F, C, h, w)`.

    `output * output_scale_factor - shortcut(input)`: the block's `conv2` output, whatever
    implementation produced the output.
    """
    resnet = unet.up_blocks[1].resnets[1]
    r = seen["resnet_out"] * resnet.output_scale_factor - shortcut(resnet, seen["resnet_in"])
    return r.reshape(BRANCHES, FRAMES, *r.shape[1:])


def attention(attn, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
    """Stock self-attention per frame with queries from q_in, keys from k_in, values from v_in: `(b, N, C)`."""
    b = q_in.shape[0]

    def heads(t):
        return t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(attn.to_q(q_in)), heads(attn.to_k(k_in)), heads(attn.to_v(v_in)))
    return attn.to_out[0](out.transpose(1, 2).reshape(b, v_in.shape[1], -1))


@pytest.fixture(scope="module")
def sd15_layout() -> UNet2DConditionModel:
    return seeded_unet(sd15_layout_config())


@pytest.fixture(scope="module", params=["tiny", "sd15-layout"])
def model(request, sd15_layout):
    """(name, UNet, text width, expected q/k blocks) for the built-in tiny model and SD 1.5's layout."""
    if request.param == "tiny":
        unet = request.getfixturevalue("pipe").unet
        return "tiny", unet, unet.config.cross_attention_dim, TINY_QK_BLOCKS
    return "sd15-layout", sd15_layout, 16, SD15_QK_BLOCKS


# --- residual injection ---------------------------------------------------------------------------

def test_residual_injection_keeps_each_branch_skip_path(model):
    """With injection, cond and uncond differ from the source only by their own (scaled) shortcut."""
    _, unet, text_dim, _ = model
    latents, text = pnp_inputs(text_dim)
    seen = run_pnp(unet, latents, text, features=True, qk=False)
    resnet = unet.up_blocks[1].resnets[1]
    out = seen["resnet_out"].reshape(BRANCHES, FRAMES, *seen["resnet_out"].shape[1:])
    skip = shortcut(resnet, seen["resnet_in"]).reshape(out.shape) / resnet.output_scale_factor
    for b in (1, 2):
        skip_difference = skip[b] - skip[0]
        assert skip_difference.abs().max() > 1e-2  # the branches' skip paths do differ here
        torch.testing.assert_close(out[b] - out[0], skip_difference, atol=1e-5, rtol=0)


def test_injected_residual_comes_from_the_source_branch(model):
    """Every branch adds the source branch's own residual, not the last (or any other) branch's."""
    _, unet, text_dim, _ = model
    latents, text = pnp_inputs(text_dim)
    plain = residuals(unet, run_pnp(unet, latents, text, features=False, qk=False))
    injected = residuals(unet, run_pnp(unet, latents, text, features=True, qk=False))
    for b in (1, 2):
        assert (plain[b] - plain[0]).abs().max() > 1e-2  # a wrong branch would be seen
        torch.testing.assert_close(injected[b], plain[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(injected[0], plain[0], atol=0, rtol=0)  # the source branch is untouched


# --- query/key injection --------------------------------------------------------------------------

@torch.no_grad()
def test_qk_injection_acts_in_the_reference_blocks_with_source_queries_and_keys(model):
    """Exactly the expected self-attentions use branch 0's queries and keys; the others are stock."""
    name, unet, text_dim, expected = model
    latents, text = pnp_inputs(text_dim)
    seen = run_pnp(unet, latents, text, features=False, qk=True)
    assert len(seen["attn"]) == sum(isinstance(m, BasicTransformerBlock) for m in unet.modules())
    injected_blocks = set()
    for block, (x, out) in seen["attn"].items():
        attn = unet.get_submodule(block).attn1
        xb, outb = x.reshape(BRANCHES, FRAMES, *x.shape[1:]), out.reshape(BRANCHES, FRAMES, *out.shape[1:])
        torch.testing.assert_close(outb[0], attention(attn, xb[0], xb[0], xb[0]), atol=1e-5, rtol=0)
        with_source_qk = [attention(attn, xb[0], xb[0], xb[b]) for b in (1, 2)]
        stock = [attention(attn, xb[b], xb[b], xb[b]) for b in (1, 2)]
        gap = max((s - w).abs().max().item() for s, w in zip(stock, with_source_qk))
        assert gap > 1e-3, f"{name} {block}: injected and stock attention cannot be told apart"
        if all(torch.allclose(outb[b], w, atol=1e-5, rtol=0) for b, w in zip((1, 2), with_source_qk)):
            injected_blocks.add(block)
        else:
            for b, s in zip((1, 2), stock):
                torch.testing.assert_close(outb[b], s, atol=1e-5, rtol=0, msg=lambda m: f"{block}: {m}")
    assert injected_blocks == expected


def test_pnp_attention_blocks_on_sd15_and_tiny_layouts(pipe):
    """SD 1.5's exact UNet (built on the meta device: no weights): the reference's 8; tiny: the rule's 5."""
    from vidbatch.engine.controls.pnp import pnp_attention_blocks

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**sd15_random_config()["unet"])
    assert pnp_attention_blocks(sd15) == SD15_QK_BLOCKS
    assert pnp_attention_blocks(pipe.unet) == TINY_QK_BLOCKS
    assert pnp_attention_blocks(torch.nn.Linear(2, 2)) == frozenset()


@pytest.mark.parametrize("method", ["per-frame", "tokenflow", "vid2vid-zero"])
def test_every_method_patches_qk_injection_into_the_same_blocks(sd15_layout, method):
    """The three self-attention processor families take q/k injection in the reference's 8 blocks only."""
    from vidbatch.engine.methods.tokenflow import apply_tokenflow, remove_tokenflow
    from vidbatch.engine.methods.vid2vid_zero import apply_vid2vid_zero, remove_vid2vid_zero

    apply, remove = {
        "per-frame": (lambda u: apply_patch(u, "per-frame"), remove_patch),
        "tokenflow": (apply_tokenflow, remove_tokenflow),
        "vid2vid-zero": (apply_vid2vid_zero, remove_vid2vid_zero),
    }[method]
    apply(sd15_layout)
    try:
        flags = {name: block.attn1.processor.pnp_qk for name, block in sd15_layout.named_modules()
                 if isinstance(block, BasicTransformerBlock)}
    finally:
        remove(sd15_layout)
    assert len(flags) == 16
    assert {name for name, flag in flags.items() if flag} == SD15_QK_BLOCKS


# --- agreement with the authors' code -------------------------------------------------------------

def test_matches_the_reference_implementation(sd15_layout):
    """Our PnP gives what pnp-diffusers computes on the same UNet and inputs (fixture pnp_reference.json).

    How the fixture was made (a scratch script outside this repository, not kept): the authors'
    repository MichalGeyer/pnp-diffusers at commit e9207c001c81dbf2dc1af0b3136bf81fc10c7946, its
    `pnp_utils.register_attention_control_efficient(model, schedule)` and
    `register_conv_control_efficient(model, schedule)` with `schedule = tensor([501])`, then
    `register_time(model, 501)`, `model` being a namespace holding only `unet`; their code ran
    unchanged with diffusers 0.42.1 and torch 2.13 (CPU, float32). The UNet is
    `seeded_unet(sd15_layout_config())` (SD 1.5's layout, widths (32, 32, 64, 64), seed 0) and the
    inputs `pnp_inputs(16)` (seed 1): latents `(6, 4, 16, 16)` = [source, uncond, cond] x 2 frames,
    text `(6, 8, 16)`, timestep 501 (both injections active). Recorded: `digest()` of the output of
    `up_blocks[1].resnets[1]` `(6, 64, 4, 4)` and of the UNet output `(6, 4, 16, 16)`.
    Measured distance of ours: 0 (resnet) and 4e-7 (UNet); without any injection 0.77 and 0.10;
    with only the residual injection 0 and 0.03.
    """
    fixture = json.loads(FIXTURE.read_text())
    assert fixture["timestep"] == TIMESTEP and fixture["frames"] == FRAMES and fixture["branches"] == BRANCHES
    latents, text = pnp_inputs(16)
    ours = run_pnp(sd15_layout, latents, text, features=True, qk=True)
    plain = run_pnp(sd15_layout, latents, text, features=False, qk=False)
    for key, ref in (("resnet_out", fixture["resnet_out"]), ("out", fixture["unet_out"])):
        assert digest_distance(digest(plain[key]), ref) > 1e-2  # injection changes what the fixture holds
        assert digest_distance(digest(ours[key]), ref) < 1e-5, key
