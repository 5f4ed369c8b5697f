"""The typed run configuration: schema, YAML presets, `--set key=value` overrides and validation.

Every key is a dataclass field. Constraints a user can break (choices, ranges) live in the field's
metadata, so one validator serves every key and every error names the key and what is valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from vidbatch.core.atomic import atomic_write
from vidbatch.core.errors import ConfigError

EDIT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
METHODS = ("per-frame", "extended", "vidtome", "tokenflow", "vid2vid-zero")
CONTROLS = ("none", "pnp", "sdedit", "controlnet")
# What `edit.control: auto` means per method. vid2vid-zero ties the edit to the source with its own
# null-text inversion and prompt-to-prompt (its authors stack no PnP on it); the other methods are
# PnP-based, as in VidToMe and TokenFlow.
AUTO_CONTROL = {"vid2vid-zero": "none"}
AUTO_CONTROL_DEFAULT = "pnp"


def parse_control(text: str) -> frozenset[str]:
    """`'pnp+controlnet'` -> {'pnp', 'controlnet'}; `'none'` -> {}. ConfigError on unknown names."""
    parts = [p.strip() for p in text.split("+")]
    unknown = [p for p in parts if p not in CONTROLS]
    if unknown or ("none" in parts and len(parts) > 1) or len(set(parts)) != len(parts):
        raise ConfigError(f"config key 'edit.control' must be 'auto', one of {', '.join(CONTROLS)} or several "
                          f"joined by '+' (e.g. 'pnp+controlnet'), got {text!r}")
    return frozenset(p for p in parts if p != "none")


def resolve_control_name(method: str, control: str) -> str:
    """`edit.control` with `auto` replaced by the method's control (`none` for vid2vid-zero, else `pnp`).

    The one place `auto` is resolved; an explicit value (e.g. `pnp` with vid2vid-zero) is kept as given.
    """
    if control.strip() != "auto":
        return control
    return AUTO_CONTROL.get(method, AUTO_CONTROL_DEFAULT)


def resolve_control(method: str, control: str) -> frozenset[str]:
    """The controls an edit with `method` gets from `edit.control` (`auto` resolved per method); see `parse_control`."""
    return parse_control(resolve_control_name(method, control))


def _key(default: Any, *, choices: list | None = None, minimum: float | None = None,
         maximum: float | None = None, help: str = "") -> Any:
    """A config field with the constraints the validator checks."""
    meta = {"choices": choices, "min": minimum, "max": maximum, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class LoraConfig:
    path: str = _key("", help="LoRA file (.safetensors) or folder")
    scale: float = _key(1.0, help="strength the LoRA is fused with; 0 disables it")


@dataclass
class EditSpec:
    name: str = _key("", help="names the output member {key}.{name}.mp4: letters, digits, _ and -")
    prompt: str = _key("", help="edit prompt; '{prompt}' stands for the sample's own description")


@dataclass
class ModelConfig:
    id: str = _key("tiny", help="'tiny', 'sd15-random', a hub id, a diffusers folder or a .safetensors/.ckpt file")
    single_file_config: str | None = _key(None, help="diffusers folder or hub id describing a single-file checkpoint's architecture")
    loras: list[LoraConfig] = _key([], help="LoRAs fused into the model, each {path, scale}")
    dtype: str = _key("auto", choices=["auto", "float32", "float16", "bfloat16"],
                      help="'auto': float16 on CUDA, float32 on CPU")


@dataclass
class VideoConfig:
    size: int | None = _key(512, minimum=8, help="short side of the edited video in pixels; null keeps the source size")
    max_frames: int | None = _key(None, minimum=1, help="edit at most this many frames (after the stride); null: all")
    frame_stride: int = _key(1, minimum=1, help="keep every n-th source frame; the output fps is divided by it")
    min_frames: int = _key(2, minimum=1, help="a video with fewer frames (after selection) fails")
    max_input_mb: float = _key(2048.0, minimum=0, help="a video file larger than this fails")
    max_source_pixels: int = _key(8192 * 8192, minimum=1, help="a source larger than width*height fails")
    crf: int = _key(18, minimum=0, maximum=51, help="H.264 quality of the output (lower is better)")


@dataclass
class EditConfig:
    method: str = _key("vidtome", choices=list(METHODS), help="how self-attention sees the other frames")
    control: str = _key("auto", help="ties the edit to the source: none, pnp, sdedit, controlnet, or several "
                                     "joined by '+' (e.g. pnp+controlnet); 'auto': none for vid2vid-zero (its "
                                     "own inversion and prompt-to-prompt), pnp for the other methods")
    steps: int = _key(50, minimum=1, maximum=1000, help="DDIM denoising steps")
    guidance: float = _key(7.5, minimum=0, help="classifier-free guidance scale")
    seed: int = _key(0, minimum=0, help="seed; with the sample key and edit name it fixes every random choice")
    negative_prompt: str = _key("ugly, blurry, low res", help="the unconditional branch's prompt")
    eta: float = _key(0.0, minimum=0, maximum=1, help="DDIM eta: 0 is deterministic given the inversion, >0 adds seeded noise")
    strength: float = _key(1.0, minimum=0, maximum=1, help="sdedit: share of the steps re-done from the inverted latent")


@dataclass
class InversionConfig:
    steps: int | None = _key(None, minimum=1, maximum=1000, help="DDIM inversion steps; null: edit.steps")
    prompt: str = _key("{prompt}", help="prompt of the inversion (the source description); '{prompt}' is the sample's")
    batch_size: Union[int, Literal["auto"]] = _key(8, minimum=1, help="frames inverted per UNet call ('auto': fit runtime.max_memory_gb)")
    cache: bool = _key(True, help="reuse inversions across edits, reruns and workers (content-addressed)")
    cache_dir: str | None = _key(None, help="inversion cache folder; null: $VIDBATCH_CACHE/inversions or ~/.cache/vidbatch/inversions")
    cache_max_gb: float | None = _key(None, minimum=0, help="evict least recently used entries above this size")


@dataclass
class PnpConfig:
    f_t: float = _key(0.8, minimum=0, maximum=1, help="share of the steps whose residual features come from the source branch")
    attn_t: float = _key(0.5, minimum=0, maximum=1, help="share of the steps whose decoder self-attention q/k come from the source branch")


@dataclass
class TokenFlowConfig:
    batch_size: int = _key(8, minimum=1, help="tokenflow: one keyframe drawn at random per this many frames, every step")
    blend: str = _key("sigmoid", choices=["sigmoid", "linear"],
                      help="tokenflow: weights of a frame's two keyframes by temporal distance; 'sigmoid' is TokenFlow's")
    pairing: str = _key("reference", choices=["reference", "nearest"],
                        help="tokenflow: a frame's two keyframes: 'reference' as TokenFlow's code (its group's and the "
                             "previous group's, weighed by distance to the group centres); 'nearest' the previous "
                             "and next keyframe by position (the paper's description)")


# vid2vid-zero's dense spatio-temporal attention: the first transformer of the first down block, of the
# mid block and of the first cross-attention up block (its authors' `st_attn_idx: 0`).
V2VZ_DENSE_BLOCKS = ["down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0"]
# vid2vid-zero's share of the steps with prompt-to-prompt control per mode (its authors' test_vid2vid_zero.py:
# AttentionReplace gets cross_replace_steps 0.8, AttentionRefine 0.4).
V2VZ_CROSS_REPLACE = {"replace": 0.8, "refine": 0.4}


@dataclass
class Vid2VidZeroConfig:
    null_steps: int = _key(1, minimum=0, help="vid2vid-zero: Adam steps on the null embedding per denoising step; 0: no "
                                             "null-text optimisation (the empty prompt's embedding)")
    null_lr: float = _key(0.01, minimum=0, help="vid2vid-zero: Adam learning rate of the null-text optimisation")
    null_early_stop: float = _key(1e-5, minimum=0, help="vid2vid-zero: stop a step's optimisation below this loss")
    null_uncond_ratio: float = _key(-0.5, minimum=-1, maximum=1,
                                    help="vid2vid-zero: the steps that use the optimised null embeddings: r > 0 the "
                                         "steps i <= r*steps, r < 0 the steps i >= (1+r)*steps (-0.5: the second "
                                         "half); the other steps use the empty prompt's embedding")
    invert_with_prompt: bool = _key(False, help="vid2vid-zero: DDIM-invert with the source prompt instead of the empty one")
    cross_frame: bool = _key(True, help="vid2vid-zero: cross-frame self-attention; false: each frame alone")
    dense_blocks: list[str] = _key(V2VZ_DENSE_BLOCKS,
                                   help="vid2vid-zero: blocks (module names, or prefixes ending at a '.') with dense "
                                        "attention over the chunk; the others attend to the first and the previous frame")
    p2p: str = _key("auto", choices=["auto", "replace", "refine", "none"],
                    help="vid2vid-zero: prompt-to-prompt cross-attention control; 'auto': replace when the source "
                         "and edit prompts have the same token count, else refine")
    cross_replace: Union[float, Literal["auto"]] = _key(
        "auto", minimum=0, maximum=1,
        help="vid2vid-zero: share of the steps whose cross-attention maps come from the source; 'auto': 0.8 "
             "for replace, 0.4 for refine (vid2vid-zero's)")


@dataclass
class ControlNetConfig:
    model: str | None = _key(None, help="ControlNet: diffusers folder or hub id (needed by control 'controlnet')")
    condition: str = _key("canny", choices=["canny", "video"],
                          help="'canny': edges of the source frames; 'video': the sample's {key}.control.mp4")
    scale: float = _key(1.0, minimum=0, help="ControlNet conditioning scale")
    canny_low: int = _key(100, minimum=0, maximum=255, help="Canny lower threshold")
    canny_high: int = _key(200, minimum=0, maximum=255, help="Canny upper threshold")


@dataclass
class MetricsConfig:
    warp_error: bool = _key(True, help="temporal consistency: flow on the source, edited frames warped along it")
    interp_psnr: bool = _key(True, help="VidToMe's interpolation PSNR of the edited video")
    flow: str = _key("dis", choices=["dis", "farneback"], help="OpenCV optical flow for warp_error")
    clip_model: str | None = _key("none", help="CLIP for clip_text/clip_frame/clip_dir: hub id, folder, 'tiny' or 'none'")


@dataclass
class MergeConfig:
    chunk_size: Union[int, Literal["auto"]] = _key(4, minimum=1, help="frames per UNet call ('auto': fit runtime.max_memory_gb)")
    local_ratio: float = _key(0.9, minimum=0, maximum=1, help="share of source tokens merged inside a chunk")
    global_ratio: float = _key(0.8, minimum=0, maximum=1, help="share merged between a chunk and the global tokens")
    global_merge: bool = _key(True, help="merge across chunks through a per-block global token set")
    global_rand: float = _key(0.5, minimum=0, maximum=1, help="probability that the global set is the source side")
    target_stride: int = _key(4, minimum=2, help="one destination frame per this many frames")
    align_batch: bool = _key(True, help="one matching shared by the guidance branches")
    max_downsample: int = _key(2, choices=[1, 2, 4, 8], help="merge in blocks at most this downsampled")
    proportional_attention: bool = _key(False, help="weigh every merged token's attention by the number of tokens "
                                                    "it stands for (ToMe); off in the paper")
    chunk_order: str = _key("mix", choices=["seq", "rand", "mix"], help="how chunks are cut and visited each step")


@dataclass
class RuntimeConfig:
    backend: str = _key("ray", choices=["ray", "local"],
                        help="'ray': one worker per GPU (or runtime.workers CPU workers) on a Ray cluster, shards "
                             "handed out dynamically, lost workers replaced; 'local': in-process, shard after shard")
    ray_address: str | None = _key(None, help="Ray cluster to join ('HOST:PORT', 'auto', 'ray://...'); "
                                              "null: $RAY_ADDRESS, else start an embedded local cluster")
    workers: int | None = _key(None, minimum=1, help="Ray workers; null: one per GPU of the cluster, "
                                                     "or 1 on a cluster without GPUs")
    cpus_per_worker: int = _key(1, minimum=1, help="Ray CPUs each worker reserves; a CPU worker runs this many torch threads")
    max_shard_retries: int = _key(2, minimum=0, help="times a shard is given out again after its worker died or it "
                                                    "raised; then it is reported failed (a rerun continues it)")
    worker_start_timeout_s: float = _key(600.0, minimum=1, help="give up when no Ray worker could start for this long")
    device: str = _key("auto", help="'auto', 'cpu', 'cuda' or 'cuda:N' (with Ray: 'cuda' workers get one GPU each)")
    max_memory_gb: float | None = _key(None, minimum=0, help="memory budget for chunk_size 'auto'; null: what the device has free")
    log_every_s: float = _key(30.0, minimum=0.1, help="seconds between plain status lines when not on a terminal")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    edit: EditConfig = field(default_factory=EditConfig)
    edits: list[EditSpec] = _key([{"name": "edit", "prompt": "{prompt}, oil painting"}],
                                 help="the edits applied to every video, each {name, prompt}")
    inversion: InversionConfig = field(default_factory=InversionConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    pnp: PnpConfig = field(default_factory=PnpConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    tokenflow: TokenFlowConfig = field(default_factory=TokenFlowConfig)
    vid2vid_zero: Vid2VidZeroConfig = field(default_factory=Vid2VidZeroConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of the resolved config, recorded in the run summary."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Parsing and validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Returns `value` as type `tp`, or raises ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{path}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"config key '{path}' must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{path}' must be {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item, item_tp, f"{path}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be {_type_name(tp)}, got {value!r}")
        return _build(tp, value, path)
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{path}' must be {_type_name(tp)}, got {value!r}")


def _check_constraints(value: Any, meta: typing.Mapping, path: str) -> None:
    if value is None or isinstance(value, (list, dict)) or dataclasses.is_dataclass(value):
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"config key '{path}' must be one of {valid}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("min") is not None and value < meta["min"]:
            raise ConfigError(f"config key '{path}' must be >= {meta['min']}, got {value!r}")
        if meta.get("max") is not None and value > meta["max"]:
            raise ConfigError(f"config key '{path}' must be <= {meta['max']}, got {value!r}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"'{prefix}'" if prefix else "the top level"
            raise ConfigError(
                f"unknown config key '{_join(prefix, str(key))}'; valid keys in {where}: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        path = _join(prefix, name)
        if name in data:
            value = _coerce(data[name], hints[name], path)
        else:
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if isinstance(value, list) and typing.get_origin(hints[name]) is list:
                value = _coerce(value, hints[name], path)
        _check_constraints(value, f.metadata, path)
        values[name] = value
    return cls(**values)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _validate(config: Config) -> None:
    """Checks that span several keys."""
    if not config.edits:
        raise ConfigError("config key 'edits' is empty; add at least one {name, prompt}")
    seen = set()
    for i, edit in enumerate(config.edits):
        if not EDIT_NAME_PATTERN.match(edit.name):
            raise ConfigError(f"config key 'edits[{i}].name' must be letters, digits, _ or - (it names the "
                              f"output file {{key}}.{{name}}.mp4), got {edit.name!r}")
        if edit.name in seen:
            raise ConfigError(f"config key 'edits[{i}].name': the name {edit.name!r} is used twice")
        seen.add(edit.name)
        if not edit.prompt.strip():
            raise ConfigError(f"config key 'edits[{i}].prompt' is empty")
    controls = resolve_control(config.edit.method, config.edit.control)
    if "controlnet" in controls and not config.controlnet.model:
        raise ConfigError("edit.control includes 'controlnet' but config key 'controlnet.model' is not set; "
                          "point it at a ControlNet folder or hub id")
    v = config.video
    if v.max_frames is not None and v.max_frames < v.min_frames:
        raise ConfigError(f"config key 'video.max_frames' ({v.max_frames}) is below 'video.min_frames' "
                          f"({v.min_frames}): no video could pass")
    for i, lora in enumerate(config.model.loras):
        if not lora.path:
            raise ConfigError(f"config key 'model.loras[{i}].path' is empty")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`'edit.steps=20'` -> (['edit', 'steps'], 20). The value is read as YAML ('null', 'true', lists...)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set edit.steps=20")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key is empty or malformed")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc.__class__.__name__})") from exc
    return key.split("."), value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Reads a YAML preset (or the defaults when `path` is None), applies `--set` overrides, validates."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found; the presets are in configs/ (e.g. configs/tiny.yaml)")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(loaded).__name__}")
        data = loaded or {}
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, part in enumerate(keys[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: '{'.'.join(keys[: i + 1])}' is not a section")
            node = child
        node[keys[-1]] = value
    config = _build(Config, data, "")
    _validate(config)
    return config


def save_config(config: Config, path: str | Path) -> None:
    """Writes the resolved config as YAML, atomically (a unique temporary: two drivers may write it at once)."""
    atomic_write(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
