"""The `vidbatch` command line. Exit codes: 0 done, 1 a shard could not be completed, 2 usage/config/model error."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console

from vidbatch.errors import ConfigError, ModelLoadError, VidbatchError

EXIT_OK, EXIT_SHARD_FAILED, EXIT_USAGE = 0, 1, 2


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidbatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="edit WebDataset shards of videos")
    run.add_argument("config", nargs="?", help="YAML preset (configs/default.yaml, configs/tiny.yaml)")
    run.add_argument("--input", "-i", action="append", required=True,
                     help="shard path, brace pattern or pipe: URL (repeatable)")
    run.add_argument("--output", "-o", required=True, help="output folder")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set edit.steps=20 (repeatable)")
    run.add_argument("--overwrite", action="store_true", help="redo shards that are already done")
    run.add_argument("--shard-index", type=int, default=None,
                     help="take every --num-shards-th shard from this one (default: $SLURM_ARRAY_TASK_ID or 0)")
    run.add_argument("--num-shards", type=int, default=None,
                     help="number of cooperating invocations (default: $SLURM_ARRAY_TASK_COUNT or 1)")

    demo = sub.add_parser("demo", help="run the whole pipeline on generated clips with the tiny model")
    demo.add_argument("--output", "-o", default="demo-out", help="output folder (default: demo-out)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    shard = sub.add_parser("shard", help="pack a folder of videos into WebDataset shards")
    shard.add_argument("video_dir")
    shard.add_argument("--output", "-o", required=True)
    shard.add_argument("--prompts", help='jsonl of {"file": ..., "prompt": ..., "edits": [...]}')
    shard.add_argument("--samples-per-shard", type=int, default=100)
    shard.add_argument("--prefix", default="part")

    tiny = sub.add_parser("make-tiny-model", help="write the built-in tiny random-weight model")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def _run(args: argparse.Namespace, console: Console) -> int:
    from vidbatch.config import load_config
    from vidbatch.progress import setup_logging
    from vidbatch.runner import run_local

    config = load_config(args.config, args.overrides)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(out_dir / "run.log", console)
    shard_index = args.shard_index if args.shard_index is not None else \
        _env_int("SLURM_ARRAY_TASK_ID", default=0) - _env_int("SLURM_ARRAY_TASK_MIN", default=0)
    num_shards = args.num_shards if args.num_shards is not None else \
        _env_int("SLURM_ARRAY_TASK_COUNT", default=1)
    return run_local(config, args.input, out_dir, overwrite=args.overwrite,
                     shard_index=shard_index, num_shards=num_shards, console=console)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        if args.command == "run":
            return _run(args, console)
        if args.command == "demo":
            from vidbatch.demo import run_demo
            from vidbatch.progress import setup_logging

            out_dir = Path(args.output)
            out_dir.mkdir(parents=True, exist_ok=True)
            setup_logging(out_dir / "run.log", console)
            return run_demo(out_dir, args.overrides, console)
        if args.command == "shard":
            from vidbatch.sharder import pack_shards

            paths = pack_shards(args.video_dir, args.output, prompts_file=args.prompts,
                                samples_per_shard=args.samples_per_shard, prefix=args.prefix)
            console.print(f"wrote {len(paths)} shard(s) to {args.output}")
            return EXIT_OK
        if args.command == "make-tiny-model":
            from vidbatch.tiny_model import make_tiny_model

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
