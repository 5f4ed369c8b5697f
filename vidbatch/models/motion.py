"""AnimateDiff motion modules: loading one the way users name it, and turning an SD UNet into a video UNet.

`model.motion_adapter` may be:

* ``"tiny"``: a random-weight motion adapter that fits the built-in ``tiny`` model, for tests and demos;
* ``"v3-random"``: AnimateDiff v3's motion module architecture (``v3_sd15_mm.ckpt``) at full size with random
  weights, for timing with ``sd15-random``;
* a diffusers ``MotionAdapter`` folder (``config.json`` + weights);
* a single-file motion module, ``.safetensors`` or ``.ckpt`` in AnimateDiff's original layout. Checkpoints are
  read as tensors only (``weights_only``: a pickle that would run code is refused). Offline, the adapter's
  architecture comes from `model.motion_adapter_config` (a diffusers MotionAdapter folder); without it
  diffusers fetches a config from the hub.

:func:`motion_unet` inflates the pipeline's ``UNet2DConditionModel`` into diffusers' ``UNetMotionModel``: the
same spatial weights, plus a temporal transformer after every resnet/attention pair that attends across the
frames of one call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vidbatch.core.errors import ModelLoadError
from vidbatch.models.builtin import build_folder_atomically, default_cache_root
from vidbatch.models.loading import SINGLE_FILE_SUFFIXES, first_line, hub_offline, quiet_loading

if TYPE_CHECKING:
    from diffusers import MotionAdapter

__all__ = ["ADAPTER_FOR_MODEL", "BUILTIN_ADAPTERS", "builtin_adapter_dir", "is_motion_unet", "load_motion_adapter", "motion_unet",
           "tiny_adapter_config", "v3_adapter_config", "with_motion_adapter"]

ADAPTER_VERSION = "v1"
ANIMATEDIFF_BETA_SCHEDULE = "linear"
MARKER = "vidbatch_adapter.json"


def tiny_adapter_config() -> dict[str, Any]:
    """A motion adapter for the built-in tiny UNet (blocks (32, 64)): 2 heads, two temporal attentions a module."""
    return dict(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=2,
                motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=False)


def v3_adapter_config() -> dict[str, Any]:
    """AnimateDiff v3 (``v3_sd15_mm.ckpt``): modules at all four SD 1.5 levels, none in the mid block, 8 heads,
    two temporal self-attentions each, sinusoidal positions up to 32 frames."""
    return dict(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2, motion_num_attention_heads=8,
                motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=False)


# name -> (config, dtype it is saved in)
BUILTIN_ADAPTERS = {"tiny": (tiny_adapter_config, torch.float32), "v3-random": (v3_adapter_config, torch.float16)}
# The built-in adapter that fits each built-in model.
ADAPTER_FOR_MODEL = {"tiny": "tiny", "sd15-random": "v3-random"}


def builtin_adapter_dir(name: str, cache_root: Path | None = None) -> Path:
    """The cached folder of a built-in random-weight adapter (seed 0), built on first use, published atomically."""
    config, dtype = BUILTIN_ADAPTERS[name]
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    out_dir = root / "models" / f"motion-{name}-{ADAPTER_VERSION}"
    if (out_dir / MARKER).is_file():
        return out_dir

    def build(tmp_dir: Path) -> None:
        from diffusers import MotionAdapter

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            adapter = MotionAdapter(**config())
        torch.nn.Module.to(adapter, dtype=dtype)
        adapter.save_pretrained(str(tmp_dir), safe_serialization=True)
        (tmp_dir / MARKER).write_text(json.dumps({"name": name, "version": ADAPTER_VERSION}) + "\n")

    return build_folder_atomically(out_dir, build, replace=out_dir.exists())


def load_motion_adapter(spec: str, *, config: str | None = None, dtype: torch.dtype = torch.float32) -> "MotionAdapter":
    """A diffusers ``MotionAdapter`` from `model.motion_adapter` (see the module docstring); ModelLoadError naming
    the adapter and the fix when it cannot be loaded."""
    from diffusers import MotionAdapter

    label = f"model.motion_adapter '{spec}'"
    with quiet_loading():
        if spec in BUILTIN_ADAPTERS:
            try:
                folder = builtin_adapter_dir(spec)
            except OSError as exc:
                raise ModelLoadError(f"{label}: could not build it in the cache {default_cache_root()} "
                                     f"({first_line(exc)}). Fix: set VIDBATCH_CACHE to a writable folder") from exc
            return MotionAdapter.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{label}: the folder has no config.json, so it is not a diffusers MotionAdapter "
                                     "folder. Fix: point it at a folder saved with MotionAdapter.save_pretrained, or "
                                     "at a .safetensors/.ckpt motion module")
            try:
                return MotionAdapter.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
            except Exception as exc:
                raise ModelLoadError(f"{label}: the folder could not be loaded as a MotionAdapter ({first_line(exc)})"
                                     ". Fix: check the folder is complete") from exc
        if path.is_file():
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise ModelLoadError(f"{label}: a file, but not a .safetensors or .ckpt motion module")
            return _load_single_file(path, label, config, dtype)
        raise ModelLoadError(f"{label}: no such file or folder. Fix: give an AnimateDiff motion module "
                             "(e.g. v3_sd15_mm.ckpt), a diffusers MotionAdapter folder, 'tiny' or 'v3-random'")


def _load_single_file(path: Path, label: str, config: str | None, dtype: torch.dtype) -> "MotionAdapter":
    from diffusers import MotionAdapter

    if config is None and hub_offline():
        raise ModelLoadError(f"{label}: a single-file motion module needs model.motion_adapter_config offline "
                             "(a diffusers MotionAdapter folder of the same architecture)")
    kwargs = {} if config is None else {"config": str(config)}
    local_only = hub_offline() or (config is not None and Path(config).is_dir())
    try:
        adapter = MotionAdapter.from_single_file(str(path), local_files_only=local_only, **kwargs)
    except Exception as exc:
        hint = ("Fix: set model.motion_adapter_config to a diffusers MotionAdapter folder of the same architecture"
                if config is None else
                f"Fix: check the file is an AnimateDiff motion module matching motion_adapter_config '{config}' "
                "(a .ckpt is read as tensors only: one holding other Python objects is refused)")
        raise ModelLoadError(f"{label}: the motion module could not be loaded ({first_line(exc)}). {hint}") from exc
    return adapter.to(dtype)


def is_motion_unet(unet: torch.nn.Module) -> bool:
    """Whether `unet` is a video UNet (diffusers' ``UNetMotionModel``): its input is (B, C, F, h, w)."""
    return type(unet).__name__ == "UNetMotionModel"


def motion_unet(unet: torch.nn.Module, adapter: "MotionAdapter") -> torch.nn.Module:
    """``UNetMotionModel`` from an SD ``UNet2DConditionModel`` and a motion adapter, on the UNet's device and dtype,
    in eval mode without gradients. ModelLoadError when the adapter does not fit the UNet's levels."""
    from diffusers import UNetMotionModel

    levels = tuple(unet.config.block_out_channels)
    if tuple(adapter.config.block_out_channels) != levels:
        raise ModelLoadError(f"model.motion_adapter has blocks {tuple(adapter.config.block_out_channels)}, the "
                             f"UNet {levels}: it was made for another base model. Fix: use an AnimateDiff motion "
                             "module for this model (SD 1.5 modules for SD 1.5; 'tiny' for the tiny model)")
    with torch.random.fork_rng(devices=[]):  # from_unet2d initialises layers it then overwrites
        video_unet = UNetMotionModel.from_unet2d(unet, adapter)
    # nn.Module.to directly: diffusers' override warns about float32-only modules even when there are none.
    torch.nn.Module.to(video_unet, device=unet.device, dtype=unet.dtype)
    video_unet.eval()
    video_unet.requires_grad_(False)
    return video_unet


def with_motion_adapter(pipe, spec: str, *, config: str | None = None):
    """`pipe` with its UNet inflated by the motion adapter `spec` (see :func:`load_motion_adapter`) and its
    scheduler on AnimateDiff's noise schedule; returns `pipe`.

    AnimateDiff's motion modules were trained with a ``linear`` beta schedule (SD 1.5 itself uses
    ``scaled_linear``); its inference configs, VideoDirector's and diffusers' AnimateDiff examples all
    switch the DDIM scheduler to it, keeping the betas' end points.
    """
    from diffusers import DDIMScheduler

    adapter = load_motion_adapter(spec, config=config, dtype=pipe.unet.dtype)
    pipe.unet = motion_unet(pipe.unet, adapter)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, beta_schedule=ANIMATEDIFF_BETA_SCHEDULE)
    return pipe
