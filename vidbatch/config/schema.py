"""The typed run configuration: schema, YAML presets, `--set key=value` overrides and validation.

Every key is a dataclass field declared with :func:`vidbatch.core.settings.setting` (default,
choices, bounds, help); :mod:`vidbatch.config.fields` parses and validates them. The sections are
the application's own (model, video, edit, edits, inversion, metrics, runtime) and those of the
engine's plug-ins: every registered method's and control's settings section
(:func:`vidbatch.engine.plugins.sections`: `merge` for vidtome, `pnp`, `controlnet`, `tokenflow`,
`vid2vid_zero`). The :class:`Config` dataclass is built from the registries
(:func:`config_class`), so a method registered later gets its section and `--set section.key=...`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import yaml

from vidbatch.core.atomic import atomic_write
from vidbatch.core.edits import EDIT_NAME_PATTERN, EditSpec
from vidbatch.core.errors import ConfigError
from vidbatch.core.paths import is_url
from vidbatch.core.settings import setting
from vidbatch.config.fields import build
from vidbatch.engine.controls.controlnet import ControlNetConfig
from vidbatch.engine.controls.pnp import PnpConfig
from vidbatch.engine.methods.tokenflow import TokenFlowConfig
from vidbatch.engine.methods.vid2vid_zero import Vid2VidZeroConfig
from vidbatch.engine.methods.vidtome import MergeConfig
from vidbatch.engine.plugins import (
    get_control,
    get_method,
    method_names,
    parse_control,
    resolve_control,
    resolve_control_name,
    sections,
)

__all__ = [
    "EDIT_NAME_PATTERN", "Config", "ConfigBase", "ControlNetConfig", "EditConfig", "EditSpec", "InversionConfig",
    "LoraConfig", "MergeConfig", "MetricsConfig", "ModelConfig", "PnpConfig", "RuntimeConfig", "TokenFlowConfig",
    "Vid2VidZeroConfig", "VideoConfig", "config_class", "load_config", "parse_control", "parse_override",
    "resolve_control", "resolve_control_name", "save_config",
]

@dataclass
class LoraConfig:
    path: str = setting("", help="LoRA file (.safetensors) or folder")
    scale: float = setting(1.0, help="strength the LoRA is fused with; 0 disables it")


@dataclass
class ModelConfig:
    id: str = setting("tiny", help="'tiny', 'sd15-random', a hub id, a diffusers folder or a .safetensors/.ckpt file")
    single_file_config: str | None = setting(None, help="diffusers folder or hub id describing a single-file checkpoint's architecture")
    loras: list[LoraConfig] = setting([], help="LoRAs fused into the model, each {path, scale}")
    dtype: str = setting("auto", choices=["auto", "float32", "float16", "bfloat16"],
                         help="'auto': float16 on CUDA, bfloat16 on CPUs with native bfloat16 matmul "
                              "(AMX, AVX512-BF16), else float32")
    motion_adapter: str | None = setting(None, help="AnimateDiff motion module for text-to-video methods "
                                         "(videodirector): 'tiny', 'v3-random', a diffusers MotionAdapter folder "
                                         "or a .safetensors/.ckpt file; null: none")
    motion_adapter_config: str | None = setting(None, help="diffusers MotionAdapter folder describing a "
                                                "single-file motion module's architecture (needed offline)")


@dataclass
class VideoConfig:
    size: int | None = setting(512, minimum=8, help="short side of the edited video in pixels; null keeps the source size")
    max_frames: int | None = setting(None, minimum=1, help="edit at most this many frames (after the stride); null: all")
    frame_stride: int = setting(1, minimum=1, help="keep every n-th source frame; the output fps is divided by it")
    min_frames: int = setting(2, minimum=1, help="a video with fewer frames (after selection) fails")
    max_input_mb: float = setting(2048.0, minimum=0, help="a video file larger than this fails")
    max_source_pixels: int = setting(8192 * 8192, minimum=1, help="a source larger than width*height fails")
    crf: int = setting(18, minimum=0, maximum=51, help="H.264 quality of the output (lower is better)")


@dataclass
class EditConfig:
    method: str = setting("vidtome", choices=method_names, help="how self-attention sees the other frames")
    control: str = setting("auto", help="ties the edit to the source: none, pnp, sdedit, controlnet, or several "
                                        "joined by '+' (e.g. pnp+controlnet); 'auto': none for vid2vid-zero (its "
                                        "own inversion and prompt-to-prompt), pnp for the other methods")
    steps: int = setting(50, minimum=1, maximum=1000, help="DDIM denoising steps")
    guidance: float = setting(7.5, minimum=0, help="classifier-free guidance scale")
    seed: int = setting(0, minimum=0, help="seed; with the sample key and edit name it fixes every random choice")
    negative_prompt: str = setting("ugly, blurry, low res", help="the unconditional branch's prompt")
    eta: float = setting(0.0, minimum=0, maximum=1, help="DDIM eta: 0 is deterministic given the inversion, >0 adds seeded noise")
    strength: float = setting(1.0, minimum=0, maximum=1, help="sdedit: share of the steps re-done from the inverted latent")
    compare: list[str] = setting([], help="run every edit once per method listed, named {edit}-{method} "
                                 "(vidbatch run --compare); empty: each edit once")


@dataclass
class InversionConfig:
    steps: int | None = setting(None, minimum=1, maximum=1000, help="DDIM inversion steps; null: edit.steps")
    prompt: str = setting("{prompt}", help="prompt of the inversion (the source description); '{prompt}' is the sample's")
    batch_size: Union[int, Literal["auto"]] = setting(8, minimum=1, help="frames inverted per UNet call ('auto': fit runtime.max_memory_gb)")
    cache: bool = setting(True, help="reuse inversions across edits, reruns and workers (content-addressed)")
    cache_dir: str | None = setting(None, help="inversion cache folder; null: $VIDBATCH_CACHE/inversions or ~/.cache/vidbatch/inversions")
    cache_max_gb: float | None = setting(None, minimum=0, help="evict least recently used entries above this size")


@dataclass
class MetricsConfig:
    warp_error: bool = setting(True, help="temporal consistency: flow on the source, edited frames warped along it")
    interp_psnr: bool = setting(True, help="VidToMe's interpolation PSNR of the edited video")
    flow: str = setting("dis", choices=["dis", "farneback"], help="OpenCV optical flow for warp_error")
    clip_model: str | None = setting("none", help="CLIP for clip_text/clip_frame/clip_dir: hub id, folder, 'tiny' or 'none'")


@dataclass
class RuntimeConfig:
    backend: str = setting("ray", choices=["ray", "local"],
                           help="'ray': one worker per GPU (or runtime.workers CPU workers) on a Ray cluster, shards "
                                "handed out dynamically, lost workers replaced; 'local': in-process, shard after shard")
    ray_address: str | None = setting(None, help="Ray cluster to join ('HOST:PORT', 'auto', 'ray://...'); "
                                                 "null: $RAY_ADDRESS, else start an embedded local cluster")
    workers: int | None = setting(None, minimum=1, help="Ray workers; null: one per GPU of the cluster, "
                                                        "or 1 on a cluster without GPUs")
    cpus_per_worker: int = setting(1, minimum=1, help="Ray CPUs each worker reserves; a CPU worker runs this many torch threads")
    max_shard_retries: int = setting(2, minimum=0, help="times a shard is given out again after it raised (a worker's "
                                                       "failure does not count); then it is reported failed (a rerun "
                                                       "continues it)")
    worker_start_timeout_s: float = setting(600.0, minimum=1, help="give up when no Ray worker could start for this long")
    stall_timeout_s: float | None = setting(900.0, minimum=1, help="Ray: a worker that reports no progress (a UNet "
                                            "step, a video) for this long is killed and replaced, its shard given "
                                            "to another worker; null: never")
    lease_s: float = setting(120.0, minimum=1, help="lease on a shard in flight (OUT/leases), renewed every third "
                                                     "of it: another driver of the same output takes a shard over "
                                                     "once its driver has not renewed it for this long")
    deadline: float | None = setting(None, minimum=0, help="unix time after which no shard should end: a shard "
                                                          "that would (judged by the longest done so far) is not "
                                                          "started and the run exits 3 (requeue); the SLURM scripts "
                                                          "set it from the job's time limit; null: none")
    quarantine_after: int = setting(2, minimum=1, help="Ray: infrastructure failures in a row (CUDA errors, crashes, "
                                                      "stalls) after which a worker's place (its GPU) is not refilled")
    device: str = setting("auto", help="'auto', 'cpu', 'cuda' or 'cuda:N' (with Ray: 'cuda' workers get one GPU each)")
    max_memory_gb: float | None = setting(None, minimum=0, help="memory budget for chunk_size 'auto'; null: what the device has free")
    log_every_s: float = setting(30.0, minimum=0.1, help="seconds between plain status lines (in run.log, and on the "
                                                        "console when it is not a terminal)")
    finishing: str = setting("auto", choices=["auto", "background", "inline"],
                             help="where a video's encoding and quality metrics run: 'background', in a thread, while "
                                  "the next video is edited (its decode already runs ahead in a DataLoader worker on a "
                                  "GPU); 'inline', before the next video starts; 'auto': background with a GPU, inline "
                                  "on a CPU (there the CPU is the device: nothing to overlap)")
    batch_videos: Union[int, Literal["auto"]] = setting(
        "auto", minimum=1, help="videos of a shard (consecutive samples, same size and edit settings) whose chunks "
                                "share one UNet call, each edited as it would be alone; 'auto': 1 on a CPU (it is "
                                "full already), on a GPU as many as the memory estimate allows, at most 8; a number: "
                                "at most that many. Methods that follow one video (tokenflow, vid2vid-zero, "
                                "videodirector) edit one at a time")
    samples_per_task: int | None = setting(
        None, minimum=1, help="samples of an input shard per work item: a shard of M samples becomes ceil(M/N) "
                              "work items, item k editing samples k*N .. k*N+N-1 into its own output shard "
                              "{stem}-{k:05d} (smaller units of work: a lost worker loses less, GPUs finish "
                              "together; `vidbatch compact OUT` merges them afterwards); null: one work item "
                              "per input shard, named after it")
    threads: Union[int, Literal["auto"]] = setting(
        "auto", minimum=1, help="torch CPU threads per worker; 'auto': $OMP_NUM_THREADS if set, else the CPUs "
                                "this process may use (os.sched_getaffinity) divided among the local workers; "
                                "runtime.cpus_per_worker for a Ray CPU worker. On a machine shared with other "
                                "work, 1 is often much faster")


class ConfigBase:
    """What every built :class:`Config` class has beyond its sections."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of the resolved config, recorded in the run summary."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# The application's sections before and after the plug-ins'.
