"""The driver at scale: plan, summary and report time and peak memory on a synthetic output.

    python -m vidbatch.tools.bench.driver --items 100000 --rows-per-item 10 OUT

writes OUT (unless it holds a synthetic output of that size already): per work item a done marker and a
stats jsonl of `--rows-per-item` rows (random metrics, times and memory; every `--fail-every`-th row
failed, with one of a few causes), `plan.json` and `config.yaml`; no videos. Then it times, each in a
fresh Python process (peak resident set: the stage's, see `_STAGE`): planning the inputs into an empty
folder (`plan-empty`: brace expansion and the listing) and a rerun of them (`plan`: every done marker
read and its files checked), the summary (`build_summary`) and
the report (`write_report`). `--pythonpath` runs the stages with another checkout's vidbatch (its public
`plan_run`, `build_summary` and `write_report`), to compare with an earlier release; markers without
aggregates (`--markers old`) are what such a release reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from vidbatch.config.output_hash import output_config_hash
from vidbatch.config.schema import load_config, save_config
from vidbatch.core.atomic import atomic_write
from vidbatch.core.rows import STATUS_OK, DoneMarker, EditRow

INPUT_PATTERN = "pipe:cat data/part-{{000000..{last:06d}}}.tar"
CAUSES = ("cannot decode {key}.mp4: video has 1 frame(s), at least 2 needed", "no prompt for {key}",
          "CUDA out of memory while editing {key} (tried to allocate 2.5 GiB)")
EDITS = ("ink", "watercolor")


def synthetic_row(rng: random.Random, key: str, edit: str, failed: bool, cause: int = 0) -> EditRow:
    """A row as a worker writes it: times per stage, metrics, peak memory; or a failure with its cause."""
    row = EditRow.pending(key, edit, metric_names=("warp_error", "interp_psnr", "clip_text", "clip_frame", "clip_dir"),
                          frames=16, width=512, height=512, fps=8.0)
    if failed:
        row.error = CAUSES[cause % len(CAUSES)].format(key=key)
        return row
    row.status = STATUS_OK
    row.prompt = f"a video, {edit}"
    row.method = "vidtome"
    row.inversion_cache = "off"
    row.seconds.update(decode=rng.uniform(0.1, 0.5), invert=rng.uniform(5, 20), edit=rng.uniform(10, 40),
                       encode=rng.uniform(0.2, 1.0), metrics=rng.uniform(0.5, 2.0))
    row.close_seconds()
    row.peak_memory_mb = rng.uniform(6000, 9000)
    row.metrics = {"warp_error": rng.lognormvariate(0, 0.5), "clip_text": rng.uniform(0.2, 0.35),
                   "clip_frame": rng.uniform(0.8, 0.99), "interp_psnr": rng.gauss(30, 3)}
    row.metrics_by = {"flow": "dis", "clip": "openai/clip-vit-base-patch32", "clip_off": None}
    return row


def make_synthetic_output(out_dir: Path, items: int, rows_per_item: int, *, fail_every: int = 50,
                          markers: str = "new", seed: int = 0) -> list[str]:
    """Writes a synthetic output folder (see the module docstring); returns the input specs that plan it.
    `markers`: "new" (with aggregates) or "old" (as earlier releases wrote them, without)."""
    out_dir = Path(out_dir)
    (out_dir / "stats").mkdir(parents=True, exist_ok=True)
    (out_dir / "shards").mkdir(exist_ok=True)
    config = load_config(None)
    save_config(config, out_dir / "config.yaml")
    config_hash = output_config_hash(config)
    rng = random.Random(seed)
    urls, stems = [], []
    n = 0
    for item in range(items):
        stem = f"part-{item:06d}"
        url = f"pipe:cat data/{stem}.tar"
        rows = []
        for r in range(rows_per_item):
            key = f"{stem}-s{r // len(EDITS):04d}"
            failed = fail_every > 0 and n % fail_every == fail_every - 1
            rows.append(synthetic_row(rng, key, EDITS[r % len(EDITS)], failed, n // fail_every if fail_every else 0))
            n += 1
        text = "".join(json.dumps(row.to_json()) + "\n" for row in rows).encode()
        (out_dir / "stats" / f"{stem}.jsonl").write_bytes(text)
        keys = sorted({row.key for row in rows})
        marker = DoneMarker.for_shard(shard=url, stem=stem, keys=keys, rows=rows, seconds=rng.uniform(60, 600),
                                      started_at="2026-12-01T00:00:00+00:00", finished_at="2026-12-01T06:00:00+00:00",
                                      config_hash=config_hash)
        marker.files = {f"stats/{stem}.jsonl": {"bytes": len(text), "sha256": hashlib.sha256(text).hexdigest()}}
        data = marker.to_json()
        if markers == "old":
            del data["aggregates"]
        (out_dir / "stats" / f"{stem}.json").write_text(json.dumps(data, indent=2))
        urls.append(url)
        stems.append(stem)
    atomic_write(out_dir / "plan.json", json.dumps({"urls": urls, "stems": stems}, indent=1))
    return [INPUT_PATTERN.format(last=items - 1)]


# Each stage runs in a fresh interpreter; it prints one JSON line: seconds, and the peak resident set of
# the stage itself: the kernel's high-water mark (VmHWM) is reset once the imports are done (writing 5 to
# /proc/self/clear_refs), so the figure is the stage's peak, imports (torch...) included as they stand.
_STAGE = r"""
import json, sys, time
from pathlib import Path
stage, out, spec = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
from vidbatch.config.output_hash import output_config_hash
from vidbatch.config.schema import load_config
from vidbatch.dispatch.plan import plan_run, read_plan_file
from vidbatch.report.page import write_report
from vidbatch.report.summary import build_summary, load_summary, write_summary
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
config = load_config(out / "config.yaml")
import gc; gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
start = time.perf_counter()
if stage in ("plan", "plan-empty"):   # a rerun over the done items, or a first run into an empty folder
    target = out if stage == "plan" else out / "empty-output"
    target.mkdir(exist_ok=True)
    plan = plan_run([spec], target, False, config_hash=output_config_hash(config))
    what = f"{len(plan.urls)} items, {len(plan.todo)} to do"
