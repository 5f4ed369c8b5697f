"""Shard commit and atomic writes (io/output_shards.py, core/atomic.py) where `make mutate` found the
suite blind: the clean-up of what killed writers leave behind, and what a committed shard records.
Real files in a temporary folder, real tar shards read back with tarfile and webdataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from test_commit_order import a_marker, filled_output
from vidbatch.core.atomic import remove_stale_temporaries, temporary_path
from vidbatch.core.faults import LeaseLost
from vidbatch.core.names import is_safe_stem
from vidbatch.core.rows import STATUS_OK, DoneMarker, EditRow, SampleRecord
from vidbatch.io.object_store import STORE_FILE, ObjectStore, bind_staging, receipt_sizes, store_of
from vidbatch.io.output_shards import (CommittedShard, ShardOutput, is_done, marker_path, read_rows, rows_path,
                                       shard_path)


def aged(path: Path, seconds: float) -> Path:
    """Sets `path`'s mtime (not its target's, for a link) `seconds` into the past."""
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp), follow_symlinks=False)
    return path


def test_stale_temporaries_of_one_name_are_removed_by_age(tmp_path):
    final = tmp_path / "p0.tar"
    final.write_bytes(b"published")
    aged(final, 10_000)
    old_tmp = tmp_path / ".p0.tar.123.abc.tmp"
    old_tmp.write_bytes(b"half")
    aged(old_tmp, 4000)
    fresh_tmp = tmp_path / ".p0.tar.124.def.tmp"
    fresh_tmp.write_bytes(b"being written")
    aged(fresh_tmp, 3000)                                 # younger than the default hour: a live writer's
    old_swap = tmp_path / ".p0.tar.old-1"
    old_swap.mkdir()
    (old_swap / "inside").write_bytes(b"x")
    aged(old_swap, 4000)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_bytes(b"x")
    old_link = tmp_path / ".p0.tar.old-2"
    old_link.symlink_to(target)
    aged(old_link, 4000)
    other = tmp_path / ".p1.tar.125.ghi.tmp"
    other.write_bytes(b"another shard's")
    aged(other, 4000)

    removed = remove_stale_temporaries(final)

    assert sorted(removed) == sorted([old_tmp, old_swap, old_link])
    assert not old_tmp.exists() and not old_swap.exists() and not old_link.is_symlink()
    assert (target / "keep").is_file()                      # a link is unlinked, never followed
    assert final.read_bytes() == b"published" and fresh_tmp.exists() and other.exists()


def test_stale_temporaries_age_limit_is_a_parameter(tmp_path):
    final = tmp_path / "s.json"
    tmp = tmp_path / ".s.json.1.a.tmp"
    tmp.write_bytes(b"x")
    aged(tmp, 60)
    assert remove_stale_temporaries(final, older_than_s=120) == [] and tmp.exists()
    assert remove_stale_temporaries(final, older_than_s=30) == [tmp] and not tmp.exists()


def test_rows_of_a_committed_shard_read_back_in_order(tmp_path):
    output, marker = filled_output(tmp_path, "p0")
    output.commit(marker)
    rows = read_rows(tmp_path, "p0")
    assert [(row.key, row.to_json()) for row in rows] == [(row.key, row.to_json()) for row in output.rows]
    assert [row.key for row in rows] == ["a", "b"]
    assert read_rows(tmp_path, "p1") == []      # a shard without rows


# --- Helpers: committed shards in a local output folder and in a staged (object store) output ----------

def ok_row(key: str, edit: str) -> EditRow:
    return dataclasses.replace(EditRow.pending(key, edit, metric_names=[]), status=STATUS_OK)


def failed_row(key: str, edit: str) -> EditRow:
    return EditRow.pending(key, edit, metric_names=[], error="cannot decode")


# Keys as input shards carry them: a plain name, WebDataset keys with a folder or a dot (not safe member
# stems, so stored under another name), and a sample with one failed edit.
SAMPLES = {"clip_1": [ok_row("clip_1", "ink"), ok_row("clip_1", "snow")],
           "train/007": [ok_row("train/007", "ink"), ok_row("train/007", "snow")],
           "v.2": [ok_row("v.2", "ink"), ok_row("v.2", "snow")],
           "broken": [ok_row("broken", "ink"), failed_row("broken", "snow")]}


def sample_members(key: str, rows: list[EditRow]) -> dict[str, bytes]:
    """What the writer stores per sample: one video per ok edit and the sample's json (key and rows)."""
    videos = {f"{row.edit}.mp4": f"{key}/{row.edit}".encode() * 50 for row in rows if row.ok}
    return {**videos, "json": json.dumps(SampleRecord(key, rows).to_json()).encode()}


