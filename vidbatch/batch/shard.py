"""One shard end to end: the Lightning predict loop over its samples, committed atomically, safe against
SIGINT and SIGTERM (see `vidbatch.core.signals`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Protocol

import lightning as L
from lightning.fabric.plugins.environments import LightningEnvironment

from vidbatch.batch.module import SampleResult, VideoEditModule
from vidbatch.batch.writer import ShardPredictionWriter
from vidbatch.config.output_hash import output_config_hash
from vidbatch.core.rows import DoneMarker
from vidbatch.core.signals import exit_on_signals, signals_held
from vidbatch.io.input_shards import SampleRange
from vidbatch.io.output_shards import CommittedShard, is_done, marker_path

# Lightning warnings that are expected here and say nothing to a user (regexes matched at the start):
# the writer keys samples by `__key__` (an IterableDataset has no batch indices); a single-process
# predict needs no srun; a deprecation inside Lightning itself.
QUIET_LIGHTNING_WARNINGS = (
    r"Couldn't infer the batch indices",
    r"The `srun` command is available on your system but is not used",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


class VideoSink(Protocol):
    """Receives one call per finished video and one per inversion/denoising step of the current video:
    `RunProgress`, or a Ray worker's relay to the driver."""

    def video_done(self, frames: int, ok: bool) -> None: ...

    def video_step(self, key: str, stage: str, done: int, total: int) -> None: ...


def process_shard(module: VideoEditModule, url: str, stem: str, out_dir: Path,
                  progress: VideoSink | None = None, retry_failed: bool = False,
                  fence: Callable[[], None] | None = None, sample_range: SampleRange | None = None) -> DoneMarker:
    """Runs the Lightning predict loop over one shard and commits its output; returns the done marker.

    `sample_range`: a work item (`runtime.samples_per_task`): only those samples of the shard are read and
    edited, into the output shard `stem`; None: the whole shard.

    `retry_failed` (the shard is committed, some samples failed): only the samples with a failed edit
    are edited again; the others are copied unchanged from the committed shard into the new one.

    `fence` (the dispatcher's lease check, `dispatch.leases.lease_fence`) is called before anything is
    touched (an attempt that starts late must not remove another's marker) and again just before the
    output is published; when it raises (`core.faults.LeaseLost`: another driver or a later attempt owns
    the shard now) nothing is published, the temporaries are removed and the exception propagates.

    Any exception leaves no file under a final name (the temporaries are removed) and propagates;
    SIGINT and SIGTERM end it at once the same way (SystemExit 130 / 143, see `vidbatch.core.signals`; installed
    before the Trainer starts, so they also cover the first sample, which Lightning decodes before any callback
    runs). Safe to run twice at once for the same shard (a Ray retry while the old attempt still runs): each
    attempt writes its own temporaries and renames complete files only (see shard_io.ShardOutput).
    """
    if fence is not None:
        fence()
    # Opened before anything is replaced; only with its marker: without one, its files may not be one commit's.
    committed = CommittedShard(out_dir, stem) if retry_failed and is_done(out_dir, stem) else None
    marker_path(out_dir, stem).unlink(missing_ok=True)  # --overwrite: never pair an old marker with new data

    def on_sample(result: SampleResult) -> None:
        if progress is not None:
            progress.video_done(result.frames_edited, all(row.ok for row in result.rows))

    with exit_on_signals(), warnings.catch_warnings():
        for message in QUIET_LIGHTNING_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        writer: ShardPredictionWriter | None = None
        try:
            with signals_held():
                writer = ShardPredictionWriter(out_dir, url, stem, on_sample=on_sample, committed=committed)
            object.__setattr__(module, "step_sink", getattr(progress, "video_step", None))
            trainer = _trainer(module, writer)
            reuse = frozenset(committed.ok_keys) if committed is not None else frozenset()
            trainer.predict(module, dataloaders=module.dataloader(url, reuse, sample_range), return_predictions=False)
            return writer.finish(output_config_hash(module.config), fence)
        except BaseException:  # SIGINT/SIGTERM (SystemExit) included, wherever it lands, the commit too
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
