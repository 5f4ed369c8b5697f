"""Model files in the formats users bring, written from our random-weight models: an original-layout
(CompVis / A1111) single-file checkpoint and a LoRA, so the real loaders are exercised offline."""

from __future__ import annotations

import re
from pathlib import Path

import torch

_LDM_UNET = "model.diffusion_model."
_LDM_VAE = "first_stage_model."
_LDM_CLIP = "cond_stage_model.transformer.text_model."


def _unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DConditionModel state dict to the original (CompVis) UNet layout.

    Original layout: input_blocks.0 = conv_in; then per down block `layers_per_block` (resnet [, attention])
    entries and one downsampler entry (none after the last block); middle_block.{0,1,2} = resnet, attention,
    resnet; output_blocks: per up block `layers_per_block + 1` entries, the last one of each block (but the
    last block) holding the upsampler after its resnet/attention.
    """
    resnet_parts = {
        "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
        "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
    }
    top = {
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    }
    per_down = layers_per_block + 1
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.+)\.(weight|bias)", key)
        module, param = (m.group(1), m.group(2)) if m else (key, "")
        new: str | None = top.get(module)
        if new is None:
            if mm := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
                b, j, part = int(mm[1]), int(mm[2]), mm[3]
                new = f"input_blocks.{1 + b * per_down + j}.0.{resnet_parts[part]}"
            elif mm := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
                b, j = int(mm[1]), int(mm[2])
                new = f"input_blocks.{1 + b * per_down + j}.1.{mm[3]}"
            elif mm := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
                new = f"input_blocks.{1 + int(mm[1]) * per_down + layers_per_block}.0.op"
            elif mm := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", module):
                new = f"middle_block.{2 * int(mm[1])}.{resnet_parts[mm[2]]}"
            elif mm := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
                new = f"middle_block.1.{mm[1]}"
            elif mm := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
                new = f"output_blocks.{int(mm[1]) * per_down + int(mm[2])}.0.{resnet_parts[mm[3]]}"
            elif mm := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
                new = f"output_blocks.{int(mm[1]) * per_down + int(mm[2])}.1.{mm[3]}"
            elif mm := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
                b = int(mm[1])
                last = b * per_down + layers_per_block
                has_attn = any(k.startswith(f"up_blocks.{b}.attentions.") for k in state)
                new = f"output_blocks.{last}.{2 if has_attn else 1}.conv"
            else:
                raise ValueError(f"no original-layout name for UNet key {key!r}")
        out[_LDM_UNET + new + (f".{param}" if param else "")] = value
    return out


def _vae_to_ldm(state: dict[str, torch.Tensor], n_up: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to the original (CompVis) layout.

    Decoder up blocks are numbered in reverse in the original; mid-block attention projections are 1x1 convs
    there (weights get two trailing singleton dims).
    """
    attn_parts = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        if mm := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{mm[1]}.block.{mm[2]}.{mm[3]}"
        elif mm := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
            new = f"encoder.down.{mm[1]}.downsample.{mm[2]}"
        elif mm := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(mm[1])}.block.{mm[2]}.{mm[3]}"
        elif mm := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(mm[1])}.upsample.{mm[2]}"
        elif mm := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{mm[1]}.mid.block_{int(mm[2]) + 1}.{mm[3]}"
        elif mm := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{mm[1]}.mid.attn_1.{attn_parts[mm[2]]}.{mm[3]}"
            if mm[3] == "weight" and mm[2] != "group_norm":
                value = value[:, :, None, None]
        new = new.replace("conv_shortcut", "nin_shortcut")
        out[_LDM_VAE + new] = value
    return out


def make_single_file_checkpoint(model_dir: str | Path, out_file: str | Path) -> Path:
    """Save a diffusers SD folder as one original-layout (CompVis / A1111) checkpoint (.safetensors, or .ckpt).

    Keys: "model.diffusion_model.*" (UNet), "first_stage_model.*" (VAE), "cond_stage_model.transformer.
    text_model.*" (CLIP text encoder), the layout `StableDiffusionPipeline.from_single_file` converts from.
    Tokenizer and scheduler are not part of such a file; loading it needs `config=model_dir` offline.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    model_dir = Path(model_dir)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder")
    tensors = _unet_to_ldm(unet.state_dict(), unet.config.layers_per_block)
    tensors.update(_vae_to_ldm(vae.state_dict(), len(vae.config.up_block_types)))
    for key, value in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        tensors[_LDM_CLIP + key.removeprefix("text_model.")] = value
    tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if out_file.suffix.lower() == ".ckpt":
        # The legacy pickle format: the tensors under "state_dict", as CompVis/A1111 saved them.
        torch.save({"state_dict": tensors}, str(out_file))
    else:
        save_file(tensors, str(out_file))
    return out_file


def make_lora_file(model_dir: str | Path, out_file: str | Path, *, rank: int = 4, seed: int = 0) -> Path:
    """Write a random LoRA for every UNet attention projection (to_q, to_k, to_v, to_out.0 of attn1 and attn2).

    Format: diffusers/peft keys "unet.<module>.lora_A.weight" (rank, in) and "unet.<module>.lora_B.weight"
    (out, rank), both non-zero so the LoRA visibly changes the UNet (alpha = rank: scaling 1).
    """
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    config = UNet2DConditionModel.load_config(model_dir / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if not re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name):
            continue
        a = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
        b = torch.randn(module.out_features, rank, generator=gen) / rank**0.5
        tensors[f"unet.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"unet.{name}.lora_B.weight"] = b.contiguous()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file))
    return out_file


def _motion_to_original(key: str) -> str:
    """A diffusers MotionAdapter key in AnimateDiff's original layout (the inverse of diffusers' conversion)."""
    key = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", key)
    for ours, theirs in ((".norm1.", ".norms.0."), (".norm2.", ".norms.1."), (".norm3.", ".ff_norm."),
                         (".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1."),
                         (".pos_embed.", ".pos_encoder.")):
        key = key.replace(ours, theirs)
    return key


def make_motion_module_file(adapter_dir: str | Path, out_file: str | Path) -> Path:
    """Save a diffusers MotionAdapter folder as one AnimateDiff-layout motion module (``mm_sd_v15``-style keys),
    ``.safetensors`` or ``.ckpt`` (a pickled plain state dict, as AnimateDiff ships them)."""
    from diffusers import MotionAdapter
    from safetensors.torch import save_file

    adapter = MotionAdapter.from_pretrained(str(adapter_dir))
    tensors = {_motion_to_original(k): v.contiguous() for k, v in sorted(adapter.state_dict().items())}
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if out_file.suffix.lower() == ".ckpt":
        torch.save(tensors, str(out_file))
    else:
        save_file(tensors, str(out_file))
    return out_file
