"""The shared attention-processor plumbing (engine/processors.py) where `make mutate` found the suite
blind: block-prefix matching, the checks that refuse what frame attention cannot handle, the split
between frame-attention and motion-module blocks, and a model with nothing to patch.

Real diffusers parts throughout (``Attention``, ``BasicTransformerBlock``, ``AutoencoderKL``), built at
toy sizes.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention

from vidbatch.engine.processors import (
    check_layout,
    check_self_attention,
    in_blocks,
    install_processors,
    motion_blocks,
    transformer_blocks,
)


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
    from diffusers import MotionAdapter, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from vidbatch.models.builtin import tiny_config
    from vidbatch.models.motion import motion_unet, tiny_adapter_config

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
    from vidbatch.engine.processors import project_heads

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
    from vidbatch.engine.processors import project_heads

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
    from diffusers import UNet2DConditionModel

    from vidbatch.models.builtin import tiny_config

    return UNet2DConditionModel(**tiny_config(64, 0, 1)["unet"])


def test_a_patch_keeps_its_state_and_restoring_calls_on_restore_once():
    from diffusers.models.attention_processor import AttnProcessor2_0

    from vidbatch.engine.processors import installed_patch, restore_processors

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
    from diffusers.models.attention_processor import AttnProcessor2_0

    from vidbatch.engine.processors import attend

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    attn.set_processor(AttnProcessor2_0())
    x, context = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    with torch.no_grad():
        torch.testing.assert_close(attend(attn, x, context), attn(x, encoder_hidden_states=context))
