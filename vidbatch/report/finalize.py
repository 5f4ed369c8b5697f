"""Finishing a run: the summary over every shard, the report, the console table, and the exit code."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from vidbatch.config.schema import Config
from vidbatch.core.atomic import remove_stale_temporaries
from vidbatch.dispatch.plan import RunOutcome
from vidbatch.report.page import write_report
from vidbatch.report.summary import build_summary, print_summary, write_summary


def finish_run(config: Config, out_dir: Path, outcome: RunOutcome, console: Console) -> int:
    """Writes the summary over every shard of the run and returns the exit code (1 if a shard failed)."""
    plan, failed = outcome.plan, outcome.failed
    for name in ("summary.json", "config.yaml"):   # left by killed runs (report.html: write_report)
        remove_stale_temporaries(out_dir / name)
    summary = build_summary(out_dir, config, plan.stems, plan.urls, failed, time.perf_counter() - outcome.started)
    write_summary(out_dir, summary)
    write_report(out_dir, summary)
    print_summary(summary, console, out_dir)
    if failed:
        for stem, cause in failed.items():
            console.print(f"[red]shard {stem} failed:[/red] {cause}", highlight=False)
        console.print(f"{len(failed)} shard(s) could not be completed; rerun the same command to continue.")
        return 1
    return 0
