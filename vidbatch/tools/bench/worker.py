"""One bench measurement in its own process: `python -m vidbatch.tools.bench.worker SPEC.json ROW.json`.

A fresh process per measurement: peak RSS is per process and only grows, and a fresh process cannot
inherit allocator caches or compiled kernels from the previous method.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vidbatch.core.atomic import atomic_write
from vidbatch.core.errors import ModelLoadError
from vidbatch.tools.bench.measure import measure
from vidbatch.tools.bench.spec import BenchSpec


def run_worker(spec_path: str, out_path: str) -> int:
    """Entry of a measurement process: reads a BenchSpec (JSON), writes its row (JSON)."""
    spec = BenchSpec(**json.loads(Path(spec_path).read_text()))
    try:
        row = measure(spec)
    except ModelLoadError as exc:
        row = {"error": str(exc), "error_type": "ModelLoadError"}
    except Exception as exc:  # noqa: BLE001 - reported as the pair's error row
        row = {"error": f"{type(exc).__name__}: {exc}"[:500], "error_type": type(exc).__name__}
    atomic_write(out_path, json.dumps(row))  # the parent reads a row only once it is whole
    return 0


if __name__ == "__main__":
    sys.exit(run_worker(sys.argv[1], sys.argv[2]))
