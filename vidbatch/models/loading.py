"""Loading a Stable Diffusion pipeline the way users name models; LoRAs; a fingerprint of the weights in use.

`model.id` may be:

* ``"tiny"``: the tiny random-weight pipeline (:func:`vidbatch.models.builtin.tiny_model_dir`), for tests and demos;
* ``"sd15-random"``: SD 1.5's exact architecture with random weights, for timing at full size;
* a local diffusers folder (one with ``model_index.json``);
* a ``.safetensors`` / ``.ckpt`` single-file checkpoint in the original (CompVis/A1111) layout;
* anything else: a Hugging Face hub id such as ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``.

Whatever the source, the pipeline comes back ready for vidbatch's inference-only use: DDIM scheduler (keeping
the model's prediction_type), no safety checker, no progress bars, eval mode, gradients off, LoRAs fused into
the weights. Every failure a user can cause is raised as :class:`vidbatch.core.errors.ModelLoadError` naming the
thing that failed and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from vidbatch.core.local_dir import local_dir as node_local_dir
from vidbatch.core.paths import looks_like_path
from vidbatch.core.errors import ModelLoadError
from vidbatch.models.staging import stage_model

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_HUB_URL_PREFIXES = ("https://huggingface.co/", "huggingface.co/", "hf.co/", "https://hf.co/")

# Prefixes of the three components in an original-layout (CompVis / A1111) single-file checkpoint.


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file to fuse into the pipeline at `scale` (0 = no effect, 1 = as trained)."""

    path: str
    scale: float = 1.0


# ---------------------------------------------------------------------------------------------------------
# Loading


def first_line(exc: BaseException) -> str:
    """The informative start of an exception message, on one line (a "...:" header is joined to its detail)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    return text[:300].rstrip(".")


def hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it at call time too so a late setting counts.
    import huggingface_hub.constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE) or any(
        f.strip().lower() in ("1", "true", "yes", "on") for f in flags
    )


def _is_hub_file_url(model_id: str) -> bool:
    """A single-file checkpoint on the hub, e.g. https://huggingface.co/org/repo/blob/main/model.safetensors."""
    return model_id.startswith(_HUB_URL_PREFIXES) and model_id.lower().endswith(SINGLE_FILE_SUFFIXES)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence diffusers'/transformers' per-component loading bars (noise in batch logs), then restore them."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    d_was, t_was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if d_was:
            dlog.enable_progress_bar()
        if t_was:
            tlog.enable_progress_bar()


def _load_folder(model_dir: Path, label: str, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    if not (model_dir / "model_index.json").is_file():
        raise ModelLoadError(
            f"model.id '{label}': the folder has no model_index.json, so it is not a diffusers pipeline folder. "
            "Fix: point model.id at a diffusers folder (one saved with save_pretrained) or a .safetensors file"
        )
    try:
        return StableDiffusionPipeline.from_pretrained(
            str(model_dir), dtype=dtype, safety_checker=None, requires_safety_checker=False,
            local_files_only=True,
        )
    except Exception as exc:
        raise ModelLoadError(
            f"model.id '{label}': the diffusers folder could not be loaded as a Stable Diffusion pipeline "
            f"({first_line(exc)}). Fix: check the folder is complete (unet, vae, text_encoder, tokenizer, "
            "scheduler) and is an SD 1.x/2.x model"
        ) from exc


def _load_single_file(path: Path | str, label: str, dtype: torch.dtype, config: str | None):
    from diffusers import StableDiffusionPipeline

    kwargs = {}
    if config is not None:
        kwargs["config"] = str(config)
    try:
        return StableDiffusionPipeline.from_single_file(
            str(path), dtype=dtype, safety_checker=None, requires_safety_checker=False,
            local_files_only=hub_offline() or (config is not None and Path(config).is_dir()), **kwargs,
        )
    except Exception as exc:
        hint = (
            "Fix: set model.single_file_config to a local diffusers folder (or hub id) of the same architecture, "
            "e.g. an SD 1.5 or SD 2.1 folder; without it diffusers fetches that config from the hub"
            if config is None
            else f"Fix: check the file is an SD 1.x/2.x checkpoint matching single_file_config '{config}'"
        )
        raise ModelLoadError(
            f"model.id '{label}': the single-file checkpoint could not be loaded ({first_line(exc)}). {hint}"
        ) from exc


def _load_hub(model_id: str, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    offline = hub_offline()
    try:
        return StableDiffusionPipeline.from_pretrained(
            model_id, dtype=dtype, safety_checker=None, requires_safety_checker=False,
            local_files_only=offline,
        )
    except Exception as exc:
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local hub cache"
            if offline
            else "the hub is unreachable or has no such model"
        )
        raise ModelLoadError(
            f"model.id '{model_id}': not a local folder or file, and {why} ({first_line(exc)}). "
            "Fix: run `hf download " + model_id + "` where there is network access (same HF_HOME), or point "
            "model.id at a local diffusers folder or .safetensors file"
        ) from exc


def _fuse_loras(pipe, loras: Sequence[LoraSpec]) -> None:
    """Load every LoRA as its own adapter, weight them by their scales, fuse them into the base weights, and
    drop the peft wrappers so inference runs on plain layers."""
    names: list[str] = []
    for i, lora in enumerate(loras):
        path = Path(lora.path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"LoRA '{lora.path}': file not found. Fix: check the path in model.loras")
        if path.suffix.lower() == ".safetensors":
            try:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            except Exception as exc:
                raise ModelLoadError(
                    f"LoRA '{lora.path}': not a readable .safetensors file ({first_line(exc)}). "
                    "Fix: re-download or re-export the LoRA"
                ) from exc
        name = f"lora{i}"
        before = set(_adapter_names(pipe))
        try:
            pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as exc:
            raise ModelLoadError(
                f"LoRA '{lora.path}' does not match the model: {first_line(exc)}. "
                "Fix: use a LoRA trained for this base model (SD 1.x LoRAs for SD 1.x, 2.x for 2.x)"
            ) from exc
        if name not in set(_adapter_names(pipe)) - before:
            # diffusers only warns when no key of the file names a module of the UNet or text encoder.
            raise ModelLoadError(
                f"LoRA '{lora.path}' does not match the model: none of its keys name a layer of this UNet or "
                "text encoder. Fix: use a LoRA trained for this base model"
            )
        names.append(name)
    try:
        pipe.set_adapters(names, adapter_weights=[float(lora.scale) for lora in loras])
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=names)
        pipe.unload_lora_weights()
    except Exception as exc:
        raise ModelLoadError(f"LoRAs {[lora.path for lora in loras]}: fusing failed: {first_line(exc)}") from exc


