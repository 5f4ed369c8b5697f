"""`vidbatch bench`: time, memory and FLOPs of each editing method on a generated clip.

For every (frames, method) pair the benchmark edits one synthetic clip (ffmpeg's ``testsrc2``, moving)
with the real engine (:class:`vidbatch.editing.VideoEditor`: VAE encode, DDIM inversion, chunked guided
denoising, VAE decode) and reports one row:

* seconds per frame for inversion (VAE encode + DDIM inversion) and for the edit (denoising + VAE decode),
  timed with ``time.perf_counter`` after a warm-up, the device synchronised at each boundary;
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
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vidbatch.errors import ConfigError, ModelLoadError

REQUIRED_FIELDS = ("method", "frames", "size", "invert_s_per_frame", "edit_s_per_frame", "peak_memory_mb")
SOURCE_PROMPT = "a test pattern of moving colour bars"
EDIT_PROMPT = "a watercolor painting of moving colour bars"
CLIP_FPS = 8

# Dense fp16/bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by device-name fragment, most
# specific first. Anything else: the measured throughput of a large matmul (see `device_peak`).
_GPU_PEAKS_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),      # SXM (device name "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


@dataclass
class BenchSpec:
    """One measurement: a method on the first `frames` frames of the clip at `clip_path`.

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
    seed: int = 0
    device_peak_tflops: float | None = None
    device_peak_source: str | None = None


# ------------------------------------------------------------------------------------ small helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int | None:
    """The process's current resident set in bytes (Linux /proc), or None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakMemory:
    """Peak memory while a `with` block runs, and what was held when it started.

    CUDA: ``memory_allocated`` at entry and ``max_memory_allocated`` over the block (the peak counter is
    reset at entry). CPU: the resident set at entry and its maximum over the block, sampled by a thread
    every `interval_s`; where the block set a new process-wide ``ru_maxrss`` that exact figure wins (a
    sampler can miss a short spike, ``ru_maxrss`` cannot, but it also remembers model loading).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device = device
        self.interval_s = interval_s
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._maxrss_at_start = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = self.peak_bytes = torch.cuda.memory_allocated(self.device)
            return self
        self._maxrss_at_start = _maxrss_bytes()
        self.baseline_bytes = self.peak_bytes = _rss_bytes() or self._maxrss_at_start
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="vidbatch-bench-rss", daemon=True)
        self._thread.start()
        return self

    def sample(self) -> None:
        """Take one reading now (the sampler thread also calls this)."""
        if self.device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
            return
        rss = _rss_bytes()
        if rss is not None and rss > self.peak_bytes:
            self.peak_bytes = rss

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, _rss_bytes() or 0)
        maxrss = _maxrss_bytes()
        if maxrss > self._maxrss_at_start:  # the block itself set the process's record: exact
            self.peak_bytes = max(self.peak_bytes, maxrss)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter():
    """A `FlopCounterMode` that also counts the CPU's fused SDPA kernel.

    torch's registry knows the CUDA flash / memory-efficient / cuDNN attention kernels but not
    ``_scaled_dot_product_flash_attention_for_cpu``, so on a CPU attention would count as zero.
    """
    from torch.utils.flop_counter import FlopCounterMode

    custom = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        custom[cpu_sdpa] = _sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=custom)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 3) -> float:
    """Best-of-`repeats` throughput of an `n x n` matmul in TFLOP/s: the practical ceiling of this device."""
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    torch.mm(a, b)  # warm-up (kernel selection, thread pool)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e12


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak TFLOP/s, where the figure comes from) for `dtype` on `device`.

    Known GPUs in half precision: the data-sheet dense tensor-core peak. Otherwise (CPUs, fp32, unknown
    GPUs): the measured throughput of a large matmul, which is what the hardware achieves in practice.
    """
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in _GPU_PEAKS_TFLOPS:
            if fragment in name:
                return tflops, f"data sheet: {name}, dense {str(dtype).removeprefix('torch.')}"
    n = 8192 if device.type == "cuda" else 2048
    tflops = matmul_tflops(device, dtype, n)
    return tflops, f"measured: torch.mm {n}x{n} {str(dtype).removeprefix('torch.')}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {_cpu_name()}, {torch.get_num_threads()} threads"


# ------------------------------------------------------------------------------------ FLOP counting


def _sync_ops() -> frozenset:
    """Operators whose result the host must wait for on an accelerator: a tensor read back as a Python
    number (`.item()`, `int(t)`, `bool(t)`) or an output whose size depends on the data."""
    aten = torch.ops.aten
    names = ("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive")
    return frozenset(getattr(aten, n) for n in names if hasattr(aten, n))


class SyncOpCounter(TorchDispatchMode):
    """Counts the operators that make the host wait for the device (see `_sync_ops`). On a CPU nothing
    waits, but the count is the same as on a GPU, so it shows where a GPU run would stall."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self._ops = _sync_ops()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self._ops:
            self.count += 1
        return func(*args, **(kwargs or {}))


