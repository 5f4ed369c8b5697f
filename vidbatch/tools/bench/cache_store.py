"""Time of an inversion cache store with a size limit, at many entries (for BENCHMARKS.md).

Fills a cache folder with `--entries` small synthetic entries (once; a folder already holding them is
reused), then times `--stores` stores into it with `max_bytes` set to the size it holds, so that every
store also evicts the least recently used entry. Prints one JSON object: the first store (which may
build the size index) and the median / 90th percentile / mean of the others, in milliseconds.

Uses only `InversionCache(root, max_bytes).store(key, tensors)`, so the same file measures older
versions of the cache too: run it with `PYTHONPATH` pointing at another checkout.

    python vidbatch/tools/bench/cache_store.py /tmp/cache-bench --entries 10000 --stores 200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import torch

from vidbatch.engine.inversion_cache import InversionCache


def _key(i: int, tag: str) -> str:
    return hashlib.blake2b(f"{tag}:{i}".encode(), digest_size=32).hexdigest()


def _tensors(i: int) -> dict[str, torch.Tensor]:
    return {"latents": torch.full((4, 8, 8), float(i % 1000))}   # ~1.3 KB entries


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="cache folder (filled on first use)")
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--stores", type=int, default=200)
    args = parser.parse_args(argv)

    filler = InversionCache(args.root)
    have = sum(1 for _ in args.root.glob("??/*.safetensors"))
    for i in range(have, args.entries):
        filler.store(_key(i, "fill"), _tensors(i))
    total = sum(p.stat().st_size for p in args.root.glob("??/*.safetensors"))

    cache = InversionCache(args.root, max_bytes=total)
    times = []
    run = f"run{time.time_ns()}"   # new keys every run: each store adds an entry and evicts one
    for i in range(args.stores):
        start = time.perf_counter()
        cache.store(_key(i, run), _tensors(i))
        times.append((time.perf_counter() - start) * 1e3)
    rest = sorted(times[1:])
    result = {
        "entries": sum(1 for _ in args.root.glob("??/*.safetensors")),
        "stores": args.stores,
        "first_store_ms": round(times[0], 2),
        "median_ms": round(statistics.median(rest), 2),
        "p90_ms": round(rest[int(0.9 * (len(rest) - 1))], 2),
        "mean_ms": round(statistics.fmean(rest), 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
