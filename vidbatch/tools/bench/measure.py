"""`vidbatch bench`: time, memory and FLOPs of each editing method on a generated clip.

For every (frames, method) pair the benchmark edits one synthetic clip (ffmpeg's ``testsrc2``, moving)
with the real engine (:class:`vidbatch.engine.editor.VideoEditor`: VAE encode, DDIM inversion, chunked guided
denoising, VAE decode) and reports one row:

* seconds per frame for inversion (VAE encode + DDIM inversion) and for the edit (denoising + VAE decode),
  timed with ``time.perf_counter`` after a warm-up, the device synchronised at each boundary; with
  ``batch_videos`` N above 1, N copies of the clip are inverted one by one and edited together (their
  chunks share UNet calls, :meth:`VideoEditor.denoise_videos`), and every per-frame figure counts the
  frames of all N;
* peak memory: CUDA's ``max_memory_allocated`` on a GPU, the process's peak resident set on a CPU, and the
  part of it above what was held before editing started (weights, frames): ``activation_memory_mb``;
* UNet FLOPs per frame (``torch.utils.flop_counter.FlopCounterMode`` over the UNet calls of a one-step
  probe edit, scaled by the number of UNet evaluations the timed run made), the achieved share of the
  device's peak, and how many operators per UNet call would make a GPU's host wait (``.item()``,
  ``nonzero``...).

Each measurement runs in a fresh Python process by default: peak RSS is per process and only grows, and a
fresh process cannot inherit allocator caches or compiled kernels from the previous method.

Rows are plain dicts (JSON-ready); :data:`REQUIRED_FIELDS` are always present.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from vidbatch.batch.edits import editor_settings
from vidbatch.config.schema import Config
from vidbatch.engine.editor import DenoiseJob, EditorSettings, VideoEditor, method_for
from vidbatch.core.errors import ModelLoadError
from vidbatch.batch.module import resolve_device, resolve_dtype
from vidbatch.models.loading import load_pipeline
from vidbatch.models.motion import with_motion_adapter
from vidbatch.tools.bench.device import device_description, device_peak, sync
from vidbatch.tools.bench.flops import UnetSampleCounter, probe_unet_flops
from vidbatch.tools.bench.sampler import PeakMemory
from vidbatch.tools.bench.spec import EDIT_PROMPT, SOURCE_PROMPT, BenchSpec, bench_config
from vidbatch.io.video import decode_video


@dataclass
class _Loaded:
    """The editor of a measurement and what it was built from."""

    config: Config
    device: torch.device
    dtype: torch.dtype
    settings: EditorSettings
    editor: VideoEditor
    load_s: float


@dataclass
class _Timed:
    """What the memory-metered part of a measurement found."""

    memory: PeakMemory
    flops: dict[str, float]  # see `probe_unet_flops`
    probe_s: float
    compile_s: float | None
    load_avg: float | None
    runs: list[dict[str, Any]]  # every timed run (see `_timed_edit`)
    fastest: dict[str, Any]  # on a shared machine the fastest run is the least disturbed
    profiler: profile | None  # set when the timed runs were profiled


def measure(spec: BenchSpec, log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Runs one measurement in this process and returns its row (see the module docstring)."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    loaded = _load_editor(spec)
    frames = _load_frames(spec, loaded)
    if spec.device_peak_tflops is None:
        peak = device_peak(loaded.device, loaded.dtype)
    else:
        peak = (spec.device_peak_tflops, spec.device_peak_source or "given")
    timed = _metered_runs(spec, loaded, frames, log)
    if timed.profiler is not None:
        _write_profile(timed.profiler, loaded.device, Path(spec.profile_dir) / f"{spec.method}-{len(frames)}.txt")
    return _row(spec, loaded, frames, timed, peak)


def _load_editor(spec: BenchSpec) -> _Loaded:
    """The pipeline and editor of `spec`, timed (weights loading is reported, not benchmarked)."""
    started = time.perf_counter()
    config = bench_config(spec)
    device = resolve_device(config.runtime.device)
    dtype = resolve_dtype(config.model.dtype, device)
    settings = editor_settings(config)
    pipe = load_pipeline(config.model.id, dtype=dtype, device=device)
    if config.model.motion_adapter is not None:
        with_motion_adapter(pipe, config.model.motion_adapter, config=config.model.motion_adapter_config)
    editor = VideoEditor(pipe, settings)
    return _Loaded(config, device, dtype, settings, editor, time.perf_counter() - started)


def _load_frames(spec: BenchSpec, loaded: _Loaded) -> np.ndarray:
    """The first `spec.frames` frames of the clip, at the run's size: `(T, H, W, 3)` uint8."""
    path = Path(spec.clip_path)
    decoded = decode_video(path.read_bytes(), path.suffix, short_side=loaded.config.video.size,
                           multiple=loaded.editor.size_multiple, max_frames=spec.frames, min_frames=spec.frames)
    return decoded.frames