LEADING_SECTIONS = (("model", ModelConfig), ("video", VideoConfig), ("edit", EditConfig))
TRAILING_SECTIONS = (("metrics", MetricsConfig), ("runtime", RuntimeConfig))
# Where the built-in plug-ins' sections sit: where they were before methods and controls were
# plug-ins, so resolved configs (config.yaml) keep their key order. Other sections follow, in
# registration order.
PLUGIN_SECTION_ORDER = ("merge", "pnp", "controlnet", "tokenflow", "vid2vid_zero", "videodirector")

_classes: dict[tuple, type] = {}


def _plugin_sections() -> list[tuple[str, type]]:
    found = [(s.name, s.settings_type) for s in sections()]
    rank = {name: i for i, name in enumerate(PLUGIN_SECTION_ORDER)}
    return sorted(found, key=lambda item: rank.get(item[0], len(rank)))   # stable: the rest keep their order


def config_class() -> type:
    """The `Config` dataclass for the plug-ins registered now (built once per set of sections).

    Fields: `model`, `video`, `edit`, `edits`, `inversion`, the plug-in sections, `metrics`, `runtime`.
    The module's `Config` names the latest one built (so pickling finds it by name).
    """
    global Config
    plugins = tuple(_plugin_sections())
    cls = _classes.get(plugins)
    if cls is None:
        def section(name: str, tp: type) -> tuple:
            return name, tp, field(default_factory=tp)

        fields = [section(n, t) for n, t in LEADING_SECTIONS]
        fields.append(("edits", list[EditSpec], setting([{"name": "edit", "prompt": "{prompt}, oil painting"}],
                                                           help="the edits applied to every video, each {name, prompt}")))
        fields.append(section("inversion", InversionConfig))
        fields += [section(n, t) for n, t in plugins]
        fields += [section(n, t) for n, t in TRAILING_SECTIONS]
        cls = dataclasses.make_dataclass("Config", fields, bases=(ConfigBase,))
        cls.__module__ = __name__   # pickled by reference as vidbatch.config.schema.Config
        cls.__doc__ = "The run configuration: one attribute per section (see config_class)."
        _classes[plugins] = cls
    Config = cls
    return cls


