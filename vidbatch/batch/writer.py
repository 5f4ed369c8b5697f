"""A Lightning prediction writer that streams each edited sample into the output shard.

Lightning gives a writer of an IterableDataset empty `batch_indices`, so everything is keyed by the
sample key carried in the prediction itself.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from lightning.pytorch.callbacks import BasePredictionWriter

from vidbatch.core.rows import DoneMarker, SampleRecord
from vidbatch.batch.module import SampleResult
from vidbatch.io.output_shards import CommittedShard, ShardOutput


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ShardPredictionWriter(BasePredictionWriter):
    """Appends every prediction to one `ShardOutput`; `finish` commits it with its done marker."""

    def __init__(self, out_dir: str | Path, url: str, stem: str,
                 on_sample: Callable[[SampleResult], None] | None = None, committed: CommittedShard | None = None):
        """`committed`: the shard's committed output, whose ok samples a reused prediction copies."""
        super().__init__(write_interval="batch")
        self.url = url
        self.committed = committed
        self.output = ShardOutput(out_dir, stem)
        self.on_sample = on_sample
        self.started_at = utc_now()
        self._started = time.perf_counter()
        self._pending: list[SampleResult] = []

    def write_on_batch_end(self, trainer: Any, pl_module: Any, prediction: SampleResult | list[SampleResult],
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        """`prediction`: one sample's result, or a list of consecutive samples' (`runtime.batch_videos`)."""
        # A prediction still encoding in the background (`runtime.finishing`) waits here until the next step
        # is edited: samples are written in order, each once its own work is done.
        self._write_pending()
        queue = list(prediction) if isinstance(prediction, list) else [prediction]
        while queue and queue[0].pending is None:
            self._write(queue.pop(0))
        self._pending = queue

    def _write_pending(self) -> None:
        pending, self._pending = self._pending, []
        for prediction in pending:
            self._write(prediction.finished())

    def _write(self, prediction: SampleResult) -> None:
        if prediction.reused:
            self._copy_committed(prediction)
            return
        record = SampleRecord(prediction.key, prediction.rows)
        members = {**prediction.members, "json": json.dumps(record.to_json()).encode()}
        self.output.add(prediction.key, members, prediction.rows)
        if self.on_sample is not None:
            self.on_sample(prediction)

    def _copy_committed(self, prediction: SampleResult) -> None:
        """A sample kept from the committed shard: its members and rows exactly as they were."""
        if self.committed is None:
            raise ValueError(f"sample {prediction.key} is marked reused but the writer has no committed shard")
        members, rows = self.committed.take(prediction.key)
        self.output.add(prediction.key, members, rows)
        if self.on_sample is not None:
            self.on_sample(SampleResult(key=prediction.key, members=members, rows=rows, reused=True,
                                        frames_edited=sum(row.frames or 0 for row in rows if row.ok)))

    def finish(self, config_hash: str | None = None, fence: Callable[[], None] | None = None) -> DoneMarker:
        """Commits the shard: tar and jsonl under their final names, then the done marker, which records
        `config_hash` (the output-shaping config's, `config.output_hash`). `fence` is checked just before
        the files are published and raises when this attempt lost the shard (`ShardOutput.commit`)."""
        self._write_pending()
        marker = DoneMarker.for_shard(shard=self.url, stem=self.output.stem, keys=self.output.keys,
                                      rows=self.output.rows, seconds=time.perf_counter() - self._started,
                                      started_at=self.started_at, finished_at=utc_now(),
                                      config_hash=config_hash)
        return self.output.commit(marker, fence)

    def abort(self) -> None:
        """Removes the temporaries; a sample still finishing in the background is dropped with them."""
        self._pending = []
        self.output.abort()
