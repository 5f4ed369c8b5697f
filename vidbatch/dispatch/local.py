"""The `local` backend: every shard in this process, one after another, with one loaded model."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console

from vidbatch.batch.module import VideoEditModule
from vidbatch.batch.shard import process_shard
from vidbatch.config.schema import Config
from vidbatch.dispatch.plan import RunOutcome, prepare_run
from vidbatch.dispatch.progress import RunProgress

log = logging.getLogger("vidbatch")


def run_local(config: Config, inputs: Sequence[str], out_dir: Path, *, overwrite: bool = False,
              shard_index: int = 0, num_shards: int = 1, console: Console | None = None,
              retry_failed: bool = False) -> RunOutcome:
    """Runs the job in this process, shard after shard; a shard that raises is recorded as failed.

    Usage, config and model errors raise (the CLI turns them into exit code 2).
    """
    console = console or Console()
    started = time.perf_counter()
    plan = prepare_run(config, inputs, out_dir, overwrite=overwrite, shard_index=shard_index,
                       num_shards=num_shards, console=console, retry_failed=retry_failed)
    failed: dict[str, str] = {}
    if plan.todo:
        module = VideoEditModule(config)
        with RunProgress(len(plan.todo), console, config.runtime.log_every_s) as progress:
            for i in plan.todo:
                url, stem = plan.urls[i], plan.stems[i]
                try:
                    process_shard(module, url, stem, out_dir, progress, retry_failed=i in plan.retry)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:
                    log.exception("shard %s failed", url)
                    failed[stem] = f"{type(exc).__name__}: {exc}"
                    progress.shard_done(stem, ok=False)
                else:
                    progress.shard_done(stem, ok=True)
    return RunOutcome(plan=plan, failed=failed, started=started)
