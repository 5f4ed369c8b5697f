"""The `vidbatch bench` command: every (frames, method) pair measured, each in a fresh process."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from rich.console import Console

from vidbatch.models import builtin as tiny_model
from vidbatch.config.schema import resolve_control
from vidbatch.engine.plugins import method_names
from vidbatch.core.errors import ConfigError, ModelLoadError
from vidbatch.tools.bench.measure import measure_safely
from vidbatch.tools.bench.spec import CLIP_FPS, BenchSpec, bench_config
from vidbatch.tools.bench.tables import markdown_table, rich_table
from vidbatch.testing.clips import make_test_video

# Run as `python -m WORKER_MODULE SPEC.json ROW.json` for one measurement in a fresh process.
WORKER_MODULE = "vidbatch.tools.bench.worker"


def default_methods() -> list[str]:
    """Every method registered with the engine, in registration order."""
    return list(method_names())


def validate(methods: Sequence[str], frames: Sequence[int], size: int | None, steps: int | None,
             repeat: int = 1, batch_videos: Sequence[int] = (1,)) -> None:
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
    if not batch_videos or any(int(n) < 1 for n in batch_videos):
        raise ConfigError(f"bench --batch-videos: every count must be >= 1, got {list(batch_videos)}")


def make_clip(folder: Path, frames: int, size: int) -> Path:
    """A moving synthetic clip (ffmpeg testsrc2) of `frames` frames, `size` x `size` pixels."""
    return make_test_video(folder / "bench.mp4", seconds=frames / CLIP_FPS, fps=CLIP_FPS, size=(size, size))


def _prepare_model(model: str) -> Path | None:
    """The model's diffusers folder, if it has one; builds a built-in random model's cache folder first,
    once, before the measurement processes race to do it."""
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
    spec_path = workdir / f"spec-{spec.method}-{spec.frames}-{spec.batch_videos}.json"
    out_path = workdir / f"row-{spec.method}-{spec.frames}-{spec.batch_videos}.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    out_path.unlink(missing_ok=True)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[3])  # the folder that holds `vidbatch/`
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", WORKER_MODULE, str(spec_path), str(out_path)],
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
              batch_videos: Sequence[int] = (1,), isolate: bool = True,
              log: Callable[[str], None] = lambda msg: None) -> Iterator[dict[str, Any]]:
    """Measures every (frames, method, batch_videos) triple; yields one row each, as it is done.

    A measurement that fails (out of memory, say) yields a row with the pair, `error` and `error_type`
    instead of the figures. A model that cannot be loaded raises ModelLoadError.
    """
    validate(methods, frames, size, steps, repeat, batch_videos)
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
                for videos in batch_videos:
                    spec = BenchSpec(model=model, method=method, frames=int(n), clip_path=str(clip), size=size,
                                     steps=steps, control=control, dtype=dtype, device=device,
                                     overrides=list(overrides), compile=compile,
                                     profile_dir=None if profile_dir is None else str(Path(profile_dir).resolve()),
                                     threads=threads, repeat=repeat, batch_videos=int(videos),
                                     device_peak_tflops=peak[0], device_peak_source=peak[1])
                    log(f"measuring {method} on {n} frames" + (f" x {videos} videos" if videos > 1 else ""))
                    if isolate:
                        row = _run_isolated(spec, workdir)
                    else:
                        row = measure_safely(spec, log)
                    if "error" in row:
                        row = {"method": method, "frames": int(n), "batch_videos": int(videos), "size": clip_size,
                               "model": model, **row}
                    elif peak[0] is None:  # every later row uses the same ceiling
                        peak = (row["device_peak_tflops"], row["device_peak_source"])
                    yield row


def bench_main(args: argparse.Namespace, console: Console) -> int:
    """The `vidbatch bench` command: 0 when every measurement succeeded, 1 when one failed."""
    err = Console(stderr=True)

    def log(msg: str) -> None:
        if not args.json:
            err.print(f"[dim]bench:[/dim] {msg}", highlight=False)

    methods = args.methods or default_methods()
    rows = []
    for row in run_bench(args.model, methods, args.frames, size=args.size, steps=args.steps,
                         control=args.control, dtype=args.dtype, device=args.device, overrides=args.overrides,
                         compile=args.compile, profile_dir=args.profile, threads=args.threads,
                         repeat=args.repeat, batch_videos=args.batch_videos, isolate=not args.in_process,
                         log=log):
        rows.append(row)
        if args.json:
            sys.stdout.write(json.dumps(row, sort_keys=True) + "\n")
            sys.stdout.flush()
    if args.markdown:
        sys.stdout.write(markdown_table(rows) + "\n")
    elif not args.json:
        console.print(rich_table(rows), width=max(console.width, 150))  # 11 columns: never squeeze them
    return 1 if any("error" in row for row in rows) else 0