Config = config_class()


# Sections an edit may set for itself (`edits[i].set`): how it is edited, not what is read or written.
PER_EDIT_SECTIONS = ("edit", "inversion")


def per_edit_sections() -> tuple[str, ...]:
    """The sections an edit may override: `edit`, `inversion` and every plug-in's settings section."""
    return PER_EDIT_SECTIONS + tuple(s.name for s in sections())


def expand_compare(edits: typing.Sequence[EditSpec], methods: typing.Sequence[str]) -> list[EditSpec]:
    """`edit.compare`: every edit once per method, named ``{edit}-{method}`` (the edit's own settings kept);
    no methods: the edits as they are."""
    if not methods:
        return list(edits)
    return [dataclasses.replace(edit, name=f"{edit.name}-{method}", method=method, set=dict(edit.set))
            for edit in edits for method in methods]


def edit_config(config: Config, edit: EditSpec, where: str | None = None) -> Config:
    """The run config as `edit` sees it: its method, control and `set` keys applied and validated.

    Only `edit.*`, `inversion.*` and the plug-ins' sections may differ per edit. Errors name the edit
    (`where`, default "edit '<name>'") and the key. An edit that changes nothing gets `config` itself.
    """
    where = where or f"edit '{edit.name}'"
    if not edit.overrides:
        return config
    data = config.to_dict()
    allowed = per_edit_sections()
    for key, value in edit.overrides.items():
        keys = str(key).split(".")
        if len(keys) < 2 or keys[0] not in allowed or keys[:2] == ["edit", "compare"]:
            raise ConfigError(f"{where}: key '{key}' cannot be set per edit; an edit may set keys of "
                              f"{', '.join(allowed)} (except edit.compare)")
        node = data
        for part in keys[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{where}: key '{key}': '{part}' is not a section")
            node = child
        node[keys[-1]] = value
    try:
        resolved = build(config_class(), data, "")
        _validate_edit_settings(resolved)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return resolved


def _validate(config: Config) -> None:
    """Checks that span several keys."""
    if not config.edits:
        raise ConfigError("config key 'edits' is empty; add at least one {name, prompt}")
    unknown = [m for m in config.edit.compare if m not in method_names()]
    if unknown:
        raise ConfigError(f"config key 'edit.compare': unknown method(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(method_names())}")
    _validate_edit_names(expand_compare(config.edits, config.edit.compare))
    _validate_edit_settings(config)
    methods = [edit_config(config, edit, f"config key 'edits' ({edit.name})").edit.method
               for edit in expand_compare(config.edits, config.edit.compare)]
    _check_motion_adapter(config, methods)
    v = config.video
    if v.max_frames is not None and v.max_frames < v.min_frames:
        raise ConfigError(f"config key 'video.max_frames' ({v.max_frames}) is below 'video.min_frames' "
                          f"({v.min_frames}): no video could pass")
    for i, lora in enumerate(config.model.loras):
        if not lora.path:
            raise ConfigError(f"config key 'model.loras[{i}].path' is empty")
    # Cache entries are written and read at random, per video, by every worker: an object store URL there
    # would be a local folder named `s3:` (pathlib) or thousands of small requests; refused up front.
    cache_dir = config.inversion.cache_dir
    if cache_dir is not None and is_url(str(cache_dir)):
        raise ConfigError(f"config key 'inversion.cache_dir' must be a local folder, got '{cache_dir}': the cache "
                          "must be local. Fix: a node-local or shared-filesystem folder (null: $VIDBATCH_CACHE/"
                          "inversions), or inversion.cache=false")


def _validate_edit_names(edits: typing.Sequence[EditSpec]) -> None:
    seen = set()
    for i, edit in enumerate(edits):
        if not EDIT_NAME_PATTERN.match(edit.name):
            raise ConfigError(f"config key 'edits[{i}].name' must be letters, digits, _ or - (it names the "
                              f"output file {{key}}.{{name}}.mp4), got {edit.name!r}")
        if edit.name in seen:
            raise ConfigError(f"config key 'edits[{i}].name': the name {edit.name!r} is used twice")
        seen.add(edit.name)
        if not edit.prompt.strip():
            raise ConfigError(f"config key 'edits[{i}].prompt' is empty")


def _validate_edit_settings(config: Config) -> None:
    """Checks of the keys an edit may set for itself (run for the run config and for each edit's)."""
    for name in sorted(resolve_control(config.edit.method, config.edit.control)):
        control = get_control(name)
        control.check(getattr(config, control.section) if control.section else None)
    method = get_method(config.edit.method)
    if method.needs_motion_module and resolve_control(config.edit.method, config.edit.control):
        raise ConfigError(f"edit.method {config.edit.method!r} runs its own attention control and takes no "
                          "edit.control; set edit.control to auto or none")


def _check_motion_adapter(config: Config, methods: typing.Sequence[str]) -> None:
    """A text-to-video method needs a motion adapter; an image method would be handed a video UNet it cannot run.
    `methods`: the method of every edit of the run."""
    video = sorted({m for m in methods if get_method(m).needs_motion_module})
    image = sorted({m for m in methods if not get_method(m).needs_motion_module})
    has = config.model.motion_adapter is not None
    if video and image:
        raise ConfigError(f"edits use text-to-video method(s) {', '.join(video)} and image method(s) "
                          f"{', '.join(image)}: one run loads one UNet; compare them in separate runs")
    if video and not has:
        raise ConfigError(f"edit.method {video[0]!r} edits with a text-to-video model: set "
                          "model.motion_adapter to an AnimateDiff motion module (e.g. v3_sd15_mm.ckpt; 'tiny' "
                          "with the tiny model)")
    if has and not video:
        raise ConfigError(f"model.motion_adapter is set but edit.method {image[0]!r} edits with an image "
                          "model; set model.motion_adapter to null, or use edit.method videodirector")


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
    config = build(config_class(), data, "")
    _validate(config)
    return config


def save_config(config: Config, path: str | Path) -> None:
    """Writes the resolved config as YAML, atomically (a unique temporary: two drivers may write it at once)."""
    atomic_write(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
