"""Planning a run: the input shards, their output names, those still to do, and what a backend returns."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rich.console import Console

from vidbatch.config.schema import Config, save_config
from vidbatch.core.errors import ConfigError
from vidbatch.io.input_shards import check_local_urls, expand_urls, shard_stem
from vidbatch.io.output_shards import is_done, read_done_marker

log = logging.getLogger("vidbatch")


@dataclass
class RunPlan:
    """The shards of a run, by URL and output stem, and those still to do."""

    urls: list[str]
    stems: list[str]
    todo: list[int] = field(default_factory=list)
    retry: set[int] = field(default_factory=set)  # done shards in `todo` whose failed samples alone are redone


def plan_run(inputs: Sequence[str], out_dir: Path, overwrite: bool,
             shard_index: int = 0, num_shards: int = 1, retry_failed: bool = False) -> RunPlan:
    """Expands the inputs, checks them, and picks the shards this invocation must process.

    With `num_shards` > 1 (SLURM arrays), this invocation takes every `num_shards`-th shard from
    `shard_index`. With `retry_failed`, done shards with a failed sample are taken too (in `retry`).
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
    retry: set[int] = set()
    if retry_failed and not overwrite:
        retry = {i for i in mine if i not in todo and _has_failed_samples(out_dir, stems[i])}
        todo = sorted({*todo, *retry})
    return RunPlan(urls=urls, stems=stems, todo=todo, retry=retry)


def _has_failed_samples(out_dir: Path, stem: str) -> bool:
    marker = read_done_marker(out_dir, stem)
    return marker is not None and (marker.samples_failed > 0 or marker.rows_failed > 0)


@dataclass
class RunOutcome:
    """What a backend leaves for the finaliser: the plan, the shards that failed (stem -> cause), and the
    `time.perf_counter()` at which the run started."""

    plan: RunPlan
    failed: dict[str, str]
    started: float


def prepare_run(config: Config, inputs: Sequence[str], out_dir: Path, *, overwrite: bool = False,
                shard_index: int = 0, num_shards: int = 1, console: Console | None = None,
                retry_failed: bool = False) -> RunPlan:
    """Plans the run (raises ConfigError on bad inputs) and writes `OUT/config.yaml`."""
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_run(inputs, out_dir, overwrite, shard_index, num_shards, retry_failed)
    save_config(config, out_dir / "config.yaml")
    if plan.retry:
        console.print(f"{len(plan.retry)} done shard(s) have failed samples: redoing those samples only "
                      "(--retry-failed)")
    skipped = len(range(shard_index, len(plan.urls), num_shards)) - len(plan.todo)
    log.info("run: %d shard(s), %d to do, %d already done (backend %s)", len(plan.urls), len(plan.todo), skipped,
             config.runtime.backend)
    if skipped:
        console.print(f"{skipped} shard(s) already done in {out_dir}: skipped (--overwrite redoes them)")
    return plan