def _adapter_names(pipe) -> list[str]:
    try:
        listed = pipe.get_list_adapters()
    except Exception:
        return []
    return sorted({name for names in listed.values() for name in names})


def _random_model_dir(model_id: str) -> Path:
    """The cached folder of a built-in random-weight model, built on first use."""
    from vidbatch.models import builtin as tiny_model

    build = tiny_model.tiny_model_dir if model_id == "tiny" else tiny_model.sd15_random_dir
    try:
        return build()
    except OSError as exc:
        raise ModelLoadError(
            f"model.id '{model_id}': could not build the model in the cache {tiny_model.default_cache_root()} "
            f"({first_line(exc)}). Fix: set VIDBATCH_CACHE to a writable folder with enough space "
            "(tiny: 8 MB, sd15-random: 2 GB)"
        ) from exc


def load_pipeline(
    model_id: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    loras: Sequence[LoraSpec] = (),
    single_file_config: str | None = None,
    stage_local: str = "never",
    local_dir: str | None = None,
) -> "StableDiffusionPipeline":
    """Load a StableDiffusionPipeline for inference from the way a user names a model (see module docstring).

    Args:
        model_id: "tiny", "sd15-random", a diffusers folder, a .safetensors/.ckpt file, or a hub id.
        dtype: parameter dtype (float16 on GPUs; float32 on CPU).
        device: where the pipeline lives.
        loras: fused in order, each at its scale.
        single_file_config: for single-file checkpoints: a diffusers folder or hub id describing the
            architecture (needed offline; otherwise diffusers infers one and fetches its config from the hub).
        stage_local: `model.stage_local` for a model given as a local folder or file: 'never' loads it in
            place; 'auto' (on a network filesystem) and 'always' copy it to node-local disk once per node
            first (`vidbatch.models.staging`). Hub ids and the built-in models are never staged.
        local_dir: `runtime.local_dir` (null: resolved from the environment, `vidbatch.core.local_dir`).

    Returns:
        the pipeline with a DDIM scheduler (same prediction_type), no safety checker, progress bars off,
        eval mode, requires_grad off, on `device` in `dtype`, LoRAs fused.

    Raises:
        ModelLoadError: the model, a LoRA or the single-file config cannot be loaded.
    """
    from diffusers import DDIMScheduler

    model_id = str(model_id)
    with quiet_loading():
        if model_id in ("tiny", "sd15-random"):
            pipe = _load_folder(_random_model_dir(model_id), model_id, dtype)
        else:
            local = Path(model_id).expanduser()
            if local.is_dir():
                if (local / "model_index.json").is_file():   # staging a folder that is no model helps no one
                    local = stage_model(local, stage_local, node_local_dir(local_dir), model_id).path
                pipe = _load_folder(local, model_id, dtype)
            elif local.is_file():
                if local.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                    raise ModelLoadError(
                        f"model.id '{model_id}': a file, but not a .safetensors or .ckpt checkpoint. "
                        "Fix: point model.id at a diffusers folder or a .safetensors/.ckpt file"
                    )
                local = stage_model(local, stage_local, node_local_dir(local_dir), model_id).path
                pipe = _load_single_file(local, model_id, dtype, single_file_config)
            elif _is_hub_file_url(model_id):
                pipe = _load_single_file(model_id, model_id, dtype, single_file_config)
            elif looks_like_path(model_id) or model_id.lower().endswith(SINGLE_FILE_SUFFIXES):  # a missing checkpoint
                raise ModelLoadError(
                    f"model.id '{model_id}': no such file or folder. Fix: check the path, or use a hub id "
                    "such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'"
                )
            else:
                pipe = _load_hub(model_id, dtype)

        # DDIM is what inversion and the editing loop are written for; keep the model's prediction_type
        # (v_prediction for SD 2.x-768). Latent diffusion never clips samples: DDIM's default clip_sample=True
        # would clamp latents to [-1, 1] when a model's scheduler config (e.g. PNDM) does not say otherwise.
        overrides = {} if "clip_sample" in pipe.scheduler.config else {"clip_sample": False}
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **overrides)
        pipe.safety_checker = None
        pipe.feature_extractor = None
        pipe.set_progress_bar_config(disable=True)
        try:
            pipe.to(torch.device(device))
        except Exception as exc:
            raise ModelLoadError(
                f"model.id '{model_id}': could not move the pipeline to device '{device}' ({first_line(exc)}). "
                "Fix: use 'cpu' or an available accelerator"
            ) from exc
        for name in ("unet", "vae", "text_encoder"):
            module = getattr(pipe, name)
            if module.dtype != dtype:  # from_pretrained(dtype=...) already did it; only older diffusers get here
                module.to(dtype=dtype)
        if loras:
            _fuse_loras(pipe, loras)
        for name in ("unet", "vae", "text_encoder"):
            module = getattr(pipe, name)
            module.eval()
            module.requires_grad_(False)
    return pipe


