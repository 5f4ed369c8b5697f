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
from vidbatch.io.output_shards import ShardOutput


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ShardPredictionWriter(BasePredictionWriter):
    """Appends every prediction to one `ShardOutput`; `finish` commits it with its done marker."""

    def __init__(self, out_dir: str | Path, url: str, stem: str,
                 on_sample: Callable[[SampleResult], None] | None = None):
        super().__init__(write_interval="batch")
        self.url = url
        self.output = ShardOutput(out_dir, stem)
        self.on_sample = on_sample
        self.started_at = utc_now()
        self._started = time.perf_counter()

    def write_on_batch_end(self, trainer: Any, pl_module: Any, prediction: SampleResult, batch_indices: Any,
                           batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        record = SampleRecord(prediction.key, prediction.rows)
        members = {**prediction.members, "json": json.dumps(record.to_json()).encode()}
        self.output.add(prediction.key, members, prediction.rows)
        if self.on_sample is not None:
            self.on_sample(prediction)

    def finish(self, config_hash: str | None = None) -> DoneMarker:
        """Commits the shard: tar and jsonl under their final names, then the done marker, which records
        `config_hash` (the output-shaping config's, `config.output_hash`)."""
        marker = DoneMarker.for_shard(shard=self.url, stem=self.output.stem, keys=self.output.keys,
                                      rows=self.output.rows, seconds=time.perf_counter() - self._started,
                                      started_at=self.started_at, finished_at=utc_now(),
                                      config_hash=config_hash)
        return self.output.commit(marker)

    def abort(self) -> None:
        self.output.abort()
