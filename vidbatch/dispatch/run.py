"""Running the shards of a job on the configured backend: `local` (this process) or `ray` (one worker per GPU).

Both resume from done markers and plan the same way (`dispatch.plan`); what is left to do after them,
the summary and the report, is the finaliser's (`vidbatch.report.finalize`), and `vidbatch.api.run`
does both. SIGINT and SIGTERM stop either backend the same way (`vidbatch.core.signals`): the shard in
progress is abandoned without a trace, finished shards stay done, and `RunInterrupted` says how many.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from rich.console import Console

from vidbatch.config.schema import Config
from vidbatch.core.errors import ConfigError, RunInterrupted
from vidbatch.core.signals import interrupt_on_signals, stop_code
from vidbatch.dispatch.local import run_local
from vidbatch.dispatch.plan import RunOutcome, plan_run
from vidbatch.dispatch.ray_backend import run_ray


def run_shards(config: Config, inputs: Sequence[str], out_dir: Path, *, overwrite: bool = False,
               shard_index: int = 0, num_shards: int = 1, console: Console | None = None,
               on_event: Callable[[dict], None] | None = None, retry_failed: bool = False) -> RunOutcome:
    """Processes the shards still to do on `config.runtime.backend`; returns what the finaliser needs.

    `on_event` (Ray backend only) sees every worker and driver event (see ray_backend.py); for monitoring
    and tests. `retry_failed`: done shards with failed samples are taken too, and only those samples are
    edited again. Usage, config and model errors raise (the CLI turns them into exit code 2); SIGINT/SIGTERM
    (or a KeyboardInterrupt) raise `RunInterrupted` with the count of shards done.
    """
    if config.runtime.backend not in ("local", "ray"):
        raise ConfigError(f"config key 'runtime.backend' must be 'ray' or 'local', got {config.runtime.backend!r}")
    try:
        with interrupt_on_signals():
            if config.runtime.backend == "local":
                return run_local(config, inputs, out_dir, overwrite=overwrite, shard_index=shard_index,
                                 num_shards=num_shards, console=console, retry_failed=retry_failed)
            return run_ray(config, inputs, out_dir, overwrite=overwrite, shard_index=shard_index,
                           num_shards=num_shards, console=console, on_event=on_event, retry_failed=retry_failed)
    except (KeyboardInterrupt, SystemExit) as exc:
        code = stop_code(exc)
        if code is None or isinstance(exc, RunInterrupted):
            raise
        raise interruption(inputs, out_dir, shard_index, num_shards, code,
                           config.runtime.samples_per_task) from None


def interruption(inputs: Sequence[str], out_dir: Path, shard_index: int, num_shards: int,
                 code: int, samples_per_task: int | None = None) -> RunInterrupted:
    """The one-line account of a stopped run, counted from the done markers on disk (the truth); with
    `samples_per_task`, in work items (their counts from `OUT/plan.json`)."""
    plan = plan_run(inputs, Path(out_dir), False, shard_index, num_shards, samples_per_task=samples_per_task)
    total = len(plan.urls)   # drivers share every shard of the job (leases), so all count
    done = total - len(plan.todo)
    return RunInterrupted(f"interrupted: {done} of {total} shards done; rerun the same command to resume", code)
