"""The `local` backend: shard after shard in this process, with one loaded model; shards are claimed
through leases, so several local drivers (SLURM array tasks) can share one output (`dispatch.work`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console

from vidbatch.batch.module import VideoEditModule
from vidbatch.batch.shard import process_shard
from vidbatch.config.schema import Config
from vidbatch.core.faults import LeaseLost
from vidbatch.dispatch.estimate import known_video_total
from vidbatch.dispatch.leases import LeaseBook, new_run_id
from vidbatch.dispatch.plan import RunOutcome, prepare_run
from vidbatch.dispatch.preflight import apply_threads, resolve_threads
from vidbatch.dispatch.progress import RunProgress
from vidbatch.dispatch.work import SharedWork, renewing

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
        threads = resolve_threads(config, local_workers=1)
        apply_threads(threads)  # before the model loads: torch's thread pool starts with its first op
        log.info("local backend: 1 worker, %d torch thread(s)", threads)
        module = VideoEditModule(config)
        book = LeaseBook(out_dir, new_run_id(), config.runtime.lease_s)  # shards shared with other drivers
        work = SharedWork(plan, out_dir, book, config.runtime.deadline)
        with RunProgress(len(plan.todo), console, config.runtime.log_every_s,
                         total_videos=known_video_total(plan.urls, plan.todo, plan.ranges)) as progress, renewing(book):
            try:
                for i in work.claimed():
                    url, stem = plan.urls[i], plan.stems[i]
                    try:
                        process_shard(module, url, stem, out_dir, progress, retry_failed=i in plan.retry,
                                      fence=book.fence(stem), sample_range=plan.sample_range(i))
                    except KeyboardInterrupt:
                        raise
                    except LeaseLost as exc:  # published nothing; the shard is another driver's now
                        progress.shard_lost(stem, str(exc))
                        if not work.lost(i, str(exc)):
                            failed[stem] = str(exc)
                            progress.shard_done(stem, ok=False)
                    except Exception as exc:
                        log.exception("shard %s failed", url)
                        failed[stem] = f"{type(exc).__name__}: {exc}"
                        work.failed(i, failed[stem])
                        progress.shard_done(stem, ok=False)
                    else:
                        work.finished(i)
                        progress.shard_done(stem, ok=True)
            finally:
                book.release_all()
        return RunOutcome(plan=plan, failed=failed, started=started, stopped=work.stopped, never_fits=work.never_fits)
    return RunOutcome(plan=plan, failed=failed, started=started)
