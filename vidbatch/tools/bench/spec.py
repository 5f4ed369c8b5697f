"""What one bench measurement is: a `BenchSpec`, the config it runs under, and the fixed prompts."""

from __future__ import annotations

from dataclasses import dataclass, field

from vidbatch.config.schema import Config, load_config
from vidbatch.engine.plugins import get_method
from vidbatch.models.motion import ADAPTER_FOR_MODEL

REQUIRED_FIELDS = ("method", "frames", "size", "invert_s_per_frame", "edit_s_per_frame", "peak_memory_mb")
SOURCE_PROMPT = "a test pattern of moving colour bars"
EDIT_PROMPT = "a watercolor painting of moving colour bars"
CLIP_FPS = 8


@dataclass
class BenchSpec:
    """One measurement: a method on the first `frames` frames of the clip at `clip_path`; with
    `batch_videos` above 1, that many copies of it edited together (`runtime.batch_videos`: their chunks
    share UNet calls), each with its own seed.

    `overrides` are config `--set` strings (applied over the defaults); `steps`, `control`, `dtype`,
    `device` and `size` override the matching config keys when not None.
    """

    model: str
    method: str
    frames: int
    clip_path: str
    size: int | None = None
    steps: int | None = None
    control: str | None = None
    dtype: str | None = None
    device: str | None = None
    overrides: list[str] = field(default_factory=list)
    compile: bool = False
    profile_dir: str | None = None
    threads: int | None = None
    repeat: int = 1
    batch_videos: int = 1
    seed: int = 0
    device_peak_tflops: float | None = None
    device_peak_source: str | None = None


def bench_config(spec: BenchSpec) -> Config:
    """The run config of a measurement: defaults, then `spec.overrides`, then the spec's explicit fields."""
    overrides = list(spec.overrides) + [f"model.id={spec.model}", f"edit.method={spec.method}"]
    if get_method(spec.method).needs_motion_module and spec.model in ADAPTER_FOR_MODEL:
        # A text-to-video method needs its motion module: the built-in one of the built-in model.
        overrides.insert(0, f"model.motion_adapter={ADAPTER_FOR_MODEL[spec.model]}")
    for key, value in (("edit.steps", spec.steps), ("edit.control", spec.control), ("model.dtype", spec.dtype),
                       ("runtime.device", spec.device), ("video.size", spec.size)):
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(None, overrides)
