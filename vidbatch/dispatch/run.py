"""Running a job: planning shards, the `local` backend, and `run`, which picks the backend.

`local` processes every shard in this process, one after another; `ray` (vidbatch/dispatch/ray_backend.py)
hands shards to one worker per GPU. Both resume from done markers and share `prepare_run` (plan,
config.yaml) and `finish_run` (summary, exit code).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import lightning as L
from lightning.fabric.plugins.environments import LightningEnvironment
from rich.console import Console

from vidbatch.config.schema import Config, save_config
from vidbatch.core.rows import DoneMarker
from vidbatch.core.errors import ConfigError
from vidbatch.batch.module import SampleResult, VideoEditModule
from vidbatch.batch.writer import ShardPredictionWriter
from vidbatch.dispatch.progress import RunProgress
from vidbatch.report import write_report
from vidbatch.io.input_shards import check_local_urls, expand_urls, shard_stem
from vidbatch.io.output_shards import is_done, marker_path
from vidbatch.report.summary import build_summary, print_summary, write_summary

log = logging.getLogger("vidbatch")

# Lightning warnings that are expected here and say nothing to a user (regexes matched at the start):
# the writer keys samples by `__key__` (an IterableDataset has no batch indices); a single-process
# predict needs no srun; a deprecation inside Lightning itself.
QUIET_LIGHTNING_WARNINGS = (
    r"Couldn't infer the batch indices",
    r"The `srun` command is available on your system but is not used",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


@dataclass
class RunPlan:
    """The shards of a run, by URL and output stem, and those still to do."""

    urls: list[str]
    stems: list[str]
    todo: list[int] = field(default_factory=list)


def plan_run(inputs: Sequence[str], out_dir: Path, overwrite: bool,
             shard_index: int = 0, num_shards: int = 1) -> RunPlan:
    """Expands the inputs, checks them, and picks the shards this invocation must process.

    With `num_shards` > 1 (SLURM arrays), this invocation takes every `num_shards`-th shard from
    `shard_index`.
    """
    urls = expand_urls(list(inputs))
    if not urls:
        raise ConfigError("no input shards given; pass --input 'data/part-{000000..000009}.tar'")
    missing = check_local_urls(urls)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"input shard '{missing[0]}' not found{more}; check --input")
    stems = [shard_stem(u) for u in urls]
    seen: dict[str, str] = {}
    for url, stem in zip(urls, stems):
        if stem in seen:
            raise ConfigError(f"input shards '{seen[stem]}' and '{url}' would both write shards/{stem}.tar; "
                              "give shards unique file names")
        seen[stem] = url
    if not 0 <= shard_index < num_shards:
        raise ConfigError(f"--shard-index must be in 0..{num_shards - 1}, got {shard_index}")
    mine = range(shard_index, len(urls), num_shards)
    todo = [i for i in mine if overwrite or not is_done(out_dir, stems[i])]
    return RunPlan(urls=urls, stems=stems, todo=todo)


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM raises SystemExit(143) instead of being lost.

    A Lightning Trainer replaces the SIGTERM handler with one that only takes note (for training loops
    to stop between steps) and calls the handler that was there before it: without this one a SLURM
    requeue, `scancel`, `kill` or a Ray worker shutdown would leave the shard running until SIGKILL,
    and SLURM's SIGKILL misses a process whose batch shell has already died. Installed before the
    Trainer starts, so it also covers the first sample, which Lightning decodes before any callback
    runs. The SystemExit unwinds through `process_shard`, which removes the shard's temporaries.
    """
    if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _SigtermState:
    """While `holding`, a SIGTERM under `sigterm_exits` is remembered (`pending`) instead of raised."""

    holding = False
    pending = False


def _exit_on_signal(signum: int, frame: object) -> None:
    if _SigtermState.holding:
        _SigtermState.pending = True
        return
    raise SystemExit(128 + signum)


@contextmanager
def _sigterm_held() -> Iterator[None]:
    """A section a SIGTERM must not cut in two (creating a shard's temporaries and the object that owns
    them); a SIGTERM that came meanwhile is raised at its end, where the owner can clean up."""
    _SigtermState.holding = True
    try:
        yield
    finally:
        _SigtermState.holding = False
        if _SigtermState.pending:
            _SigtermState.pending = False
            raise SystemExit(128 + signal.SIGTERM)


class VideoSink(Protocol):
    """Receives one call per finished video: `RunProgress`, or a Ray worker's relay to the driver."""

    def video_done(self, frames: int, ok: bool) -> None: ...


