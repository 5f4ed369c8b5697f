"""The Python API: run a whole job (the shards on the configured backend, then summary and report).

    from vidbatch.api import load_config, run

    config = load_config("configs/tiny.yaml", ["edit.steps=20"])
    exit_code = run(config, ["data/part-{000000..000003}.tar"], Path("out"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from rich.console import Console

from vidbatch.config.schema import Config, load_config
from vidbatch.dispatch.run import run_shards
from vidbatch.report.finalize import finish_run

__all__ = ["load_config", "run"]


def run(config: Config, inputs: Sequence[str], out_dir: Path, *, overwrite: bool = False,
        shard_index: int = 0, num_shards: int = 1, console: Console | None = None,
        on_event: Callable[[dict], None] | None = None, retry_failed: bool = False) -> int:
    """Runs the job and writes `OUT/summary.json` and `OUT/report.html`. Returns the exit code: 0 every
    shard done, 1 a shard failed (rerun the same call to continue). Usage, config and model errors raise
    `vidbatch.core.errors.VidbatchError` subclasses."""
    console = console or Console()
    outcome = run_shards(config, inputs, Path(out_dir), overwrite=overwrite, shard_index=shard_index,
                         num_shards=num_shards, console=console, on_event=on_event, retry_failed=retry_failed)
    return finish_run(config, Path(out_dir), outcome, console)
