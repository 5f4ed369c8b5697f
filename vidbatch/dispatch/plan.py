"""Planning a run: the work items (input shards, or ranges of their samples), their output names, those still
to do, and what a backend returns.

Without `runtime.samples_per_task` a work item is an input shard, named after it (`part-000001`). With N,
an input shard of M samples is ceil(M/N) work items (one, empty, for an empty shard), item k holding
samples k*N .. k*N+N-1 and named `{shard stem}-{k:05d}` (`part-000001-00002`). The samples of each shard
are counted once, from its tar headers (`io.input_shards.count_samples`), and the counts kept in
`OUT/plan.json`, so a rerun or another driver of the same output does not count again. Everything after
planning (leases, resume, dispatch, retries, the summary) works per work item: per output stem.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rich.console import Console

from vidbatch.config.output_hash import output_config_hash
from vidbatch.config.schema import Config, save_config
from vidbatch.core.atomic import atomic_write
from vidbatch.core.errors import ConfigError, OutputConfigChangedError
from vidbatch.io.input_shards import SampleRange, check_local_urls, count_samples, expand_urls, shard_stem
from vidbatch.io.tar_stream import TarFormatError
from vidbatch.io.shard_check import ShardCheck, shard_checker

log = logging.getLogger("vidbatch")

# Digits of a work item's number in its output stem (`part-000001-00002`): up to 100,000 items a shard
# keep their names sorted in item order.
ITEM_DIGITS = 5


@dataclass
class RunPlan:
    """The work items of a run, by input URL, output stem and sample range, and those still to do.

    `urls[i]`, `stems[i]`, `ranges[i]` describe item i; `ranges` is empty when every item is a whole input
    shard (no `runtime.samples_per_task`). `counts`: samples per input URL, as counted for the ranges.
    """

    urls: list[str]
    stems: list[str]
    todo: list[int] = field(default_factory=list)
    redo: dict[str, str] = field(default_factory=dict)   # stem -> why a shard with a marker is redone
    retry: set[int] = field(default_factory=set)  # done shards in `todo` whose failed samples alone are redone
    overwrite: bool = False                        # done shards are redone (`todo` holds them)
    ranges: list[SampleRange | None] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    samples_per_task: int | None = None

    def sample_range(self, index: int) -> SampleRange | None:
        """The samples work item `index` edits; None: its whole input shard."""
        return self.ranges[index] if self.ranges else None


def item_stem(stem: str, item: int) -> str:
    """The output stem of work item `item` of the input shard whose stem is `stem`."""
    return f"{stem}-{item:0{ITEM_DIGITS}d}"


def recorded_counts(out_dir: Path) -> dict[str, int]:
    """Samples per input URL as an earlier plan of this output counted them (`OUT/plan.json`); {} if none."""
    try:
        counts = json.loads((Path(out_dir) / "plan.json").read_text()).get("counts") or {}
        return {str(url): n for url, n in counts.items() if type(n) is int and n >= 0}
    except (OSError, ValueError, AttributeError):   # none, or not one vidbatch wrote: count again
        return {}


def count_shards(urls: Sequence[str], known: dict[str, int]) -> dict[str, int]:
    """Samples per shard of `urls`: from `known` where it has them, else counted from the tar headers.
    A shard that cannot be read raises ConfigError naming it (its work items cannot be planned)."""
    counts = {}
    for url in urls:
        if url in known:
            counts[url] = known[url]
            continue
        try:
            counts[url] = count_samples(url)
        except (TarFormatError, OSError, EOFError, ValueError) as exc:
            raise ConfigError(f"cannot count the samples of input shard '{url}' (runtime.samples_per_task "
                              f"needs them): {type(exc).__name__}: {exc}; repair the shard or leave it out of "
                              "--input") from exc
    return counts


def work_items(urls: Sequence[str], samples_per_task: int | None, counts: dict[str, int]
               ) -> tuple[list[str], list[str], list[SampleRange | None]]:
    """(input URL, output stem, sample range) of every work item, in input order (ranges empty without
    `samples_per_task`). A shard of M samples gives ceil(M/N) items; an empty one, one empty item, so it
    still has an output (as without samples_per_task)."""
    if samples_per_task is None:
        return list(urls), [shard_stem(u) for u in urls], []
    item_urls, stems, ranges = [], [], []
    for url in urls:
        total, stem = counts[url], shard_stem(url)
        for k in range(max(1, -(-total // samples_per_task))):
            first = k * samples_per_task
            item_urls.append(url)
            stems.append(item_stem(stem, k))
            ranges.append(SampleRange(first, max(0, min(samples_per_task, total - first))))
    return item_urls, stems, ranges


def plan_run(inputs: Sequence[str], out_dir: Path, overwrite: bool, shard_index: int = 0, num_shards: int = 1,
             retry_failed: bool = False, config_hash: str | None = None, samples_per_task: int | None = None
             ) -> RunPlan:
    """Expands the inputs, checks them, and picks the work items this invocation must process.

    With `samples_per_task` the shards' samples are counted first (the counts in `OUT/plan.json` are
    trusted: a shard rewritten in place under the same URL needs a new output, or that file removed), and
    every shard below stands for a work item.

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
    if samples_per_task is not None and (isinstance(samples_per_task, bool) or samples_per_task < 1):
        raise ConfigError(f"config key 'runtime.samples_per_task' must be null or an integer >= 1, "
                          f"got {samples_per_task!r}")
    counts = count_shards(urls, recorded_counts(out_dir)) if samples_per_task else {}
    urls, stems, ranges = work_items(urls, samples_per_task, counts)
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
    plan = RunPlan(urls=urls, stems=stems, overwrite=overwrite, ranges=ranges, counts=counts,
                   samples_per_task=samples_per_task)
    changed: list[tuple[str, str]] = []
    check_one = None if overwrite else shard_checker(out_dir)
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