def process_shard(module: VideoEditModule, url: str, stem: str, out_dir: Path,
                  progress: VideoSink | None = None) -> DoneMarker:
    """Runs the Lightning predict loop over one shard and commits its output; returns the done marker.

    Any exception leaves no file under a final name (the temporaries are removed) and propagates;
    SIGTERM ends it at once the same way (SystemExit 143, see `sigterm_exits`). Safe to run twice at once for the same shard (a Ray retry while the old attempt still runs): each
    attempt writes its own temporaries and renames complete files only (see shard_io.ShardOutput).
    """
    marker_path(out_dir, stem).unlink(missing_ok=True)  # --overwrite: never pair an old marker with new data

    def on_sample(result: SampleResult) -> None:
        if progress is not None:
            progress.video_done(result.frames_edited, all(row.ok for row in result.rows))

    with sigterm_exits(), warnings.catch_warnings():
        for message in QUIET_LIGHTNING_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        writer: ShardPredictionWriter | None = None
        try:
            with _sigterm_held():
                writer = ShardPredictionWriter(out_dir, url, stem, on_sample=on_sample)
            trainer = _trainer(module, writer)
            trainer.predict(module, dataloaders=module.dataloader(url), return_predictions=False)
            return writer.finish()
        except BaseException:  # SIGTERM (SystemExit) included, wherever it lands, the commit too
            if writer is not None:
                writer.abort()
            raise


def _trainer(module: VideoEditModule, writer: ShardPredictionWriter) -> L.Trainer:
    """A Trainer that runs one predict loop on the module's device and hands each result to `writer`."""
    device = module.target_device
    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        # One process, one device: never let Lightning read SLURM_NTASKS/SLURM_PROCID of the job or srun
        # step it happens to run in (SLURM scripts, Ray workers started by srun) as a distributed rank.
        plugins=[LightningEnvironment()],
        callbacks=[writer])


def prepare_run(config: Config, inputs: Sequence[str], out_dir: Path, *, overwrite: bool = False,
                shard_index: int = 0, num_shards: int = 1, console: Console | None = None) -> RunPlan:
    """Plans the run (raises ConfigError on bad inputs) and writes `OUT/config.yaml`."""
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_run(inputs, out_dir, overwrite, shard_index, num_shards)
    save_config(config, out_dir / "config.yaml")
    skipped = len(range(shard_index, len(plan.urls), num_shards)) - len(plan.todo)
    log.info("run: %d shard(s), %d to do, %d already done (backend %s)", len(plan.urls), len(plan.todo), skipped,
             config.runtime.backend)
    if skipped:
        console.print(f"{skipped} shard(s) already done in {out_dir}: skipped (--overwrite redoes them)")
    return plan


def finish_run(config: Config, out_dir: Path, plan: RunPlan, failed: dict[str, str], started: float,
               console: Console) -> int:
    """Writes the summary over every shard of the run and returns the exit code (1 if a shard failed)."""
    summary = build_summary(out_dir, config, plan.stems, plan.urls, failed, time.perf_counter() - started)
    write_summary(out_dir, summary)
    write_report(out_dir, summary)
    print_summary(summary, console, out_dir)
    if failed:
        for stem, cause in failed.items():
            console.print(f"[red]shard {stem} failed:[/red] {cause}", highlight=False)
        console.print(f"{len(failed)} shard(s) could not be completed; rerun the same command to continue.")
        return 1
    return 0


def run(config: Config, inputs: Sequence[str], out_dir: Path, *, overwrite: bool = False,
        shard_index: int = 0, num_shards: int = 1, console: Console | None = None,
        on_event: Callable[[dict], None] | None = None) -> int:
    """Runs the job on `config.runtime.backend`. Returns the exit code: 0 all shards done, 1 a shard failed.

    `on_event` (Ray backend only) sees every worker and driver event (see distributor.py); for monitoring
    and tests. Usage, config and model errors raise (the CLI turns them into exit code 2).
    """
    if config.runtime.backend == "local":
        return run_local(config, inputs, out_dir, overwrite=overwrite, shard_index=shard_index,
                         num_shards=num_shards, console=console)
    if config.runtime.backend == "ray":
        from vidbatch.dispatch.ray_backend import run_ray

        return run_ray(config, inputs, out_dir, overwrite=overwrite, shard_index=shard_index,
                       num_shards=num_shards, console=console, on_event=on_event)
    raise ConfigError(f"config key 'runtime.backend' must be 'ray' or 'local', got {config.runtime.backend!r}")


def run_local(config: Config, inputs: Sequence[str], out_dir: Path, *, overwrite: bool = False,
              shard_index: int = 0, num_shards: int = 1, console: Console | None = None) -> int:
    """Runs the job in this process. Returns the exit code: 0 all shards done, 1 a shard failed.

    Usage, config and model errors raise (the CLI turns them into exit code 2).
    """
    console = console or Console()
    started = time.perf_counter()
    plan = prepare_run(config, inputs, out_dir, overwrite=overwrite, shard_index=shard_index,
                       num_shards=num_shards, console=console)
    failed: dict[str, str] = {}
    if plan.todo:
        module = VideoEditModule(config)
        with RunProgress(len(plan.todo), console, config.runtime.log_every_s) as progress:
            for i in plan.todo:
                url, stem = plan.urls[i], plan.stems[i]
                try:
                    process_shard(module, url, stem, out_dir, progress)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:
                    log.exception("shard %s failed", url)
                    failed[stem] = f"{type(exc).__name__}: {exc}"
                    progress.shard_done(stem, ok=False)
                else:
                    progress.shard_done(stem, ok=True)
    return finish_run(config, out_dir, plan, failed, started, console)
