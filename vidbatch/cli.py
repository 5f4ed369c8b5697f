"""The `vidbatch` command line. Exit codes: 0 done, 1 a shard could not be completed, 2 usage/config/model error,
3 stopped before runtime.deadline with shards left (requeue to continue)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rich.console import Console

from vidbatch.core.errors import ConfigError, ModelLoadError, VidbatchError

EXIT_OK, EXIT_SHARD_FAILED, EXIT_USAGE = 0, 1, 2


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidbatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="edit WebDataset shards of videos (on Ray by default: runtime.backend)")
    run.add_argument("config", nargs="?", help="YAML preset (configs/default.yaml, configs/tiny.yaml)")
    run.add_argument("--input", "-i", action="append", required=True,
                     help="shard path, brace pattern or pipe: URL (repeatable)")
    run.add_argument("--output", "-o", required=True, help="output folder")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set edit.steps=20 (repeatable)")
    run.add_argument("--overwrite", action="store_true", help="redo shards that are already done")
    run.add_argument("--retry-failed", action="store_true",
                     help="also redo the failed samples of done shards (their other samples are kept as they are)")
    run.add_argument("--shard-index", type=int, default=None,
                     help="start with every --num-shards-th shard from this one, then help with the others' "
                          "(default: $SLURM_ARRAY_TASK_ID or 0)")
    run.add_argument("--num-shards", type=int, default=None,
                     help="number of cooperating invocations (default: $SLURM_ARRAY_TASK_COUNT or 1)")

    finalize = sub.add_parser("finalize", help="write OUT/summary.json and OUT/report.html over every shard of an "
                              "output (the last of several drivers does it by itself)")
    finalize.add_argument("output", help="the run's output folder")

    demo = sub.add_parser("demo", help="run the whole pipeline on generated clips with the tiny model")
    demo.add_argument("--output", "-o", default="demo-out", help="output folder (default: demo-out)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    shard = sub.add_parser("shard", help="pack a folder of videos into WebDataset shards")
    shard.add_argument("video_dir")
    shard.add_argument("--output", "-o", required=True)
    shard.add_argument("--prompts", help='jsonl of {"file": ..., "prompt": ..., "edits": [...]}')
    shard.add_argument("--samples-per-shard", type=int, default=100)
    shard.add_argument("--prefix", default="part")

    report = sub.add_parser("report", help="rebuild OUT/report.html (and OUT/report_media/) from a run's output")
    report.add_argument("output", help="the run's output folder")
    report.add_argument("--max-videos", type=int, default=50,
                        help="above this many edits, contact sheets replace the videos (default: 50)")

    cache = sub.add_parser("cache", help="inspect, verify or prune the inversion cache")
    cache.add_argument("action", choices=["ls", "verify", "prune"])
    cache.add_argument("--dir", help="cache folder (default: $VIDBATCH_CACHE/inversions or ~/.cache/vidbatch/inversions)")
    cache.add_argument("--max-gb", type=float, help="prune: evict least recently used entries down to this size")
    cache.add_argument("--json", action="store_true", help="ls: one JSON object per entry")

    bench = sub.add_parser("bench", help="time, memory and FLOPs of each editing method on a generated clip")
    bench.add_argument("--model", default="tiny", help="tiny, sd15-random, a diffusers folder or a checkpoint (default: tiny)")
    bench.add_argument("--size", type=int, default=None, help="short side in pixels (default: the model's own, tiny 64, SD 1.5 512)")
    bench.add_argument("--frames", type=int, nargs="+", default=[32], help="frame counts to measure (default: 32)")
    bench.add_argument("--methods", nargs="+", default=None, help="editing methods (default: all)")
    bench.add_argument("--steps", type=int, default=None, help="DDIM steps, inversion and edit (default: edit.steps, 50)")
    bench.add_argument("--control", default=None, help="none, pnp or sdedit (default: edit.control, auto: pnp, none for vid2vid-zero)")
    bench.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"])
    bench.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: auto)")
    bench.add_argument("--compile", action="store_true", help="torch.compile the UNet (compile time is reported apart)")
    bench.add_argument("--profile", metavar="DIR", help="profile the timed run; top operators to DIR/METHOD-FRAMES.txt")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads per measurement (default: torch's)")
    bench.add_argument("--repeat", type=int, default=1, help="timed runs per measurement; the fastest counts (default: 1)")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set merge.chunk_size=8 (repeatable)")
    bench.add_argument("--in-process", action="store_true",
                       help="measure in this process (CPU peak memory is then only valid for the first pair)")
    bench.add_argument("--json", action="store_true", help="one JSON object per measurement and line")
    bench.add_argument("--markdown", action="store_true", help="print a Markdown table at the end")

    tiny = sub.add_parser("make-tiny-model", help="write the built-in tiny random-weight model")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def _run(args: argparse.Namespace, console: Console) -> int:
    from vidbatch.config.schema import load_config
    from vidbatch.dispatch.progress import setup_logging
    from vidbatch.api import run

    config = load_config(args.config, args.overrides)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(out_dir / "run.log", console)
    # A SLURM array task's place in its array (0-N, or 0-N:S with a step); --shard-index wins.
    shard_index = args.shard_index if args.shard_index is not None else \
        (_env_int("SLURM_ARRAY_TASK_ID", default=0) - _env_int("SLURM_ARRAY_TASK_MIN", default=0)) \
        // max(1, _env_int("SLURM_ARRAY_TASK_STEP", default=1))
    num_shards = args.num_shards if args.num_shards is not None else \
        _env_int("SLURM_ARRAY_TASK_COUNT", default=1)
    return run(config, args.input, out_dir, overwrite=args.overwrite, retry_failed=args.retry_failed,
               shard_index=shard_index, num_shards=num_shards, console=console)


def _cache(args: argparse.Namespace, console: Console) -> int:
    import json

    from rich.table import Table

    from vidbatch.engine.inversion_cache import InversionCache, cache_max_bytes, inversion_cache_dir

    cache = InversionCache(inversion_cache_dir(args.dir))
    if args.action == "ls":
        entries = cache.entries()
        if args.json:
            for entry in entries:
                print(json.dumps(entry.as_dict()))
            return EXIT_OK
        table = Table(title=f"inversion cache {cache.root}")
        for column in ("key", "MB", "hits", "last used"):
            table.add_column(column)
        for entry in entries:
            table.add_row(entry.key[:16], f"{entry.size_bytes / 2**20:.1f}", str(entry.hits),
                          time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used)))
        console.print(table)
        stats = cache.stats()
        console.print(f"{stats['entries']} entries, {stats['bytes'] / 2**30:.3f} GB, {stats['hits']} hits")
        return EXIT_OK
    if args.action == "verify":
        bad = [(entry, error) for entry, error in cache.verify() if error is not None]
        for entry, error in bad:
            console.print(f"[red]bad entry[/red] {entry.path}: {error}", highlight=False)
        console.print(f"{len(cache.entries())} entries checked, {len(bad)} bad")
        return EXIT_SHARD_FAILED if bad else EXIT_OK
    if args.max_gb is None:
        raise ConfigError("vidbatch cache prune needs --max-gb (the size to prune down to)")
    evicted = cache.prune(cache_max_bytes(args.max_gb))
    console.print(f"evicted {len(evicted)} entries ({sum(e.size_bytes for e in evicted) / 2**30:.3f} GB); "
                  f"{cache.total_bytes() / 2**30:.3f} GB left")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        if args.command == "run":
            return _run(args, console)
        if args.command == "demo":
            from vidbatch.tools.demo import run_demo
            from vidbatch.dispatch.progress import setup_logging

            out_dir = Path(args.output)
            out_dir.mkdir(parents=True, exist_ok=True)
            setup_logging(out_dir / "run.log", console)
            return run_demo(out_dir, args.overrides, console)
        if args.command == "shard":
            from vidbatch.io.packing import pack_shards

            paths = pack_shards(args.video_dir, args.output, prompts_file=args.prompts,
                                samples_per_shard=args.samples_per_shard, prefix=args.prefix)
            console.print(f"wrote {len(paths)} shard(s) to {args.output}")
            return EXIT_OK
        if args.command == "finalize":
            from vidbatch.report.finalize import finalize_output

            return finalize_output(Path(args.output), console)
        if args.command == "report":
            from vidbatch.report import write_report

            console.print(f"report written to {write_report(Path(args.output), max_videos=args.max_videos, strict=True)}")
            return EXIT_OK
        if args.command == "cache":
            return _cache(args, console)
        if args.command == "bench":
            from vidbatch.tools.bench import bench_main

            return bench_main(args, console)
        if args.command == "make-tiny-model":
            from vidbatch.models.builtin import make_tiny_model

            console.print(f"tiny model written to {make_tiny_model(args.dir, seed=args.seed)}")
            return EXIT_OK
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}", highlight=False)
        return EXIT_USAGE
    except ModelLoadError as exc:
        console.print(f"[red]model error:[/red] {exc}", highlight=False)
        return EXIT_USAGE
    except VidbatchError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return EXIT_USAGE
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