def commit_samples(out: Path, stem: str = "p0") -> DoneMarker:
    output = ShardOutput(out, stem)
    for key, rows in SAMPLES.items():
        output.add(key, sample_members(key, rows), rows)
    return output.commit(a_marker(stem, output.keys, output.rows))


def staging_with_store(tmp_path: Path) -> tuple[Path, ObjectStore]:
    """A staging folder bound to an object store on the local filesystem (fsspec's `file://`: the same
    ObjectStore calls as s3://, no server), its prefix folders made as a bucket's would exist."""
    root = tmp_path / "store"
    for folder in ("shards", "stats"):
        (root / folder).mkdir(parents=True)
    staging = tmp_path / "staging"
    bind_staging(staging, root.as_uri())
    store = store_of(staging)
    assert store is not None
    return staging, store


def hidden_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.name != STORE_FILE)


# --- Writing and committing a shard ----------------------------------------------------------------

def test_writer_keeps_the_original_keys_and_writes_samples_under_unique_safe_stems(tmp_path):
    output = ShardOutput(tmp_path, "p0")
    stems = [output.add(key, {"e.mp4": b"v", "json": b"{}"}, [ok_row(key, "e")])
             for key in ("a", "../up/x", "a", "dir/b.c")]
    output.abort()
    assert output.keys == ["a", "../up/x", "a", "dir/b.c"]
    assert [row.key for row in output.rows] == output.keys
    assert stems[0] == "a" and len(set(stems)) == 4
    assert all(is_safe_stem(stem) for stem in stems)


def test_marker_records_the_size_and_sha256_of_each_published_file(tmp_path):
    marker = commit_samples(tmp_path)
    files = {name: {"bytes": (tmp_path / name).stat().st_size,
                    "sha256": hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()}
             for name in ("shards/p0.tar", "stats/p0.jsonl")}
    assert marker.files == files
    assert files["shards/p0.tar"]["bytes"] > 10 * 1024          # many writes into the tar, all counted
    assert json.loads((tmp_path / "stats" / "p0.json").read_text()) == marker.to_json()
    assert hidden_files(tmp_path) == []


def test_a_retry_sweeps_the_temporaries_a_killed_attempt_left_at_the_same_shard(tmp_path):
    killed = ShardOutput(tmp_path, "p0")                      # killed mid-shard: never committed nor aborted
    killed.add("a", {"e.mp4": b"v" * 100, "json": b"{}"}, [ok_row("a", "e")])
    killed_marker = temporary_path(marker_path(tmp_path, "p0"))
    killed_marker.write_text("{half")                         # killed while writing the marker
    other = ShardOutput(tmp_path, "p1")                       # another shard, still being written
    others = hidden_files(tmp_path)
    assert len(others) == 5

    retry = ShardOutput(tmp_path, "p0")
    left = hidden_files(tmp_path)
    assert set(left) - set(others) == {retry._tar_tmp.name, retry._rows_tmp.name}
    assert {killed._tar_tmp.name, killed._rows_tmp.name, killed_marker.name}.isdisjoint(left)
    assert {other._tar_tmp.name, other._rows_tmp.name} <= set(left)
    assert retry._tar_tmp.parent == tmp_path / "shards" and retry._rows_tmp.parent == tmp_path / "stats"
    retry.abort()
    other.abort()
    killed.abort()
    assert hidden_files(tmp_path) == []


def test_a_rename_that_finds_its_temporary_swept_asks_the_fence_again(tmp_path):
    """A taker of the lease starts the shard over between this attempt's fence check and its renames
    (its writer sweeps this attempt's temporaries): the commit reports the lost lease, not the missing
    file; without a fence the missing file is what it reports. Nothing is published either way."""
    fence_calls = []

    def fence() -> None:
        fence_calls.append(len(fence_calls))
        if len(fence_calls) == 1:
            ShardOutput(tmp_path, "p0").abort()               # the taker's writer, started at this moment
        else:
            raise LeaseLost("p0 was taken over")

    output, marker = filled_output(tmp_path, "p0")
    with pytest.raises(LeaseLost):
        output.commit(marker, fence)
    assert fence_calls == [0, 1]
    output.abort()

    output, marker = filled_output(tmp_path, "p0")
    ShardOutput(tmp_path, "p0").abort()
    with pytest.raises(FileNotFoundError):
        output.commit(marker)
    output.abort()
    assert not shard_path(tmp_path, "p0").exists() and not is_done(tmp_path, "p0")
    assert hidden_files(tmp_path) == []


def test_abort_after_a_commit_that_failed_past_its_renames_is_quiet(tmp_path, monkeypatch):
    """The marker write fails after both renames (disk full): the caller's abort finds no temporaries
    left and must not raise over the real error; the renamed files stay, without a marker."""
    import vidbatch.io.output_shards as output_shards

    output, marker = filled_output(tmp_path, "p0")

    def disk_full(path, data):
        raise OSError("no space left on device")

    monkeypatch.setattr(output_shards, "write_json_atomic", disk_full)
    with pytest.raises(OSError, match="no space"):
        output.commit(marker)
    output.abort()
    assert shard_path(tmp_path, "p0").is_file() and not is_done(tmp_path, "p0")
    assert hidden_files(tmp_path) == []


