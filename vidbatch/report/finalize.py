"""Finishing a run: the summary over every shard, the report, the console table, and the exit code.

Several drivers may share an output (`dispatch.work`): the summary and the report are written once,
by the driver that finds no shard in progress elsewhere when it ends (the last to finish), or on
demand by `vidbatch finalize OUT`. They are built from what is on disk: done markers, and the failure
records every driver leaves for the shards it gave up, so no driver's failures go missing.
"""

from __future__ import annotations

import fcntl
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.console import Console

from vidbatch.config.schema import Config, load_config
from vidbatch.core.atomic import remove_stale_temporaries
from vidbatch.dispatch.leases import recorded_failures, remove_stale_temporaries_by_age
from vidbatch.dispatch.plan import RunOutcome, read_plan_file
from vidbatch.dispatch.work import unfinished_stems
from vidbatch.report.page import write_report
from vidbatch.report.summary import OutputScan, build_summary, print_summary, scan_output, write_summary

IN_PROGRESS = "in progress: "
# The run stopped starting shards before its deadline (runtime.deadline) with work left: requeue it.
EXIT_STOPPED = 3


def finish_run(config: Config, out_dir: Path, outcome: RunOutcome, console: Console) -> int:
    """Writes the summary over every shard of the run unless other drivers are still at work on it;
    returns the exit code (1 if a shard failed)."""
    plan = outcome.plan
    if outcome.stopped is not None:
        _print_failures(outcome.failed, console)
        if outcome.never_fits:
            console.print(f"[red]{outcome.stopped}[/red]", highlight=False)
            return 1
        console.print(f"{outcome.stopped}; requeue or rerun the same command to continue (exit {EXIT_STOPPED})",
                      highlight=False)
        return EXIT_STOPPED
    scan = scan_output(out_dir, plan.stems)   # one pass over the markers: what is done, and the summary's figures
    unfinished = unfinished_stems(out_dir, plan.stems, scan.done)
    elsewhere = {stem: why for stem, why in unfinished.items() if why.startswith(IN_PROGRESS)}
    if elsewhere:
        console.print(f"{len(elsewhere)} shard(s) are still being processed by other drivers of {out_dir}; the last "
                      f"to finish writes summary.json and report.html (or run `vidbatch finalize {out_dir}`)",
                      highlight=False)
        _print_failures(outcome.failed, console)
        return 1 if outcome.failed else 0
    remove_stale_temporaries_by_age(out_dir, config.runtime.lease_s)
    for name in ("summary.json", "config.yaml"):   # left by killed runs (report.html: write_report)
        remove_stale_temporaries(out_dir / name)
    failed = {**recorded_failures(out_dir, plan.stems, scan.done), **unfinished, **outcome.failed}
    return _write(config, out_dir, plan.stems, plan.urls, failed, time.perf_counter() - outcome.started, console,
                  scan)


def finalize_output(out_dir: Path, console: Console) -> int:
    """`vidbatch finalize OUT`: the summary and report of whatever the output holds now. Shards not done
    are listed as failed with why (given up, in progress elsewhere, never processed); exit 1 if any."""
    out_dir = Path(out_dir)
    urls, stems = read_plan_file(out_dir)
    config = load_config(out_dir / "config.yaml")
    scan = scan_output(out_dir, stems)
    unfinished = unfinished_stems(out_dir, stems, scan.done)
    if not any(why.startswith(IN_PROGRESS) for why in unfinished.values()):
        remove_stale_temporaries_by_age(out_dir, config.runtime.lease_s)
    failed = {**recorded_failures(out_dir, stems, scan.done), **unfinished}
    return _write(config, out_dir, stems, urls, failed, scan.span_seconds, console, scan)


@contextmanager
def _one_finaliser_at_a_time(out_dir: Path) -> Iterator[None]:
    """Two drivers finishing together both finalise (the same data); one after the other, because
    replacing `report_media/` is not safe to do twice at once. flock: released if the process dies.
    The lock file lives with the leases (`OUT/leases/finalize.lock`)."""
    (out_dir / "leases").mkdir(parents=True, exist_ok=True)
    with open(out_dir / "leases" / "finalize.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write(config: Config, out_dir: Path, stems: list[str], urls: list[str], failed: dict[str, str],
           wall_seconds: float, console: Console, scan: OutputScan) -> int:
    summary = build_summary(out_dir, config, stems, urls, failed, wall_seconds, scan)
    with _one_finaliser_at_a_time(out_dir):
        write_summary(out_dir, summary)
        write_report(out_dir, summary)
    print_summary(summary, console, out_dir)
    _print_failures(failed, console)
    return 1 if failed else 0


def _print_failures(failed: dict[str, str], console: Console) -> None:
    if failed:
        for stem, cause in failed.items():
            console.print(f"[red]shard {stem} failed:[/red] {cause}", highlight=False)
        console.print(f"{len(failed)} shard(s) could not be completed; rerun the same command to continue.")
