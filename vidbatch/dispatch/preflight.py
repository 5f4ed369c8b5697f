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
from vidbatch.core.paths import WEB_SCHEMES, check_url_supported, is_url, local_path, url_scheme
from vidbatch.io.input_shards import VIDEO_EXTENSIONS, expand_urls
from vidbatch.io.object_store import bind_staging, staging_dir, store_of, sync_from_store
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


def check_output_url(url: str, *, backend: str = "local", ray_address: str | None = None,
                     num_shards: int = 1) -> None:
    """An `--output` URL must name a writable fsspec scheme whose package is installed, and the run must be
    one that a node-local staging folder serves: its leases (`dispatch.leases`) live in that folder, so
    drivers on several machines (`--num-shards` > 1, SLURM array tasks, a multi-machine Ray cluster)
    cannot share an object store output yet."""
    check_url_supported(url, "--output")
    scheme = url_scheme(url)
    if scheme in WEB_SCHEMES:
        raise UsageError(f"--output '{url}': {scheme}:// cannot be written to. Fix: give a local folder or an object "
                         "store URL (s3://bucket/prefix)")
    if num_shards > 1:
        raise UsageError(f"--output '{url}': {num_shards} drivers (--num-shards or a SLURM array) cannot share an "
                         "object store output yet (their leases need a shared filesystem). Fix: run one driver per "
                         "output URL, or write to a shared filesystem folder")
    if backend == "ray" and (ray_address or os.environ.get("RAY_ADDRESS")):
        raise UsageError(f"--output '{url}': a Ray cluster of several machines cannot write to an object store "
                         "output yet (its workers stage shards in this machine's folder). Fix: use runtime.backend="
                         "local or an embedded Ray (no runtime.ray_address / RAY_ADDRESS), or write to a shared "
                         "filesystem folder")


def output_folder(output: str | Path, *, num_shards: int = 1) -> Path:
    """The local folder of `--output` without touching it or the store: the path itself, or the staging
    folder of an object store URL (checked for its scheme and package first). The CLI opens its log
    there before `open_output` syncs."""
    text = str(output)
    if not is_url(text):
        return Path(local_path(text))
    check_output_url(text, num_shards=num_shards)
    return staging_dir(text)


def open_output(output: str | Path, *, backend: str = "local", ray_address: str | None = None,
                num_shards: int = 1) -> Path:
    """The local folder a run writes in: `output` itself when it is a local path (checked), or, for an
    object store URL, its node-local staging folder (`io.object_store`), bound to the URL and synced
    from one listing of the store, so resuming sees the store's done shards."""
    text = str(output)
    if not is_url(text):
        out_dir = Path(local_path(text))
        check_output_dir(out_dir)
        return out_dir
    check_output_url(text, backend=backend, ray_address=ray_address, num_shards=num_shards)
    staging = staging_dir(text)
    check_output_dir(staging)
    bind_staging(staging, text)
    store = store_of(staging)
    assert store is not None
    try:
        sync_from_store(staging, store)
    except Exception as exc:  # noqa: BLE001 - any store client's error (no credentials, no bucket, no route)
        raise UsageError(f"--output '{text}': cannot list the object store ({type(exc).__name__}: {exc}). Fix: "
                         "check the URL, the credentials and the endpoint (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                         "...)") from None
    return staging


def check_inputs(inputs: Sequence[str]) -> list[str]:
    """The expanded input URLs; a UsageError for a local input that is a folder or a video file, or for a
    URL whose scheme is unknown or needs a package that is not installed."""
    urls = expand_urls(list(inputs))
    for url in urls:
        if url.startswith("pipe:"):
            continue
        if is_url(url):
            if url_scheme(url) not in WEB_SCHEMES:
                check_url_supported(url, "--input")
            continue
        path = Path(local_path(url))
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
