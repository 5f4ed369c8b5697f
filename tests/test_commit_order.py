"""Commit ordering and crash consistency of output shards.

The contract (io/output_shards.py): a shard's tar and jsonl are renamed into place first, its done
marker is written last, and reprocessing a shard removes its old marker before anything else, so a
done marker always stands next to the complete data it describes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import FAST, TINY, read_output, run_cli, video_sample, write_shard
from vidbatch.core.rows import DoneMarker, EditRow
from vidbatch.io.output_shards import ShardOutput, is_done, marker_path, rows_path, shard_path


def a_marker(stem: str, keys: list[str], rows: list[EditRow]) -> DoneMarker:
    return DoneMarker.for_shard(shard=f"in/{stem}.tar", stem=stem, keys=keys, rows=rows, seconds=1.0,
                                started_at="2020-01-01T00:00:00+00:00", finished_at="2020-01-01T00:00:01+00:00")


def filled_output(out: Path, stem: str) -> tuple[ShardOutput, DoneMarker]:
    output = ShardOutput(out, stem)
    for key in ("a", "b"):
        row = EditRow.pending(key, "e", metric_names=[])
        output.add(key, {"e.mp4": key.encode() * 100, "json": b"{}"}, [row])
    return output, a_marker(stem, output.keys, output.rows)


def test_marker_appears_only_next_to_both_complete_files(tmp_path, monkeypatch):
    out, stem = tmp_path / "out", "p0"
    output, marker = filled_output(out, stem)
    seen = []   # (final name, what stood under the final names the moment it appeared)
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        state = {"tar": shard_path(out, stem).is_file(), "rows": rows_path(out, stem).is_file()}
        if state["tar"]:
            state["keys"] = list(read_output(shard_path(out, stem)))
        if state["rows"]:
            state["row_keys"] = [json.loads(l)["key"] for l in rows_path(out, stem).read_text().splitlines()]
        seen.append((Path(dst).name, state))

    monkeypatch.setattr(os, "replace", replace)
    output.commit(marker)
    monkeypatch.undo()

    names = [name for name, _ in seen]
    assert names == [f"{stem}.tar", f"{stem}.jsonl", f"{stem}.json"]      # the marker last, by rename
    at_marker = seen[-1][1]
    assert at_marker == {"tar": True, "rows": True, "keys": ["a", "b"], "row_keys": ["a", "b"]}
    assert is_done(out, stem)


def test_crash_before_the_marker_leaves_the_shard_not_done(tmp_path, monkeypatch):
    import vidbatch.io.output_shards as output_shards

    out, stem = tmp_path / "out", "p0"
    output, marker = filled_output(out, stem)

    def crash(path, data):
        raise OSError("no space left on device")

    monkeypatch.setattr(output_shards, "write_json_atomic", crash)
    with pytest.raises(OSError, match="no space"):
        output.commit(marker)
    assert not marker_path(out, stem).exists() and not is_done(out, stem)


def test_crash_before_the_marker_then_rerun_redoes_the_shard(tmp_path, clips, monkeypatch):
    """Through the CLI, on the tiny model: the marker write fails after both renames; the shard is
    recorded as failed, has no marker, and the next plain run (no --overwrite) edits it again."""
    import vidbatch.io.output_shards as output_shards

    write_shard(tmp_path / "in" / "p0.tar", [video_sample("v0", clips["cells"])])
    out = tmp_path / "out"
    args = ["run", TINY, "--input", tmp_path / "in" / "p0.tar", "--output", out,
            *sum((["--set", s] for s in [*FAST, "video.max_frames=3", "metrics.clip_model=none"]), [])]
    real_write = output_shards.write_json_atomic
    crashes = []

    def crash(path, data):
        # (recorded, not asserted: the run catches what a shard raises)
        crashes.append((Path(path).name, shard_path(out, "p0").is_file(), rows_path(out, "p0").is_file()))
        raise OSError("no space left on device")

    monkeypatch.setattr(output_shards, "write_json_atomic", crash)
    assert run_cli(*args) == 1                     # the shard failed
    assert crashes == [("p0.json", True, True)]    # it crashed between the renames and the marker
    assert not marker_path(out, "p0").exists() and not is_done(out, "p0")
    assert not list(out.rglob("*.tmp"))

    monkeypatch.setattr(output_shards, "write_json_atomic", real_write)
    stale = shard_path(out, "p0").stat().st_mtime_ns
    assert run_cli(*args) == 0
    assert is_done(out, "p0")
    assert shard_path(out, "p0").stat().st_mtime_ns != stale        # written again, not skipped
    marker = json.loads(marker_path(out, "p0").read_text())
    assert marker["samples"] == 1 and marker["samples_ok"] == 1
    assert list(read_output(shard_path(out, "p0"))) == ["v0"]


def test_reprocessing_removes_the_old_marker_before_anything_else(tmp_path, monkeypatch):
    """--overwrite: the first thing `process_shard` does is drop the old marker, so a crash at any
    later point (here: creating the writer, the first thing after it) leaves no marker next to data
    that is being replaced."""
    import vidbatch.batch.shard as shard

    out, stem = tmp_path / "out", "p0"
    output, marker = filled_output(out, stem)
    output.commit(marker)                              # a finished earlier run
    assert is_done(out, stem)
    markers_when_writing = []

    class CrashingWriter:
        def __init__(self, out_dir, url, stem_, on_sample=None, committed=None):
            markers_when_writing.append(marker_path(out_dir, stem_).exists())
            raise RuntimeError("crash while reprocessing")

    monkeypatch.setattr(shard, "ShardPredictionWriter", CrashingWriter)
    with pytest.raises(RuntimeError, match="crash while reprocessing"):
        shard.process_shard(object(), "in/p0.tar", stem, out)
    assert markers_when_writing == [False]
    assert not marker_path(out, stem).exists() and not is_done(out, stem)


def test_overwrite_that_crashes_mid_shard_leaves_no_old_marker(tmp_path, clips, monkeypatch):
    """Through the CLI: a done shard rerun with --overwrite crashes while its first sample is written;
    the old marker is gone (the shard is not done), and the next run redoes it."""
    write_shard(tmp_path / "in" / "p0.tar", [video_sample("v0", clips["cells"])])
    out = tmp_path / "out"
    args = ["run", TINY, "--input", tmp_path / "in" / "p0.tar", "--output", out,
            *sum((["--set", s] for s in [*FAST, "video.max_frames=3", "metrics.clip_model=none"]), [])]
    assert run_cli(*args) == 0 and is_done(out, "p0")

    def crash(self, key, members, rows):
        raise OSError("crash while reprocessing")

    monkeypatch.setattr(ShardOutput, "add", crash)
    assert run_cli(*args, "--overwrite") == 1
    assert not marker_path(out, "p0").exists() and not is_done(out, "p0")
    monkeypatch.undo()
    assert run_cli(*args) == 0 and is_done(out, "p0")
