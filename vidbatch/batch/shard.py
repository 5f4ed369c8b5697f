"""One shard end to end: the Lightning predict loop over its samples, committed atomically, SIGTERM-safe."""

from __future__ import annotations

import signal
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Protocol

import lightning as L
from lightning.fabric.plugins.environments import LightningEnvironment

from vidbatch.batch.module import SampleResult, VideoEditModule
from vidbatch.batch.writer import ShardPredictionWriter
from vidbatch.core.rows import DoneMarker
from vidbatch.io.output_shards import CommittedShard, is_done, marker_path

# Lightning warnings that are expected here and say nothing to a user (regexes matched at the start):
# the writer keys samples by `__key__` (an IterableDataset has no batch indices); a single-process
# predict needs no srun; a deprecation inside Lightning itself.
QUIET_LIGHTNING_WARNINGS = (
    r"Couldn't infer the batch indices",
    r"The `srun` command is available on your system but is not used",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM raises SystemExit(143) instead of being lost.

    A Lightning Trainer replaces the SIGTERM handler with one that only takes note (for training loops
    to stop between steps) and calls the handler that was there before it: without this one a SLURM
    requeue, `scancel`, `kill` or a Ray worker shutdown would leave the shard running until SIGKILL,
    and SLURM's SIGKILL misses a process whose batch shell has already died. Installed before the
    Trainer starts, so it also covers the first sample, which Lightning decodes before any callback
    runs. The SystemExit unwinds through `process_shard`, which removes the shard's temporaries.
    """
    if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _SigtermState:
    """While `holding`, a SIGTERM under `sigterm_exits` is remembered (`pending`) instead of raised."""

    holding = False
    pending = False


def _exit_on_signal(signum: int, frame: object) -> None:
    if _SigtermState.holding:
        _SigtermState.pending = True
        return
    raise SystemExit(128 + signum)


@contextmanager
def _sigterm_held() -> Iterator[None]:
    """A section a SIGTERM must not cut in two (creating a shard's temporaries and the object that owns
    them); a SIGTERM that came meanwhile is raised at its end, where the owner can clean up."""
    _SigtermState.holding = True
    try:
        yield
    finally:
        _SigtermState.holding = False
        if _SigtermState.pending:
            _SigtermState.pending = False
            raise SystemExit(128 + signal.SIGTERM)


class VideoSink(Protocol):
    """Receives one call per finished video: `RunProgress`, or a Ray worker's relay to the driver."""

    def video_done(self, frames: int, ok: bool) -> None: ...


def process_shard(module: VideoEditModule, url: str, stem: str, out_dir: Path,
                  progress: VideoSink | None = None, retry_failed: bool = False) -> DoneMarker:
    """Runs the Lightning predict loop over one shard and commits its output; returns the done marker.

    `retry_failed` (the shard is committed, some samples failed): only the samples with a failed edit
    are edited again; the others are copied unchanged from the committed shard into the new one.

    Any exception leaves no file under a final name (the temporaries are removed) and propagates;
    SIGTERM ends it at once the same way (SystemExit 143, see `sigterm_exits`). Safe to run twice at once for the same shard (a Ray retry while the old attempt still runs): each
    attempt writes its own temporaries and renames complete files only (see shard_io.ShardOutput).
    """
    # Opened before anything is replaced; only with its marker: without one, its files may not be one commit's.
    committed = CommittedShard(out_dir, stem) if retry_failed and is_done(out_dir, stem) else None
    marker_path(out_dir, stem).unlink(missing_ok=True)  # --overwrite: never pair an old marker with new data

    def on_sample(result: SampleResult) -> None:
        if progress is not None:
            progress.video_done(result.frames_edited, all(row.ok for row in result.rows))

    with sigterm_exits(), warnings.catch_warnings():
        for message in QUIET_LIGHTNING_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        writer: ShardPredictionWriter | None = None
        try:
            with _sigterm_held():
                writer = ShardPredictionWriter(out_dir, url, stem, on_sample=on_sample, committed=committed)
            trainer = _trainer(module, writer)
            reuse = frozenset(committed.ok_keys) if committed is not None else frozenset()
            trainer.predict(module, dataloaders=module.dataloader(url, reuse), return_predictions=False)
            return writer.finish()
        except BaseException:  # SIGTERM (SystemExit) included, wherever it lands, the commit too
            if writer is not None:
                writer.abort()
            raise
        finally:
            if committed is not None:
                committed.close()


def _trainer(module: VideoEditModule, writer: ShardPredictionWriter) -> L.Trainer:
    """A Trainer that runs one predict loop on the module's device and hands each result to `writer`."""
    device = module.target_device
    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        # One process, one device: never let Lightning read SLURM_NTASKS/SLURM_PROCID of the job or srun
        # step it happens to run in (SLURM scripts, Ray workers started by srun) as a distributed rank.
        plugins=[LightningEnvironment()],
        callbacks=[writer])
