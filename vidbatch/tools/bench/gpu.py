"""`python -m vidbatch.tools.bench.gpu OUT.jsonl`: the GPU measurements of BENCHMARKS.md in one go.

Built for a short loan of a GPU (minutes, no network): `sd15-random` (SD 1.5's architecture, built
locally), 512 px, fp16, PnP, 50+50 steps. In order of importance, each a `vidbatch bench` run whose JSON
rows are appended to OUT.jsonl:

1. per-frame, extended, vidtome and tokenflow at 32 frames (frames/s with inversion, peak memory,
   share of the device's peak);
2. vidtome on short 8-frame clips, 1, 4 and 8 videos per UNet call (`runtime.batch_videos`: the gain
   of filling the device with several short videos);
3. vidtome at 128 frames (peak memory flat from 32 to 128);
4. extended attention over the whole 32-frame clip (the memory reference for vidtome's ≤ 0.35×);
5. vidtome at 32 frames under `torch.compile`;
6. videodirector at 16 frames (tuning and edit seconds per frame).

A step that would not finish before `--budget-s` is skipped and said so; `--dry-run` prints the commands.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["MEASUREMENTS", "commands", "main"]

BASE = ["--model", "sd15-random", "--size", "512", "--steps", "50", "--dtype", "float16", "--json"]
# (what it measures, extra bench arguments, a rough upper bound of its seconds on an H100-class GPU)
MEASUREMENTS = [
    ("methods at 32 frames", ["--control", "pnp", "--frames", "32", "--methods", "per-frame", "extended",
                              "vidtome", "tokenflow"], 240),
    ("short videos batched", ["--control", "pnp", "--frames", "8", "--methods", "vidtome",
                              "--batch-videos", "1", "4", "8"], 180),
    ("vidtome at 128 frames", ["--control", "pnp", "--frames", "128", "--methods", "vidtome"], 150),
    ("extended over the whole clip", ["--control", "pnp", "--frames", "32", "--methods", "extended",
                                      "--set", "merge.chunk_size=32"], 90),
    ("vidtome compiled", ["--control", "pnp", "--frames", "32", "--methods", "vidtome", "--compile"], 240),
    ("videodirector", ["--frames", "16", "--methods", "videodirector"], 300),
]


def commands(python: str = sys.executable) -> list[tuple[str, list[str], int]]:
    """(label, command line, rough seconds) of every measurement, in order."""
    return [(label, [python, "-m", "vidbatch.cli", "bench", *BASE, *extra], seconds)
            for label, extra, seconds in MEASUREMENTS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidbatch.tools.bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="JSON lines file the bench rows are appended to")
    parser.add_argument("--budget-s", type=float, default=540, help="skip what would not finish in this time")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    failed = 0
    for label, command, seconds in commands():
        if args.dry_run:
            print(" ".join(command))
            continue
        left = deadline - time.monotonic()
        if left < seconds / 3:
            print(f"skipped: {label} ({left:.0f} s left)", flush=True)
            continue
        print(f"running: {label}", flush=True)
        with open(args.out, "a") as out:
            try:
                code = subprocess.run(command, stdout=out, timeout=left).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        print(f"done: {label}: {code}", flush=True)
        failed += code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
