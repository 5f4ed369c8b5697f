"""Planning a run: the input shards, their output names, those still to do, and what a backend returns."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from rich.console import Console

from vidbatch.config.output_hash import output_config_hash
from vidbatch.config.schema import Config, save_config
from vidbatch.core.atomic import atomic_write
from vidbatch.core.errors import ConfigError, OutputConfigChangedError
from vidbatch.io.input_shards import check_local_urls, expand_urls, shard_stem
from vidbatch.io.shard_check import ShardCheck, check_shard, list_output

log = logging.getLogger("vidbatch")


@dataclass
class RunPlan:
    """The shards of a run, by URL and output stem, and those still to do."""

    urls: list[str]
    stems: list[str]
    todo: list[int] = field(default_factory=list)
    redo: dict[str, str] = field(default_factory=dict)   # stem -> why a shard with a marker is redone
    retry: set[int] = field(default_factory=set)  # done shards in `todo` whose failed samples alone are redone
    overwrite: bool = False                        # done shards are redone (`todo` holds them)


def plan_run(inputs: Sequence[str], out_dir: Path, overwrite: bool, shard_index: int = 0, num_shards: int = 1,
             retry_failed: bool = False, config_hash: str | None = None) -> RunPlan:
    """Expands the inputs, checks them, and picks the shards this invocation must process.

    Every invocation plans every shard still to do (drivers share them through leases,
    `dispatch.work`); with `num_shards` > 1 (SLURM arrays) the order starts with this invocation's
    slice, every `num_shards`-th shard from `shard_index`, then the others'. With `retry_failed`, done
    shards with a failed sample are taken too (in `retry`).

    Without `overwrite`, a shard is skipped only when its done marker reads and its files still have
    the recorded sizes (`io.shard_check`); a damaged one is redone. A done shard whose marker records
    another `config_hash` (the output-shaping config, `config.output_hash`) raises
    OutputConfigChangedError: one output never mixes two configs.
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
    mine = list(range(shard_index, len(urls), num_shards))
    order = mine + [i for i in range(len(urls)) if i % num_shards != shard_index]
    plan = RunPlan(urls=urls, stems=stems, overwrite=overwrite)
    changed: list[tuple[str, str]] = []
    check_one = None if overwrite else _shard_checker(out_dir)
    for i in order:
        if check_one is None:
            plan.todo.append(i)
            continue
        check = check_one(stems[i])
        if check.state == "done":
            recorded = check.marker.config_hash if check.marker is not None else None
            if config_hash is not None and recorded is not None and recorded != config_hash:
                changed.append((stems[i], recorded))
            elif retry_failed and _has_failed_samples(check):
                plan.retry.add(i)
                plan.todo.append(i)
            continue
        plan.todo.append(i)
        if check.state == "damaged":
            plan.redo[stems[i]] = check.problem or "damaged"
    if changed:
        more = f" (and {len(changed) - 1} more shard(s))" if len(changed) > 1 else ""
        raise OutputConfigChangedError(
            f"shard {changed[0][0]}{more} in {out_dir} was made with another output config "
            f"(hash {changed[0][1]}, this run's {config_hash}); rerun with --overwrite to redo it with this "
            "config, or write to another --output")
    return plan


def _shard_checker(out_dir: Path) -> Callable[[str], ShardCheck]:
    """Checks shards against one listing of the output (`io.shard_check.list_output`): a shard without a
    done marker costs nothing, and only the markers there are read (100k shards: no 200k `stat`s). The
    checks are made one at a time, not kept: a marker carries its rows' aggregates."""
    listing = list_output(out_dir)
    with_marker = listing.stems("stats", ".json")

    def check(stem: str) -> ShardCheck:
        if stem not in with_marker:
            return ShardCheck(stem, "absent", problem="no done marker")
        return check_shard(out_dir, stem, listing=listing)

    return check


def _has_failed_samples(check: ShardCheck) -> bool:
    marker = check.marker
    return marker is not None and (marker.samples_failed > 0 or marker.rows_failed > 0)


@dataclass
class RunOutcome:
    """What a backend leaves for the finaliser: the plan, the shards that failed (stem -> cause), the
    `time.perf_counter()` at which the run started, and whether it stopped early for its deadline."""

    plan: RunPlan
    failed: dict[str, str]
    started: float
    stopped: str | None = None   # why the driver stopped starting shards before the deadline (runtime.deadline)
    never_fits: bool = False     # ... because a shard takes longer than the job's whole time


def prepare_run(config: Config, inputs: Sequence[str], out_dir: Path, *, overwrite: bool = False,
                shard_index: int = 0, num_shards: int = 1, console: Console | None = None,
                retry_failed: bool = False) -> RunPlan:
    """Plans the run (raises ConfigError on bad inputs) and writes `OUT/config.yaml`."""
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_run(inputs, out_dir, overwrite, shard_index, num_shards, retry_failed, output_config_hash(config))
    save_config(config, out_dir / "config.yaml")
    # What `vidbatch finalize OUT` summarises: every shard of the job (drivers of one job write the same).
    atomic_write(out_dir / "plan.json", json.dumps({"urls": plan.urls, "stems": plan.stems}, indent=1))
    for stem, why in plan.redo.items():
        log.warning("shard %s is done but damaged (%s): redoing it", stem, why)
        console.print(f"[yellow]shard {stem} redone:[/yellow] {why}", highlight=False)
    if plan.retry:
        console.print(f"{len(plan.retry)} done shard(s) have failed samples: redoing those samples only "
                      "(--retry-failed)")
    skipped = len(plan.urls) - len(plan.todo)
    log.info("run: %d shard(s), %d to do, %d already done (backend %s)", len(plan.urls), len(plan.todo), skipped,
             config.runtime.backend)
    if skipped:
        console.print(f"{skipped} shard(s) already done in {out_dir}: skipped (--overwrite redoes them)")
    return plan


def read_plan_file(out_dir: Path) -> tuple[list[str], list[str]]:
    """The job's shards as the last driver planned them (`OUT/plan.json`): (urls, stems)."""
    path = Path(out_dir) / "plan.json"
    try:
        data = json.loads(path.read_text())
        return list(data["urls"]), list(data["stems"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path} is missing or unreadable ({exc}): is {out_dir} the output folder of a "
                          "vidbatch run?") from exc