class UnetFlops:
    """Counts the FLOPs of the UNet's forward calls, their samples (batch rows: one frame of one guidance
    branch) and their host-synchronising operators while installed; wraps `unet.forward` on the
    instance, so any caller is seen."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.flops = self.samples = self.calls = self.syncs = 0
        self._original = unet.forward
        unet.forward = self._forward

    def _forward(self, *args, **kwargs):
        sample = args[0] if args else kwargs["sample"]
        with flop_counter() as counter, SyncOpCounter() as syncs:
            out = self._original(*args, **kwargs)
        self.flops += counter.get_total_flops()
        self.samples += int(sample.shape[0])
        self.calls += 1
        self.syncs += syncs.count
        return out

    def take(self) -> dict[str, int]:
        """{"flops", "samples", "calls", "syncs"} since the last take."""
        out = {"flops": self.flops, "samples": self.samples, "calls": self.calls, "syncs": self.syncs}
        self.flops = self.samples = self.calls = self.syncs = 0
        return out

    def remove(self) -> None:
        if self.unet.__dict__.get("forward") == self._forward:
            del self.unet.forward


def probe_unet_flops(editor, frames, seed: int = 0) -> dict[str, float]:
    """UNet forward FLOPs per sample (one frame of one branch at one step), for inversion and for the edit.

    Measured on a one-step edit of all `frames` with the editor's settings (method, chunking, control),
    so whatever a method does inside its UNet calls counts (merging and matching, keyframe passes), and
    partial chunks weigh as often as they occur. The probe also warms the device up. A sample's FLOPs do
    not depend on the step or on how many guidance branches share the call (up to VidToMe's matching,
    which the branches share), so the timed run's FLOPs are these times its samples.

    Returns:
        {"invert": FLOPs per inversion sample, "edit": FLOPs per edit sample, "invert_syncs" and
        "edit_syncs": host-synchronising operators per UNet call (see `SyncOpCounter`)}.
    """
    import dataclasses

    from vidbatch.editing import VideoEditor

    probe = VideoEditor(editor.pipe, dataclasses.replace(editor.settings, steps=1, inversion_steps=None))
    counter = UnetFlops(editor.unet)
    try:
        inversion, _ = probe.cached_invert(frames, SOURCE_PROMPT)
        inv = counter.take()
        probe.denoise(inversion, EDIT_PROMPT, seed, SOURCE_PROMPT)
        edit = counter.take()
    finally:
        counter.remove()
    return {"invert": inv["flops"] / max(inv["samples"], 1), "edit": edit["flops"] / max(edit["samples"], 1),
            "invert_syncs": inv["syncs"] / max(inv["calls"], 1), "edit_syncs": edit["syncs"] / max(edit["calls"], 1)}


class UnetSampleCounter:
    """Counts UNet samples (batch rows: one frame of one branch) while active, via a forward pre-hook."""

    def __init__(self, unet: torch.nn.Module):
        self.samples = 0
        self.calls = 0
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs.get("sample")
        if sample is not None:
            self.samples += int(sample.shape[0])
            self.calls += 1

    def take(self) -> tuple[int, int]:
        """(samples, calls) since the last take."""
        out = (self.samples, self.calls)
        self.samples = self.calls = 0
        return out

    def remove(self) -> None:
        self._handle.remove()


# ------------------------------------------------------------------------------------ one measurement


def bench_config(spec: BenchSpec):
    """The run config of a measurement: defaults, then `spec.overrides`, then the spec's explicit fields."""
    from vidbatch.config import load_config

    overrides = list(spec.overrides) + [f"model.id={spec.model}", f"edit.method={spec.method}"]
    for key, value in (("edit.steps", spec.steps), ("edit.control", spec.control), ("model.dtype", spec.dtype),
                       ("runtime.device", spec.device), ("video.size", spec.size)):
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(None, overrides)


