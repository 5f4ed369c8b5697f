"""Encoding and metrics in a background thread (`runtime.finishing: background`) write exactly what the in-line
path writes, in the same order, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import FAST, TINY, read_output, run_cli, video_sample, write_shard

VARYING = {"seconds", "peak_memory_mb"}  # timings and the process's memory differ run to run


def run_with(tmp_path: Path, shard: Path, finishing: str) -> Path:
    out = tmp_path / f"out-{finishing}"
    sets = [*FAST, f"runtime.finishing={finishing}", "inversion.cache=false",
            'edits=[{"name": "a", "prompt": "oil"}, {"name": "b", "prompt": "ink", "method": "per-frame"}]']
    assert run_cli("run", str(TINY), "--input", str(shard), "--output", str(out),
                   *sum((["--set", s] for s in sets), [])) == 0
    return out


def test_background_finishing_writes_what_the_inline_path_writes(tmp_path, clips):
    """Three videos, two editors: the output tar's members (mp4 bytes included) and the rows, but for
    timings, are identical with `runtime.finishing` background and inline, and in the shard's order."""
    shard = write_shard(tmp_path / "in" / "s.tar", [video_sample(k, clips[c]) for k, c in
                                                      [("v0", "pattern"), ("v1", "cells"), ("v2", "fractal")]])
    inline, overlapped = run_with(tmp_path, shard, "inline"), run_with(tmp_path, shard, "background")

    def rows(out: Path) -> list[dict]:
        lines = (out / "stats" / "s.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in VARYING} for line in lines]

    assert [(r["key"], r["edit"], r["status"]) for r in rows(overlapped)] == [
        (k, e, "ok") for k in ("v0", "v1", "v2") for e in ("a", "b")]
    assert rows(overlapped) == rows(inline)
    a, b = read_output(inline / "shards" / "s.tar"), read_output(overlapped / "shards" / "s.tar")
    assert list(a) == list(b) == ["v0", "v1", "v2"]
    for key in a:
        assert set(a[key]) == set(b[key])
        for member in a[key]:
            if member.endswith("mp4"):
                assert a[key][member] == b[key][member], (key, member)
