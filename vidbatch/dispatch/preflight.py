"""Checks made before any model loads or any worker starts, so ordinary mistakes end in one line naming
the cause and the fix (exit code 2) instead of a traceback minutes into a run; and the plan's one-line
description, with a warning when it would run a full-size model on the CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from vidbatch.config.schema import Config
from vidbatch.core.errors import UsageError
from vidbatch.io.input_shards import VIDEO_EXTENSIONS, expand_urls
from vidbatch.models.availability import BUILTIN_MODELS, check_model_available
from vidbatch.models.loading import hub_offline

# Models small enough that the CPU is a fine place for them.
CPU_FRIENDLY_MODELS = ("tiny",)


def check_output_dir(out_dir: Path) -> None:
    """The output folder must be a folder (created when missing) this process can write."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output '{out_dir}' is a file, not a folder. Fix: give a folder path (it is created "
                         "if missing)")
    for parent in out_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--output '{out_dir}': '{parent}' is a file, not a folder. Fix: give a folder "
                                 "path whose parents are folders")
            break
    existing = out_dir if out_dir.exists() else next(p for p in out_dir.absolute().parents if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output '{out_dir}': no permission to write in '{existing}'. Fix: choose a folder you "
                         "can write to")


def check_inputs(inputs: Sequence[str]) -> list[str]:
    """The expanded input URLs; a UsageError for a local input that is a folder or a video file."""
    urls = expand_urls(list(inputs))
    for url in urls:
        if url.startswith("pipe:") or "://" in url:
            continue
        path = Path(url)
        if path.is_dir():
            raise UsageError(f"--input '{url}' is a folder; vidbatch run reads WebDataset shards (.tar). Fix: pack "
                             f"it first with `vidbatch shard {url} --output shards/`, then pass --input "
                             "'shards/part-{000000..000009}.tar' (the names it prints)")
        if path.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS:
            raise UsageError(f"--input '{url}' is a video file; vidbatch run reads WebDataset shards (.tar) of "
                             f"videos. Fix: put the video in a folder and pack it with `vidbatch shard FOLDER "
                             "--output shards/`, then pass --input 'shards/part-000000.tar'")
    return urls


def check_model(config: Config) -> None:
    """The configured model (and a ControlNet, when used) can be found; see models.availability."""
    check_model_available(config.model.id, offline=hub_offline())


def resolve_threads(config: Config, local_workers: int = 1) -> int:
    """torch threads for one local worker: `runtime.threads`; with 'auto', `OMP_NUM_THREADS` when the user
    set it, else the CPUs this process may run on (its affinity mask: a SLURM or container CPU limit
    counts) divided among `local_workers`."""
    threads = config.runtime.threads
    if threads != "auto":
        return int(threads)
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, local_workers))


def apply_threads(threads: int) -> None:
    """Sets torch's CPU threads here and, through the environment, in processes started from here
    (their OpenMP reads it once, when torch first starts work)."""
    import torch

    torch.set_num_threads(threads)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)


def plan_device(config: Config) -> str | None:
    """'cuda' or 'cpu' where this machine decides it (local backend, or an embedded Ray cluster); None when
    a remote Ray cluster will (its GPUs are not known here)."""
    device = config.runtime.device
    if device != "auto":
        return "cpu" if device == "cpu" else "cuda"
    if config.runtime.backend == "ray" and (config.runtime.ray_address or os.environ.get("RAY_ADDRESS")):
        return None
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_warning(config: Config, threads: int) -> str | None:
    """A warning when the plan edits with a full-size model on the CPU (it works, at minutes per frame)."""
    if plan_device(config) != "cpu" or config.model.id in CPU_FRIENDLY_MODELS:
        return None
    size = "the source size" if config.video.size is None else f"{config.video.size} px"
    what = "a random-weight SD 1.5" if config.model.id in BUILTIN_MODELS else f"model '{config.model.id}'"
    return (f"no GPU: planning {what} at {size}, {config.edit.steps} steps, on the CPU with {threads} thread(s) per "
            "worker; expect minutes per frame. For a quick try use configs/tiny.yaml; on a GPU machine this runs "
            "on the GPU")