# --- Committing to an object store ------------------------------------------------------------------

def test_commit_to_a_store_uploads_the_files_and_keeps_copies_of_rows_and_marker(tmp_path):
    staging, store = staging_with_store(tmp_path)
    output, marker = filled_output(staging, "p0")
    committed = output.commit(marker)

    root = store.fs._strip_protocol(store.root)
    remote = {name: Path(root, name).read_bytes() for name in store.listing()}
    assert set(remote) == {"shards/p0.tar", "stats/p0.jsonl", "stats/p0.json"}
    for name, record in committed.files.items():
        assert record == {"bytes": len(remote[name]), "sha256": hashlib.sha256(remote[name]).hexdigest()}
    with tarfile.open(fileobj=io.BytesIO(remote["shards/p0.tar"])) as tar:
        assert tar.getnames() == ["a.e.mp4", "a.json", "b.e.mp4", "b.json"]
    assert json.loads(remote["stats/p0.json"]) == committed.to_json()
    # The staging folder: a copy of the marker (the same bytes) and of the rows; the tar only in the store.
    assert (staging / "stats" / "p0.json").read_bytes() == remote["stats/p0.json"]
    assert (staging / "stats" / "p0.jsonl").read_bytes() == remote["stats/p0.jsonl"]
    assert [row.key for row in read_rows(staging, "p0")] == ["a", "b"] and is_done(staging, "p0")
    assert list((staging / "shards").iterdir()) == []
    assert receipt_sizes(staging, "p0") == {"shards/p0.tar": len(remote["shards/p0.tar"])}
    assert hidden_files(staging / "shards") == hidden_files(staging / "stats") == []



# --- The committed shard a `--retry-failed` redo copies its ok samples from ---------------------------

def test_committed_shard_gives_back_each_ok_sample_as_written_whatever_its_key(tmp_path):
    """Keys that are not safe member names (`train/007`, `v.2`) are stored under other stems; their
    samples must still come back whole, or the redo would keep their rows and drop their videos."""
    commit_samples(tmp_path)
    committed = CommittedShard(tmp_path, "p0")
    try:
        assert committed.ok_keys == {"clip_1", "train/007", "v.2"}
        for key in committed.ok_keys:
            members, rows = committed.take(key)
            assert members == sample_members(key, SAMPLES[key])
            assert [row.to_json() for row in rows] == [row.to_json() for row in SAMPLES[key]]
    finally:
        committed.close()
    assert hidden_files(tmp_path) == []


def test_committed_shard_keeps_empty_members(tmp_path):
    output = ShardOutput(tmp_path, "p0")
    output.add("a", {"e.mp4": b"", "json": b"{}"}, [ok_row("a", "e")])
    output.commit(a_marker("p0", output.keys, output.rows))
    committed = CommittedShard(tmp_path, "p0")
    assert committed.take("a")[0] == {"e.mp4": b"", "json": b"{}"}
    committed.close()


def test_committed_shard_whose_tar_is_gone_is_a_missing_file(tmp_path):
    commit_samples(tmp_path)
    shard_path(tmp_path, "p0").unlink()
    with pytest.raises(FileNotFoundError):
        CommittedShard(tmp_path, "p0")


def test_committed_shard_of_a_staged_output_reads_the_tar_from_the_store(tmp_path):
    """The redo of a staged shard: the committed tar is downloaded beside the shard's name; the redo's
    writer, created next, sweeps that download as a temporary of the shard (the open tar still reads
    it), and closing the committed shard afterwards is quiet and leaves nothing behind."""
    staging, _ = staging_with_store(tmp_path)
    commit_samples(staging)
    assert not shard_path(staging, "p0").exists()
    committed = CommittedShard(staging, "p0")
    assert len(hidden_files(staging / "shards")) == 1            # the download
    redo = ShardOutput(staging, "p0")
    try:
        assert committed.ok_keys == {"clip_1", "train/007", "v.2"}
        members, _ = committed.take("train/007")
        assert members == sample_members("train/007", SAMPLES["train/007"])
    finally:
        committed.close()
        redo.abort()
    assert hidden_files(staging / "shards") == []
    committed = CommittedShard(staging, "p0")
    committed.close()                                           # a download nobody swept is removed too
    assert hidden_files(staging / "shards") == []


def test_writer_makes_the_output_folders_it_needs(tmp_path):
    out = tmp_path / "new" / "out"
    marker = commit_samples(out)
    assert is_done(out, "p0") and set(marker.files) == {"shards/p0.tar", "stats/p0.jsonl"}