elif stage == "summary":
    urls, stems = read_plan_file(out)
    summary = build_summary(out, config, stems, urls, {}, 0.0)
    write_summary(out, summary)
    what = f"{summary['edits']['ok']} ok, {summary['edits']['failed']} failed edits"
else:
    path = write_report(out, load_summary(out), strict=True)
    what = f"{sum(p.stat().st_size for p in [path, *(out / 'report_media').rglob('*')] if p.is_file())} bytes"
seconds = time.perf_counter() - start
peak = status("VmHWM")
print(json.dumps({"stage": stage, "seconds": round(seconds, 2), "peak_rss_mb": round(peak),
                  "rss_at_start_mb": round(before), "stage_peak_mb": round(peak - before), "what": what}))
"""


def run_stage(stage: str, out_dir: Path, spec: str, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    root = pythonpath or str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = root
    # `python -c` puts the working folder first on sys.path: run there, so that checkout's vidbatch is the one.
    done = subprocess.run([sys.executable, "-c", _STAGE, stage, str(Path(out_dir).resolve()), spec], env=env,
                          text=True, capture_output=True, cwd=root)
    if done.returncode != 0:
        return {"stage": stage, "error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidbatch.tools.bench.driver", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the synthetic output folder (made when absent)")
    parser.add_argument("--items", type=int, default=100_000, help="work items (output shards)")
    parser.add_argument("--rows-per-item", type=int, default=10, help="edit rows per work item")
    parser.add_argument("--fail-every", type=int, default=50, help="every N-th row is a failure (0: none)")
    parser.add_argument("--markers", choices=("new", "old"), default="new",
                        help="done markers with aggregates (new) or as earlier releases wrote them (old)")
    parser.add_argument("--stages", default="plan-empty,plan,summary,report",
                        help="comma-separated: plan-empty (into an empty folder), plan (a rerun), summary, report")
    parser.add_argument("--pythonpath", default=None, help="run the stages with the vidbatch of this checkout")
    args = parser.parse_args(argv)
    stamp = args.out / "synthetic.json"
    wanted = {"items": args.items, "rows_per_item": args.rows_per_item, "fail_every": args.fail_every,
              "markers": args.markers}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        spec = INPUT_PATTERN.format(last=args.items - 1)
        print(f"reusing {args.out}", flush=True)
    else:
        if args.out.exists() and any(args.out.iterdir()):
            parser.error(f"{args.out} exists and is not a synthetic output of these sizes: give a new folder")
        start = time.perf_counter()
        [spec] = make_synthetic_output(args.out, args.items, args.rows_per_item, fail_every=args.fail_every,
                                       markers=args.markers)
        stamp.write_text(json.dumps(wanted))
        print(f"made {args.out} in {time.perf_counter() - start:.1f} s", flush=True)
    for stage in args.stages.split(","):
        print(json.dumps(run_stage(stage.strip(), args.out, spec, args.pythonpath)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