def measure(spec: BenchSpec, log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Runs one measurement in this process and returns its row (see the module docstring)."""
    from vidbatch.editing import VideoEditor
    from vidbatch.lightning_module import VideoEditModule, resolve_device, resolve_dtype
    from vidbatch.models import load_pipeline
    from vidbatch.video_io import decode_video

    if spec.threads:
        torch.set_num_threads(spec.threads)
    started = time.perf_counter()
    config = bench_config(spec)
    device = resolve_device(config.runtime.device)
    dtype = resolve_dtype(config.model.dtype, device)
    settings = VideoEditModule.editor_settings(config)
    pipe = load_pipeline(config.model.id, dtype=dtype, device=device)
    editor = VideoEditor(pipe, settings)
    load_s = time.perf_counter() - started

    decoded = decode_video(Path(spec.clip_path).read_bytes(), Path(spec.clip_path).suffix, short_side=config.video.size,
                           multiple=editor.size_multiple, max_frames=spec.frames, min_frames=spec.frames)
    frames = decoded.frames
    count = len(frames)
    height, width = frames.shape[1:3]
    latent_hw = (height // editor.vae_scale, width // editor.vae_scale)

    if spec.device_peak_tflops is None:
        peak_tflops, peak_source = device_peak(device, dtype)
    else:
        peak_tflops, peak_source = spec.device_peak_tflops, spec.device_peak_source or "given"

    with PeakMemory(device) as memory:
        log(f"{spec.method}: one-step probe (FLOPs, warm-up)")
        counted = time.perf_counter()
        flops = probe_unet_flops(editor, frames, spec.seed)
        _sync(device)
        probe_s = time.perf_counter() - counted
        compile_s = None
        if spec.compile:
            compile_s = _compile_and_warm_up(editor, frames, spec.seed, log)
        load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        profiler = _profiler(device) if spec.profile_dir else None
        runs = []
        with profiler or contextlib.nullcontext():
            for _ in range(max(1, spec.repeat)):  # on a shared machine the fastest run is the least disturbed
                runs.append(_timed_edit(editor, frames, spec.seed, log))
        timed = min(runs, key=lambda run: run["t"][3] - run["t"][0])
    if profiler is not None:
        _write_profile(profiler, device, Path(spec.profile_dir) / f"{spec.method}-{count}.txt")
    t0, t1, t2, t3 = timed["t"]
    inv_samples, inv_calls = timed["invert"]
    edit_samples, edit_calls = timed["edit"]

    invert_s, denoise_s, decode_s = t1 - t0, t2 - t1, t3 - t2
    total_s = t3 - t0
    unet_flops = flops["invert"] * inv_samples + flops["edit"] * edit_samples
    achieved = unet_flops / total_s / 1e12
    steps = settings.steps
    return {
        "method": spec.method,
        "model": spec.model,
        "frames": count,
        "size": int(min(height, width)),
        "width": int(width),
        "height": int(height),
        "steps": steps,
        "inversion_steps": settings.inversion_steps or steps,
        "control": settings.control,
        "chunk_size": editor.chunk_size_for(count, latent_hw),
        "dtype": str(dtype).removeprefix("torch."),
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
        "load_avg_1m": load_avg,
        "probe_s": probe_s,
        "compile_s": compile_s,
        "load_s": load_s,
        "torch": torch.__version__,
    }


def _timed_edit(editor, frames, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Inverts and edits `frames` once with perf_counter marks at the stage boundaries (device synced).

    Returns {"t": (start, inverted, denoised, decoded), "invert": (samples, calls), "edit": (samples, calls)}.
    """
    device = editor.device
    samples = UnetSampleCounter(editor.unet)
    try:
        log(f"{editor.settings.method}: inverting {len(frames)} frames")
        _sync(device)
        t0 = time.perf_counter()
        inversion, _ = editor.cached_invert(frames, SOURCE_PROMPT)  # no cache here: always inverts
        _sync(device)
        t1 = time.perf_counter()
        invert = samples.take()
        log(f"{editor.settings.method}: editing {len(frames)} frames")
        latents = editor.denoise(inversion, EDIT_PROMPT, seed, SOURCE_PROMPT)
        _sync(device)
        t2 = time.perf_counter()
        edit = samples.take()
        editor.decode_latents(latents)
        _sync(device)
        t3 = time.perf_counter()
    finally:
        samples.remove()
    return {"t": (t0, t1, t2, t3), "invert": invert, "edit": edit}


def _profiler(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


def _write_profile(profiler, device: torch.device, path: Path) -> None:
    """The profiled run's top operators by self time (device time on a GPU) as a text table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(profiler.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70) + "\n")


def _compile_and_warm_up(editor, frames, seed: int, log: Callable[[str], None]) -> float:
    """`torch.compile` the UNet in place, then run the whole timed edit once so that every shape it
    meets (inversion batch, chunk sizes, 2 and 3 guidance branches) is compiled before timing; returns
    the seconds this took."""
    started = time.perf_counter()
    editor.unet.compile()
    log(f"{editor.settings.method}: compiling (one untimed run)")
    _timed_edit(editor, frames, seed, log)
    _sync(editor.device)
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------ the whole benchmark


def default_methods() -> list[str]:
    """Every method the engine has (config.METHODS), in its order."""
    from vidbatch.config import METHODS

    return list(METHODS)


def validate(methods: Sequence[str], frames: Sequence[int], size: int | None, steps: int | None,
             repeat: int = 1) -> None:
    """Raise ConfigError naming the first bad argument."""
    valid = default_methods()
    unknown = [m for m in methods if m not in valid]
    if unknown:
        raise ConfigError(f"bench --methods: unknown method(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    if not methods:
        raise ConfigError("bench --methods: give at least one method")
    if not frames or any(int(n) < 1 for n in frames):
        raise ConfigError(f"bench --frames: every frame count must be >= 1, got {list(frames)}")
    if size is not None and size < 8:
        raise ConfigError(f"bench --size: the short side must be at least 8 pixels, got {size}")
    if steps is not None and steps < 1:
        raise ConfigError(f"bench --steps must be >= 1, got {steps}")
    if repeat < 1:
        raise ConfigError(f"bench --repeat must be >= 1, got {repeat}")


def make_clip(folder: Path, frames: int, size: int) -> Path:
    """A moving synthetic clip (ffmpeg testsrc2) of `frames` frames, `size` x `size` pixels."""
    from vidbatch.video_io import make_test_video

    return make_test_video(folder / "bench.mp4", seconds=frames / CLIP_FPS, fps=CLIP_FPS, size=(size, size))


def _prepare_model(model: str) -> Path | None:
    """The model's diffusers folder, if it has one; builds a built-in random model's cache folder first,
    once, before the measurement processes race to do it."""
    from vidbatch import tiny_model

    if model == "tiny":
        return tiny_model.tiny_model_dir()
    if model == "sd15-random":
        return tiny_model.sd15_random_dir()
    folder = Path(model).expanduser()
    return folder if folder.is_dir() else None


def native_size(model_dir: Path | None) -> int | None:
    """The resolution a diffusers Stable Diffusion folder was trained at: UNet sample_size x VAE scale
    (tiny: 64 px, SD 1.5: 512 px); None when the folder does not say."""
    if model_dir is None:
        return None
    try:
        unet = json.loads((model_dir / "unet" / "config.json").read_text())
        vae = json.loads((model_dir / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_isolated(spec: BenchSpec, workdir: Path) -> dict[str, Any]:
    """`measure(spec)` in a fresh Python process; a failure becomes a row with `error`."""
    spec_path = workdir / f"spec-{spec.method}-{spec.frames}.json"
    out_path = workdir / f"row-{spec.method}-{spec.frames}.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    out_path.unlink(missing_ok=True)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "vidbatch.bench", str(spec_path), str(out_path)],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if out_path.is_file():
        row = json.loads(out_path.read_text())
    else:
        tail = " | ".join(line for line in proc.stderr.strip().splitlines()[-3:])
        row = {"error": f"the measurement process exited with code {proc.returncode}: {tail}",
               "error_type": "ProcessError"}
    if row.get("error_type") == "ModelLoadError":
        raise ModelLoadError(row["error"])
    return row


def run_bench(model: str, methods: Sequence[str], frames: Sequence[int], *, size: int | None = None,
              steps: int | None = None, control: str | None = None, dtype: str | None = None,
              device: str | None = None, overrides: Sequence[str] = (), compile: bool = False,
              profile_dir: str | Path | None = None, threads: int | None = None, repeat: int = 1,
              isolate: bool = True,
              log: Callable[[str], None] = lambda msg: None) -> Iterator[dict[str, Any]]:
    """Measures every (frames, method) pair; yields one row each, as it is done.

    A measurement that fails (out of memory, say) yields a row with the pair, `error` and `error_type`
    instead of the figures. A model that cannot be loaded raises ModelLoadError.
    """
    from vidbatch.config import resolve_control

    validate(methods, frames, size, steps, repeat)
    model_dir = _prepare_model(model)
    if size is None and not any(o.split("=", 1)[0].strip() == "video.size" for o in overrides):
        size = native_size(model_dir)  # default: the model's own resolution rather than video.size
    base = bench_config(BenchSpec(model=model, method=methods[0], frames=1, clip_path="", size=size,
                                  steps=steps, control=control, dtype=dtype, device=device,
                                  overrides=list(overrides)))
    clip_size = base.video.size or 512
    if "controlnet" in resolve_control(base.edit.method, base.edit.control):
        raise ConfigError("bench does not load a ControlNet: use --control none, pnp or sdedit")
    peak: tuple[float | None, str | None] = (None, None)
    with tempfile.TemporaryDirectory(prefix="vidbatch-bench-") as tmp:
        workdir = Path(tmp)
        log(f"generating a {max(frames)}-frame clip at {clip_size} px")
        clip = make_clip(workdir, max(frames), clip_size)
        for n in frames:
            for method in methods:
                spec = BenchSpec(model=model, method=method, frames=int(n), clip_path=str(clip), size=size,
                                 steps=steps, control=control, dtype=dtype, device=device,
                                 overrides=list(overrides), compile=compile,
                                 profile_dir=None if profile_dir is None else str(Path(profile_dir).resolve()),
                                 threads=threads, repeat=repeat,
                                 device_peak_tflops=peak[0], device_peak_source=peak[1])
                log(f"measuring {method} on {n} frames")
                if isolate:
                    row = _run_isolated(spec, workdir)
                else:
                    row = _measure_safely(spec, log)
                if "error" in row:
                    row = {"method": method, "frames": int(n), "size": clip_size, "model": model, **row}
                elif peak[0] is None:  # every later row uses the same ceiling
                    peak = (row["device_peak_tflops"], row["device_peak_source"])
                yield row


def _measure_safely(spec: BenchSpec, log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    try:
        return measure(spec, log)
    except ModelLoadError:
        raise
    except Exception as exc:  # one failed pair (OOM, say) must not end the benchmark
        return {"error": f"{type(exc).__name__}: {exc}"[:500], "error_type": type(exc).__name__}


# ------------------------------------------------------------------------------------ output


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


TABLE_COLUMNS = (
    ("method", "method", 0),
    ("frames", "frames", 0),
    ("size", "px", 0),
    ("invert_s_per_frame", "invert s/frame", 3),
    ("edit_s_per_frame", "edit s/frame", 3),
    ("frames_per_s", "frames/s", 3),
    ("peak_memory_mb", "peak MB", 4),
    ("activation_memory_mb", "above start MB", 3),
    ("unet_gflop_per_sample_edit", "edit GFLOP/sample", 3),
    ("unet_tflop_per_frame", "UNet TFLOP/frame", 3),
    ("peak_fraction", "of peak", 2),
)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table (failed rows show their error)."""
    lines = ["| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |",
             "|" + "|".join(" --- " for _ in TABLE_COLUMNS) + "|"]
    for row in rows:
        if "error" in row:
            cells = [_fmt(row.get("method")), _fmt(row.get("frames")), _fmt(row.get("size")),
                     f"failed: {row['error']}"] + [""] * (len(TABLE_COLUMNS) - 4)
        else:
            cells = []
            for key, _, digits in TABLE_COLUMNS:
                value = row.get(key)
                cells.append(f"{100 * value:.1f}%" if key == "peak_fraction" and value is not None
                             else _fmt(value, digits or 3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rich_table(rows: Sequence[dict[str, Any]]):
    from rich.table import Table

    table = Table(title="vidbatch bench")
    for _, title, _ in TABLE_COLUMNS:
        table.add_column(title, justify="right")
    for row in rows:
        if "error" in row:
            table.add_row(_fmt(row.get("method")), _fmt(row.get("frames")), _fmt(row.get("size")),
                          f"[red]failed: {row['error']}[/red]", *[""] * (len(TABLE_COLUMNS) - 4))
            continue
        table.add_row(*[f"{100 * row[k]:.1f}%" if k == "peak_fraction" and row.get(k) is not None
                        else _fmt(row.get(k), d or 3) for k, _, d in TABLE_COLUMNS])
    return table


def bench_main(args, console) -> int:
    """The `vidbatch bench` command: 0 when every measurement succeeded, 1 when one failed."""
    from rich.console import Console

    err = Console(stderr=True)

    def log(msg: str) -> None:
        if not args.json:
            err.print(f"[dim]bench:[/dim] {msg}", highlight=False)

    methods = args.methods or default_methods()
    rows = []
    for row in run_bench(args.model, methods, args.frames, size=args.size, steps=args.steps,
                         control=args.control, dtype=args.dtype, device=args.device, overrides=args.overrides,
                         compile=args.compile, profile_dir=args.profile, threads=args.threads,
                         repeat=args.repeat, isolate=not args.in_process, log=log):
        rows.append(row)
        if args.json:
            sys.stdout.write(json.dumps(row, sort_keys=True) + "\n")
            sys.stdout.flush()
    if args.markdown:
        sys.stdout.write(markdown_table(rows) + "\n")
    elif not args.json:
        console.print(rich_table(rows), width=max(console.width, 150))  # 11 columns: never squeeze them
    return 1 if any("error" in row for row in rows) else 0


def _worker(spec_path: str, out_path: str) -> int:
    """Entry of a measurement process: reads a BenchSpec (JSON), writes its row (JSON)."""
    spec = BenchSpec(**json.loads(Path(spec_path).read_text()))
    try:
        row = measure(spec)
    except ModelLoadError as exc:
        row = {"error": str(exc), "error_type": "ModelLoadError"}
    except Exception as exc:  # noqa: BLE001 - reported as the pair's error row
        row = {"error": f"{type(exc).__name__}: {exc}"[:500], "error_type": type(exc).__name__}
    tmp = Path(out_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(row))
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2]))