def limit_todo(plan: RunPlan, limit: int) -> list[int]:
    """The work items to do of the first `limit` units still to do (`--limit`): work items when they are
    whole shards, else input shards (every item of theirs still to do)."""
    if not plan.ranges:
        return plan.todo[:limit]
    chosen = set(list(dict.fromkeys(plan.urls[i] for i in plan.todo))[:limit])
    return [i for i in plan.todo if plan.urls[i] in chosen]


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
    plan = plan_run(inputs, out_dir, overwrite, shard_index, num_shards, retry_failed, output_config_hash(config),
                    config.runtime.samples_per_task)
    save_config(config, out_dir / "config.yaml")
    # What `vidbatch finalize OUT` summarises: every shard of the job (drivers of one job write the same).
    atomic_write(out_dir / "plan.json", json.dumps(plan_record(plan, recorded_counts(out_dir)), indent=1))
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


def plan_record(plan: RunPlan, counts: dict[str, int] | None = None) -> dict:
    """What `OUT/plan.json` holds: the work items (urls, stems, and with samples_per_task their ranges as
    [first, count]) and the shards' sample counts (`counts`, earlier ones kept: a `--limit` run plans a
    few shards), reused by the next plan of this output."""
    record: dict = {"urls": plan.urls, "stems": plan.stems}
    if plan.samples_per_task is not None:
        record["samples_per_task"] = plan.samples_per_task
        record["ranges"] = [[r.first, r.count] if r is not None else None for r in plan.ranges]
    if plan.counts or counts:
        record["counts"] = {**(counts or {}), **plan.counts}
    return record


def remember_counts(out_dir: Path, counts: dict[str, int]) -> None:
    """Adds `counts` (samples per input URL) to `OUT/plan.json`, so the plan that follows this one (the
    checks before a run, then the backend's) counts each shard once."""
    if not counts:
        return
    path = Path(out_dir) / "plan.json"
    try:
        record = json.loads(path.read_text())
        record = record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        record = {}
    record["counts"] = {**recorded_counts(out_dir), **counts}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(record, indent=1))


def read_plan_file(out_dir: Path) -> tuple[list[str], list[str]]:
    """The job's shards as the last driver planned them (`OUT/plan.json`): (urls, stems)."""
    path = Path(out_dir) / "plan.json"
    try:
        data = json.loads(path.read_text())
        return list(data["urls"]), list(data["stems"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path} is missing or unreadable ({exc}): is {out_dir} the output folder of a "
                          "vidbatch run?") from exc