def _metered_runs(spec: BenchSpec, loaded: _Loaded, frames: np.ndarray, log: Callable[[str], None]) -> _Timed:
    """Under one peak-memory meter: the FLOP probe (which also warms up), the optional compile, and
    `spec.repeat` timed edits (profiled when `spec.profile_dir` is set)."""
    editor, device = loaded.editor, loaded.device
    with PeakMemory(device) as memory:
        log(f"{spec.method}: one-step probe (FLOPs, warm-up)")
        counted = time.perf_counter()
        flops = probe_unet_flops(editor, frames, spec.seed)
        sync(device)
        probe_s = time.perf_counter() - counted
        compile_s = _compile_and_warm_up(editor, frames, spec.seed, log, spec.batch_videos) if spec.compile else None
        load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        profiler = _profiler(device) if spec.profile_dir else None
        runs = []
        with profiler or contextlib.nullcontext():
            for _ in range(max(1, spec.repeat)):
                runs.append(_timed_edit(editor, frames, spec.seed, log, spec.batch_videos))
        fastest = min(runs, key=lambda run: run["t"][3] - run["t"][0])
    return _Timed(memory, flops, probe_s, compile_s, load_avg, runs, fastest, profiler)


def _row(spec: BenchSpec, loaded: _Loaded, frames: np.ndarray, timed: _Timed,
         peak: tuple[float, str]) -> dict[str, Any]:
    """The measurement's row: the fastest run's times, memory and FLOPs, and what produced them."""
    settings, editor, device, memory, flops = loaded.settings, loaded.editor, loaded.device, timed.memory, timed.flops
    runs, peak_tflops, peak_source = timed.runs, peak[0], peak[1]
    clip_frames = len(frames)
    count = clip_frames * spec.batch_videos  # every per-frame figure counts the frames of all the videos
    height, width = frames.shape[1:3]
    latent_hw = (height // editor.vae_scale, width // editor.vae_scale)
    t0, t1, t2, t3 = timed.fastest["t"]
    inv_samples, inv_calls = timed.fastest["invert"]
    edit_samples, edit_calls = timed.fastest["edit"]
    invert_s, denoise_s, decode_s = t1 - t0, t2 - t1, t3 - t2
    total_s = t3 - t0
    unet_flops = flops["invert"] * inv_samples + flops["edit"] * edit_samples
    achieved = unet_flops / total_s / 1e12
    steps = settings.steps
    return {
        "method": spec.method,
        "model": spec.model,
        "frames": clip_frames,
        "batch_videos": spec.batch_videos,
        "size": int(min(height, width)),
        "width": int(width),
        "height": int(height),
        "steps": steps,
        "inversion_steps": settings.inversion_steps or steps,
        "control": settings.control,
        "chunk_size": editor.chunk_size_for(clip_frames, latent_hw),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": device_description(device),
        "compile": spec.compile,
        "profiled": bool(spec.profile_dir),
        "repeat": len(runs),
        "total_s_runs": [run["t"][3] - run["t"][0] for run in runs],
        "invert_s_per_frame": invert_s / count,
        "edit_s_per_frame": (denoise_s + decode_s) / count,
        "denoise_s_per_frame": denoise_s / count,
        "decode_s_per_frame": decode_s / count,
        "frames_per_s": count / total_s,
        "peak_memory_mb": memory.peak_bytes / 2**20,
        "activation_memory_mb": max(0, memory.peak_bytes - memory.baseline_bytes) / 2**20,
        "peak_memory_source": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "unet_gflop_per_sample_invert": flops["invert"] / 1e9,
        "unet_gflop_per_sample_edit": flops["edit"] / 1e9,
        "syncs_per_unet_call_invert": flops["invert_syncs"],
        "syncs_per_unet_call_edit": flops["edit_syncs"],
        "unet_samples_per_frame_invert": inv_samples / count,
        "unet_samples_per_frame_edit": edit_samples / count,
        "unet_calls": inv_calls + edit_calls,
        "unet_tflop_per_frame": unet_flops / count / 1e12,
        "achieved_tflops": achieved,
        "device_peak_tflops": peak_tflops,
        "device_peak_source": peak_source,
        "peak_fraction": achieved / peak_tflops if peak_tflops else None,
        "load_avg_1m": timed.load_avg,
        "probe_s": timed.probe_s,
        "compile_s": timed.compile_s,
        "load_s": loaded.load_s,
        "torch": torch.__version__,
    }




def _timed_edit(editor, frames, seed: int, log: Callable[[str], None], videos: int = 1) -> dict[str, Any]:
    """Inverts and edits `frames` once (`videos` copies of them, edited together, each with its own seed)
    with perf_counter marks at the stage boundaries (device synced).

    Returns {"t": (start, inverted, denoised, decoded), "invert": (samples, calls), "edit": (samples, calls)}.
    """
    device = editor.device
    samples = UnetSampleCounter(editor.unet)
    try:
        log(f"{editor.settings.method}: inverting {len(frames)} frames x {videos}")
        sync(device)
        t0 = time.perf_counter()
        # No cache here: every copy is inverted, as distinct videos would be.
        inversions = [editor.cached_invert(frames, SOURCE_PROMPT)[0] for _ in range(videos)]
        sync(device)
        t1 = time.perf_counter()
        invert = samples.take()
        log(f"{editor.settings.method}: editing {len(frames)} frames x {videos}")
        jobs = [DenoiseJob(method_for(editor.settings), inversion, EDIT_PROMPT, seed + i, SOURCE_PROMPT)
                for i, inversion in enumerate(inversions)]
        latents = editor.denoise_videos(jobs)
        sync(device)
        t2 = time.perf_counter()
        edit = samples.take()
        for video in latents:
            editor.decode_latents(video)
        sync(device)
        t3 = time.perf_counter()
    finally:
        samples.remove()
    return {"t": (t0, t1, t2, t3), "invert": invert, "edit": edit}


def _profiler(device: torch.device) -> profile:
    """A torch profiler of the CPU, and of CUDA on a GPU."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


def _write_profile(profiler, device: torch.device, path: Path) -> None:
    """The profiled run's top operators by self time (device time on a GPU) as a text table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(profiler.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70) + "\n")


def _compile_and_warm_up(editor, frames, seed: int, log: Callable[[str], None], videos: int = 1) -> float:
    """`torch.compile` the UNet in place, then run the whole timed edit once so that every shape it
    meets (inversion batch, chunk sizes, 2 and 3 guidance branches) is compiled before timing; returns
    the seconds this took."""
    started = time.perf_counter()
    editor.unet.compile()
    log(f"{editor.settings.method}: compiling (one untimed run)")
    _timed_edit(editor, frames, seed, log, videos)
    sync(editor.device)
    return time.perf_counter() - started


def measure_safely(spec: BenchSpec, log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """`measure(spec)`, a failure (other than a model that cannot be loaded) returned as an error row."""
    try:
        return measure(spec, log)
    except ModelLoadError:
        raise
    except Exception as exc:  # one failed pair (OOM, say) must not end the benchmark
        return {"error": f"{type(exc).__name__}: {exc}"[:500], "error_type": type(exc).__name__}
