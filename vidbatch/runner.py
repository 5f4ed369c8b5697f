"""The `local` backend: every shard in this process, one after another, with resume from done markers."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import lightning as L
from rich.console import Console

from vidbatch.config import Config, save_config
from vidbatch.errors import ConfigError
from vidbatch.lightning_module import SampleResult, VideoEditModule
from vidbatch.prediction_writer import ShardPredictionWriter
from vidbatch.progress import RunProgress
from vidbatch.samples import check_local_urls, expand_urls, shard_stem
from vidbatch.shard_io import is_done, marker_path
from vidbatch.summary import build_summary, print_summary, write_summary

log = logging.getLogger("vidbatch")


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


def process_shard(module: VideoEditModule, url: str, stem: str, out_dir: Path,
                  progress: RunProgress | None = None) -> dict:
    """Runs the Lightning predict loop over one shard and commits its output; returns the done marker.

    Any exception leaves no file under a final name (the temporaries are removed) and propagates.
    """
    marker_path(out_dir, stem).unlink(missing_ok=True)  # --overwrite: never pair an old marker with new data

    def on_sample(result: SampleResult) -> None:
        if progress is not None:
            progress.video_done(result.frames_edited, all(r["status"] == "ok" for r in result.rows))

    writer = ShardPredictionWriter(out_dir, url, stem, on_sample=on_sample)
    device = module.target_device
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[writer])
    try:
        trainer.predict(module, dataloaders=module.dataloader(url), return_predictions=False)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


def run_local(config: Config, inputs: Sequence[str], out_dir: Path, *, overwrite: bool = False,
              shard_index: int = 0, num_shards: int = 1, console: Console | None = None) -> int:
    """Runs the job in this process. Returns the exit code: 0 all shards done, 1 a shard failed.

    Usage, config and model errors raise (the CLI turns them into exit code 2).
    """
    console = console or Console()
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_run(inputs, out_dir, overwrite, shard_index, num_shards)
    save_config(config, out_dir / "config.yaml")
    skipped = len(range(shard_index, len(plan.urls), num_shards)) - len(plan.todo)
    log.info("run: %d shard(s), %d to do, %d already done", len(plan.urls), len(plan.todo), skipped)
    if skipped:
        console.print(f"{skipped} shard(s) already done in {out_dir}: skipped (--overwrite redoes them)")
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
    summary = build_summary(out_dir, config, plan.stems, plan.urls, failed, time.perf_counter() - started)
    write_summary(out_dir, summary)
    print_summary(summary, console, out_dir)
    if failed:
        for stem, cause in failed.items():
            console.print(f"[red]shard {stem} failed:[/red] {cause}")
        console.print(f"{len(failed)} shard(s) could not be completed; rerun the same command to continue.")
        return 1
    return 0
