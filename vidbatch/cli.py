"""The `vidbatch` command line.

Exit codes: 0 done; 1 a shard could not be completed (rerun to continue); 2 a usage, input, config or
model mistake, reported in one line naming the cause and the fix (and in OUT/run.log); 3 stopped before
runtime.deadline with shards left (requeue to continue); 130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM,
reported in one line saying how many shards are done.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from vidbatch.core.errors import RunInterrupted, UsageError, VidbatchError, error_line
from vidbatch.core.signals import interrupt_on_signals, stop_code
from vidbatch.core.version import __version__

EXIT_OK, EXIT_SHARD_FAILED, EXIT_USAGE = 0, 1, 2


def _local_folder(output: str, command: str) -> Path:
    """`output` as a local folder for a command that reads or writes one directly; a URL (`s3://...`) is a
    UsageError, never a local folder named `s3:` (only `vidbatch run` writes to object stores)."""
    from vidbatch.core.paths import is_url, local_path

    if is_url(output):
        raise UsageError(f"vidbatch {command} '{output}': works on a local folder, not a URL (only `vidbatch run "
                         "--output` writes to object stores). Fix: copy the output to a local folder first "
                         "(aws s3 sync URL out/) and pass that")
    return Path(local_path(output))


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return default


def _add_overrides(parser: argparse.ArgumentParser, example: str = "edit.steps=20") -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {example} (repeatable; the value is read as YAML)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidbatch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vidbatch {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="edit WebDataset shards of videos (on Ray by default: runtime.backend)")
    run.add_argument("config", nargs="?", help="YAML preset (configs/default.yaml, configs/tiny.yaml); "
                                               "none: the built-in defaults")
    run.add_argument("--input", "-i", action="append", required=True,
                     help="shard path, brace pattern or pipe: URL (repeatable); pack videos into shards with "
                          "`vidbatch shard`")
    run.add_argument("--output", "-o", required=True, help="output folder (created if missing)")
    _add_overrides(run)
    run.add_argument("--overwrite", action="store_true", help="redo shards that are already done")
    run.add_argument("--compare", nargs="+", metavar="METHOD", default=None,
                     help="run every edit once per METHOD, named {edit}-{method} (edit.compare)")
    run.add_argument("--dry-run", action="store_true",
                     help="print the plan (shards, samples, edits, frames, estimated GPU-hours) and exit; "
                          "writes nothing, loads no model")
    run.add_argument("--limit", type=int, default=None, metavar="N",
                     help="process only the first N shards still to do (a quick look; a later run without "
                          "--limit does the rest)")
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
    _add_overrides(demo)
    demo.add_argument("--compare", nargs="*", metavar="METHOD", default=None,
                      help="compare methods on the demo clips (no METHOD: vidtome tokenflow per-frame)")

    shard = sub.add_parser("shard", help="pack a folder of videos into WebDataset shards")
    shard.add_argument("video_dir", help="folder holding the videos (not searched recursively)")
    shard.add_argument("--output", "-o", required=True, help="folder for the shards")
    shard.add_argument("--prompts", help='jsonl of {"file": ..., "prompt": ..., "edits": [...]}')
    shard.add_argument("--config", help="the preset you will run the shards with: warns about videos its edits "
                                        "need a prompt for (default: the built-in edits, which use {prompt})")
    shard.add_argument("--samples-per-shard", type=int, default=100, help="videos per shard (default: 100)")
    shard.add_argument("--prefix", default="part", help="shard file names: PREFIX-000000.tar, ... (default: part)")

    report = sub.add_parser("report", help="rebuild OUT/report.html (and OUT/report_media/) from a run's output")
    report.add_argument("output", help="the run's output folder")
    report.add_argument("--max-videos", type=int, default=50,
                        help="above this many edits, contact sheets replace the videos (default: 50)")

    config = sub.add_parser("config", help="print or check a resolved config (preset + --set overrides)")
    config.add_argument("action", choices=["show", "validate"],
                        help="show: print the resolved config as YAML; validate: check it, exit 2 naming the "
                             "first mistake")
    config.add_argument("config", nargs="?", help="YAML preset; none: the built-in defaults")
    _add_overrides(config)

    verify = sub.add_parser("verify", help="check an output folder: every shard's files against its done marker "
                                           "(sizes and sha256); exit 1 listing damaged or unfinished shards")
    verify.add_argument("output", help="the run's output folder")

    compact = sub.add_parser("compact", help="merge the done work items' output shards into larger ones in "
                                             "OUT/compacted/ (the work items are kept)")
    compact.add_argument("output", help="the run's output folder")
    target = compact.add_mutually_exclusive_group()
    target.add_argument("--target-samples", type=int, default=None, metavar="K",
                        help="close a compacted shard once it holds K samples (whole work items)")
    target.add_argument("--target-mb", type=float, default=None, metavar="X",
                        help="close a compacted shard once it holds X MB (default: 1000)")

    cache = sub.add_parser("cache", help="inspect, verify or prune the inversion cache")
    cache.add_argument("action", choices=["ls", "verify", "prune"],
                       help="ls: list entries; verify: check every entry; prune: evict down to --max-gb")
    cache.add_argument("--dir", help="cache folder (default: $VIDBATCH_CACHE/inversions or ~/.cache/vidbatch/inversions)")
    cache.add_argument("--max-gb", type=float, help="prune: evict least recently used entries down to this size")
    cache.add_argument("--json", action="store_true", help="ls: one JSON object per entry")

    _add_bench(sub)

    tiny = sub.add_parser("make-tiny-model", help="write the built-in tiny random-weight model")
    tiny.add_argument("dir", help="folder to write the diffusers pipeline to")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    return parser


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="time, memory and FLOPs of each editing method on a generated clip")
    bench.add_argument("--model", default="tiny", help="tiny, sd15-random, a diffusers folder or a checkpoint (default: tiny)")
    bench.add_argument("--size", type=int, default=None, help="short side in pixels (default: the model's own, tiny 64, SD 1.5 512)")
    bench.add_argument("--frames", type=int, nargs="+", default=[32], help="frame counts to measure (default: 32)")
    bench.add_argument("--methods", nargs="+", default=None, help="editing methods (default: all)")
    bench.add_argument("--steps", type=int, default=None, help="DDIM steps, inversion and edit (default: edit.steps, 50)")
    bench.add_argument("--control", default=None, help="none, pnp or sdedit (default: edit.control, auto: pnp, none for vid2vid-zero)")
    bench.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                       help="weights' dtype (default: model.dtype, auto: float16 on CUDA, float32 on CPU)")
    bench.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: auto)")
    bench.add_argument("--compile", action="store_true", help="torch.compile the UNet (compile time is reported apart)")
    bench.add_argument("--profile", metavar="DIR", help="profile the timed run; top operators to DIR/METHOD-FRAMES.txt")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads per measurement (default: torch's)")
    bench.add_argument("--repeat", type=int, default=1, help="timed runs per measurement; the fastest counts (default: 1)")
    bench.add_argument("--batch-videos", type=int, nargs="+", default=[1], metavar="N",
                       help="videos edited together, their chunks in one UNet call (runtime.batch_videos); each "
                            "count is measured: N copies of the clip, per-frame figures over all of them (default: 1)")
    _add_overrides(bench, "merge.chunk_size=8")
    bench.add_argument("--in-process", action="store_true",
                       help="measure in this process (CPU peak memory is then only valid for the first pair)")
    bench.add_argument("--json", action="store_true", help="one JSON object per measurement and line")
    bench.add_argument("--markdown", action="store_true", help="print a Markdown table at the end")


def _compare_override(methods: list[str] | None) -> list[str]:
    """`--compare A B` as the `--set` it stands for."""
    return [] if not methods else [f"edit.compare={json.dumps(methods)}"]


def _run(args: argparse.Namespace, console: Console) -> int:
    from vidbatch.api import load_config, plan, run
    from vidbatch.dispatch.logs import log_to_files, setup_logging
    from vidbatch.dispatch.preflight import check_output_dir, output_folder

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    # A SLURM array task's place in its array (0-N, or 0-N:S with a step); --shard-index wins.
    shard_index = args.shard_index if args.shard_index is not None else \
        (_env_int("SLURM_ARRAY_TASK_ID", default=0) - _env_int("SLURM_ARRAY_TASK_MIN", default=0)) \
        // max(1, _env_int("SLURM_ARRAY_TASK_STEP", default=1))
    num_shards = args.num_shards if args.num_shards is not None else \
        _env_int("SLURM_ARRAY_TASK_COUNT", default=1)
    # A local folder, or the staging folder of an object store URL (its scheme and package checked here).
    out_dir = output_folder(args.output, num_shards=num_shards)
    if args.dry_run:
        setup_logging(None, console)
        config = load_config(args.config, args.overrides + _compare_override(args.compare))
        for line in plan(config, args.input, args.output, overwrite=args.overwrite, shard_index=shard_index,
                         num_shards=num_shards, limit=args.limit):
            console.print(line, highlight=False, soft_wrap=True, markup=False)
        return EXIT_OK
    check_output_dir(out_dir)   # before run.log is opened in it
    out_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(out_dir / "run.log", console)
    try:
        config = load_config(args.config, args.overrides + _compare_override(args.compare))
    except VidbatchError as exc:   # the API logs its own errors; this one comes before it
        log_to_files(logging.ERROR, error_line(exc))
        raise
    return run(config, args.input, args.output, overwrite=args.overwrite, retry_failed=args.retry_failed,
               shard_index=shard_index, num_shards=num_shards, limit=args.limit, console=console)


def _demo(args: argparse.Namespace, console: Console) -> int:
    from vidbatch.dispatch.logs import setup_logging
    from vidbatch.dispatch.preflight import check_output_dir
    from vidbatch.tools.demo import DEMO_COMPARE, run_demo

    out_dir = _local_folder(args.output, "demo")
    check_output_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(out_dir / "run.log", console)
    compare = DEMO_COMPARE if args.compare == [] else args.compare
    return run_demo(out_dir, args.overrides + _compare_override(compare), console)


def _shard(args: argparse.Namespace, console: Console) -> int:
    from vidbatch.config.schema import load_config
    from vidbatch.io.packing import list_videos, pack_shards, read_prompts, videos_missing_prompts

    args.output = str(_local_folder(args.output, "shard"))
    edits = load_config(args.config).edits
    prompts = read_prompts(Path(args.prompts)) if args.prompts else {}
    missing = videos_missing_prompts(list_videos(args.video_dir), prompts, edits)
    paths = pack_shards(args.video_dir, args.output, prompts_file=args.prompts,
                        samples_per_shard=args.samples_per_shard, prefix=args.prefix)
    console.print(f"wrote {len(paths)} shard(s) to {args.output}", highlight=False)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        source = f"the edits of {args.config}" if args.config else "the default edits"
        console.print(f"[yellow]warning:[/yellow] {escape(str(len(missing)))} video(s) have no prompt but "
                      f"{escape(source)} use {{prompt}}: {escape(', '.join(missing[:3]))}{escape(more)} will fail. "
                      "Fix: give them a prompt in --prompts, or use edits that write the prompt out",
                      highlight=False, soft_wrap=True)
    return EXIT_OK


def _config(args: argparse.Namespace, console: Console) -> int:
    import yaml

    from vidbatch.config.schema import load_config

    config = load_config(args.config, args.overrides)
    if args.action == "show":
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    else:
        console.print(f"ok: {args.config or 'the built-in defaults'} is a valid config", highlight=False)
    return EXIT_OK


def _cache(args: argparse.Namespace, console: Console) -> int:

    from rich.table import Table

    from vidbatch.engine.inversion_cache import InversionCache, cache_max_bytes, inversion_cache_dir

    if args.action == "prune" and args.max_gb is None:
        raise UsageError("vidbatch cache prune needs --max-gb GB, the size to prune the cache down to "
                         "(e.g. vidbatch cache prune --max-gb 50)")
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
    evicted = cache.prune(cache_max_bytes(args.max_gb))
    console.print(f"evicted {len(evicted)} entries ({sum(e.size_bytes for e in evicted) / 2**30:.3f} GB); "
                  f"{cache.total_bytes() / 2**30:.3f} GB left")
    return EXIT_OK


def _verify(args: argparse.Namespace, console: Console) -> int:
    from vidbatch.io.shard_check import verify_output

    checks = verify_output(_local_folder(args.output, "verify"))
    bad = [c for c in checks if c.state != "done"]
    for check in bad:
        label = "damaged" if check.state == "damaged" else "not done"
        console.print(f"[red]{label}[/red] {check.stem}: {check.problem}", highlight=False)
    damaged = sum(c.state == "damaged" for c in bad)
    console.print(f"{len(checks)} shard(s) checked: {len(checks) - len(bad)} intact, {damaged} damaged, "
                  f"{len(bad) - damaged} not done" + ("; a rerun redoes them" if bad else ""))
    return EXIT_SHARD_FAILED if bad else EXIT_OK


def _report(args: argparse.Namespace, console: Console) -> int:
    from vidbatch.report import write_report

    path = write_report(_local_folder(args.output, "report"), max_videos=args.max_videos, strict=True)
    console.print(f"report written to {path}")
    return EXIT_OK


def _compact(args: argparse.Namespace, console: Console) -> int:
    from vidbatch.tools.compact import compact_output

    result = compact_output(_local_folder(args.output, "compact"), target_samples=args.target_samples,
                            target_mb=args.target_mb)
    samples = sum(p.samples for p in result.parts)
    console.print(f"{len(result.parts)} compacted shard(s), {samples} sample(s) from "
                  f"{sum(len(p.items) for p in result.parts)} work item(s), in {result.folder}", highlight=False)
    if result.left_out:
        console.print(f"[yellow]{len(result.left_out)} work item(s) not done were left out[/yellow] (first: "
                      f"{result.left_out[0]}); rerun the job, then compact again", highlight=False)
    return EXIT_SHARD_FAILED if result.left_out else EXIT_OK


def _finalize(args: argparse.Namespace, console: Console) -> int:
    from vidbatch.report.finalize import finalize_output

    return finalize_output(_local_folder(args.output, "finalize"), console)


def _bench(args: argparse.Namespace, console: Console) -> int:
    from vidbatch.tools.bench import bench_main

    return bench_main(args, console)


def _make_tiny_model(args: argparse.Namespace, console: Console) -> int:
    from vidbatch.models.builtin import make_tiny_model

    console.print(f"tiny model written to {make_tiny_model(args.dir, seed=args.seed)}")
    return EXIT_OK


# Subcommand -> handler. The handlers import what they need themselves: `vidbatch --help` stays fast.
HANDLERS = {"run": _run, "demo": _demo, "shard": _shard, "report": _report, "config": _config, "verify": _verify,
            "finalize": _finalize, "compact": _compact, "cache": _cache, "bench": _bench, "make-tiny-model": _make_tiny_model}


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    return HANDLERS[args.command](args, console)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        with interrupt_on_signals():
            return _dispatch(args, console)
    except VidbatchError as exc:
        label, _, message = error_line(exc).partition(": ")
        console.print(f"[red]{label}:[/red] {escape(message)}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except RunInterrupted as exc:
        console.print(f"[yellow]{escape(str(exc))}[/yellow]", highlight=False, soft_wrap=True)
        return exc.exit_code
    except (KeyboardInterrupt, SystemExit) as exc:   # stopped outside a run (loading, packing, a report)
        code = stop_code(exc)
        if code is None:
            raise
        console.print("[yellow]interrupted: nothing was left half-written; rerun the same command[/yellow]",
                      highlight=False)
        return code


if __name__ == "__main__":
    sys.exit(main())
