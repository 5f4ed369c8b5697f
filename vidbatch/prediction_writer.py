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

from vidbatch.lightning_module import SampleResult
from vidbatch.shard_io import ShardOutput


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
        record = {"key": prediction.key, "rows": prediction.rows}
        members = {**prediction.members, "json": json.dumps(record).encode()}
        self.output.add(prediction.key, members, prediction.rows)
        if self.on_sample is not None:
            self.on_sample(prediction)

    def finish(self) -> dict:
        """Commits the shard: tar and jsonl under their final names, then the done marker."""
        rows = self.output.rows
        failed_keys = {r["key"] for r in rows if r["status"] != "ok"}
        marker = {
            "shard": self.url,
            "stem": self.output.stem,
            "samples": len(self.output.keys),
            "samples_ok": len(self.output.keys) - len(failed_keys),
            "samples_failed": len(failed_keys),
            "rows_ok": sum(r["status"] == "ok" for r in rows),
            "rows_failed": sum(r["status"] != "ok" for r in rows),
            "frames": sum(r["frames"] or 0 for r in rows if r["status"] == "ok"),
            "seconds": round(time.perf_counter() - self._started, 3),
            "started_at": self.started_at,
            "finished_at": utc_now(),
        }
        return self.output.commit(marker)

    def abort(self) -> None:
        self.output.abort()