# ---------------------------------------------------------------------------------------------------------
# Fingerprint


def _hash_tensor(h: "hashlib.blake2b", name: str, t: torch.Tensor) -> None:
    """Feed a tensor's name, dtype, shape and raw bytes to `h`."""
    t = t.detach()
    h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
    if t.numel() == 0:
        return
    # Raw bytes of any dtype (bf16 has no numpy type): flatten, reinterpret as uint8, hash the buffer.
    data = t.to("cpu").contiguous().reshape(-1).view(torch.uint8)
    h.update(memoryview(data.numpy()))


def model_fingerprint(pipe: "StableDiffusionPipeline", loras: Sequence[LoraSpec] = ()) -> str:
    """A stable hex digest (blake2b, 32 hex chars) of everything that decides what the pipeline computes.

    Covers: every tensor (name, dtype, shape, bytes) of the UNet, VAE and text encoder state dicts as they are
    now (so after LoRA fusion), the scheduler class and config, the tokenizer vocabulary and max length, and
    the LoRA list (file contents digest and scale of each).

    The LoRA list is part of the identity on purpose: a LoRA at scale 0 leaves the weights unchanged but still
    gives a different fingerprint, so any change of the model config is a cache miss (never a stale hit).
    Identical across processes and reloads of the same files; fp16 and fp32 loads of one model differ (their
    outputs do too).
    """
    h = hashlib.blake2b(digest_size=16)
    for component in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, component, None)
        h.update(f"[{component}:{type(module).__name__}]\n".encode())
        if module is None:
            continue
        state = module.state_dict()
        for name in sorted(state):
            _hash_tensor(h, name, state[name])
    sched = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    h.update(f"[scheduler:{type(pipe.scheduler).__name__}]".encode())
    h.update(json.dumps(sched, sort_keys=True, default=str).encode())
    tok = getattr(pipe, "tokenizer", None)
    if tok is not None:
        h.update(f"[tokenizer:{type(tok).__name__}:{tok.model_max_length}]".encode())
        h.update(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode())
    for lora in loras:
        h.update(f"[lora:{float(lora.scale)!r}:{_file_digest(lora.path)}]".encode())
    return h.hexdigest()


def _file_digest(path: str) -> str:
    """blake2b of a file's bytes (the path itself is not identity: a moved LoRA is the same LoRA)."""
    p = Path(path).expanduser()
    if not p.is_file():
        return f"missing:{path}"
    h = hashlib.blake2b(digest_size=16)
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Test helpers: single-file checkpoints and LoRA files
