"""The Python API: run a whole job (the shards on the configured backend, then summary and report).

    from pathlib import Path
    from vidbatch import load_config, run

    config = load_config("configs/tiny.yaml", ["edit.steps=20"])
    exit_code = run(config, ["data/part-{000000..000003}.tar"], Path("out"))

`run` checks the inputs, the output folder and the model before any model loads, writes `OUT/run.log`
like the CLI, and raises `vidbatch.core.errors.VidbatchError` subclasses (one-line messages naming the
cause and the fix) for usage, config and model mistakes, and `RunInterrupted` (a KeyboardInterrupt)
when SIGINT or SIGTERM stops it. `plan` tells what a run would do without doing it (`--dry-run`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

from rich.console import Console

from vidbatch.config.schema import Config, load_config
from vidbatch.core.errors import RunInterrupted, VidbatchError, error_line
from vidbatch.core.signals import interrupt_on_signals, stop_code
from vidbatch.dispatch.estimate import describe, estimate_plan
from vidbatch.dispatch.logs import log_to_files, run_log
from vidbatch.dispatch.plan import limit_todo, plan_run, remember_counts
from vidbatch.dispatch.preflight import (
    check_inputs,
    check_model,
    cpu_warning,
    open_output,
    plan_device,
    resolve_threads,
)
from vidbatch.dispatch.run import interruption, run_shards
from vidbatch.io.object_store import store_of, upload_run_files
from vidbatch.report.finalize import finish_run

__all__ = ["load_config", "plan", "run"]

log = logging.getLogger("vidbatch")


def run(config: Config, inputs: Sequence[str], out_dir: str | Path, *, overwrite: bool = False,
        shard_index: int = 0, num_shards: int = 1, limit: int | None = None, console: Console | None = None,
        on_event: Callable[[dict], None] | None = None, retry_failed: bool = False) -> int:
    """Runs the job and writes `OUT/summary.json`, `OUT/report.html` and `OUT/run.log`. Returns the exit
    code: 0 every shard done, 1 a shard failed (rerun the same call to continue).

    `out_dir` is a local folder or an object store URL (`"s3://bucket/out"`, a string): the run then works
    in a node-local staging folder and commits every shard to the store (`vidbatch.io.object_store`);
    the summary, report, config and log are uploaded when it ends.

    `limit`: only the first `limit` shards still to do (a quick look; a later run without it does the
    rest). `retry_failed`: done shards with failed samples are taken too, and only those samples are
    edited again. Several runs may share one output: they take shards through leases (`dispatch.work`).
    Usage, config and model errors raise `VidbatchError` subclasses before any model loads;
    SIGINT/SIGTERM raise `RunInterrupted` ("interrupted: N of M shards done; ..."). Both are also
    written to `OUT/run.log`.
    """
    console = console or Console()
    out_dir = open_output(out_dir, backend=config.runtime.backend, ray_address=config.runtime.ray_address,
                          num_shards=num_shards)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = store_of(out_dir)
    with run_log(out_dir / "run.log"):
        try:
            with interrupt_on_signals():
                inputs, shard_index, num_shards = _prepare(config, inputs, out_dir, overwrite, shard_index,
                                                           num_shards, limit, console)
                outcome = run_shards(config, inputs, out_dir, overwrite=overwrite, shard_index=shard_index,
                                     num_shards=num_shards, console=console, on_event=on_event,
                                     retry_failed=retry_failed)
                code = finish_run(config, out_dir, outcome, console)
        except VidbatchError as exc:
            log_to_files(logging.ERROR, error_line(exc))
            raise
        except (KeyboardInterrupt, SystemExit) as exc:
            code = stop_code(exc)
            if code is None:
                raise
            stopped = exc if isinstance(exc, RunInterrupted) else \
                _interruption(inputs, out_dir, shard_index, num_shards, code, config.runtime.samples_per_task)
            log_to_files(logging.WARNING, str(stopped))
            raise stopped from None
    if store is not None:   # after run.log is closed, so the uploaded log is complete
        upload_run_files(out_dir, store)
    return code


def plan(config: Config, inputs: Sequence[str], out_dir: str | Path, *, overwrite: bool = False, shard_index: int = 0,
         num_shards: int = 1, limit: int | None = None) -> list[str]:
    """What `run` would do, as lines (`vidbatch run --dry-run`): shards, samples, edits, frames, estimated
    GPU-hours (see `vidbatch.dispatch.estimate`). Checks like `run`; writes nothing to the output (an object
    store output is listed into its staging folder) and loads no model."""
    out_dir = open_output(out_dir, backend=config.runtime.backend, ray_address=config.runtime.ray_address,
                          num_shards=num_shards)
    urls = check_inputs(inputs)
    run_plan = plan_run(urls, out_dir, overwrite, shard_index, num_shards,
                        samples_per_task=config.runtime.samples_per_task)
    todo = limit_todo(run_plan, limit) if limit is not None else run_plan.todo
    if todo:
        check_model(config)
    lines = ["dry run: nothing is written and no model is loaded"]
    if limit is not None:
        lines.append(f"--limit {limit}: {len(todo)} of the {len(run_plan.todo)} shard(s) to do" +
                     (" (work items of the first input shards)" if run_plan.ranges else ""))
    lines += describe(estimate_plan(config, run_plan.urls, todo, run_plan.ranges), config)
    lines.append(_plan_line(config))
    warning = _cpu_warning(config)
    if warning:
        lines.append(f"warning: {warning}")
    return lines


def _prepare(config: Config, inputs: Sequence[str], out_dir: Path, overwrite: bool, shard_index: int,
             num_shards: int, limit: int | None, console: Console) -> tuple[list[str], int, int]:
    """The checks before any model loads, and `limit` applied: returns (inputs, shard_index, num_shards)."""
    urls = check_inputs(inputs)
    run_plan = plan_run(urls, out_dir, overwrite, shard_index, num_shards,   # missing shards, bad indices
                        samples_per_task=config.runtime.samples_per_task)
    remember_counts(out_dir, run_plan.counts)   # the backend's plan, next, does not count again
    if run_plan.todo:
        check_model(config)
    if limit is not None:
        # Work items: --limit counts input shards, each run whole (its items still to do).
        chosen = list(dict.fromkeys(run_plan.urls[i] for i in limit_todo(run_plan, limit)))
        left = len(set(run_plan.urls[i] for i in run_plan.todo)) if run_plan.ranges else len(run_plan.todo)
        what = "input shard(s) with work items still to do" if run_plan.ranges else "shard(s) still to do"
        console.print(f"--limit {limit}: running {len(chosen)} of the {left} {what}", highlight=False)
        urls, shard_index, num_shards = chosen, 0, 1
    if run_plan.todo:
        log.info(_plan_line(config))
        warning = _cpu_warning(config)
        if warning:
            log.warning(warning)
    return urls, shard_index, num_shards


def _threads(config: Config) -> int:
    if config.runtime.backend == "ray" and config.runtime.threads == "auto":
        return config.runtime.cpus_per_worker
    return resolve_threads(config)


def _plan_line(config: Config) -> str:
    device = plan_device(config) or "the Ray cluster's devices"
    threads = f", {_threads(config)} torch thread(s) per worker" if device == "cpu" else ""
    return (f"plan: model '{config.model.id}', {config.edit.method} with {config.edit.steps} steps, short side "
            f"{config.video.size} px, backend {config.runtime.backend} on {device}{threads}")


def _cpu_warning(config: Config) -> str | None:
    return cpu_warning(config, _threads(config))


def _interruption(inputs: Sequence[str], out_dir: Path, shard_index: int, num_shards: int,
                  code: int, samples_per_task: int | None = None) -> RunInterrupted:
    try:
        return interruption(inputs, out_dir, shard_index, num_shards, code, samples_per_task)
    except VidbatchError:  # stopped while the inputs were being checked
        return RunInterrupted("interrupted: 0 shards done; rerun the same command to resume", code)
