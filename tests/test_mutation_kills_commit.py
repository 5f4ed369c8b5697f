"""Shard commit and atomic writes (io/output_shards.py, core/atomic.py) where `make mutate` found the
suite blind: the clean-up of what killed writers leave behind, and what a committed shard records.
Real files in a temporary folder, real tar shards read back with tarfile and webdataset.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from vidbatch.core.atomic import remove_stale_temporaries


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
    from test_commit_order import filled_output
    from vidbatch.io.output_shards import read_rows

    output, marker = filled_output(tmp_path, "p0")
    output.commit(marker)
    rows = read_rows(tmp_path, "p0")
    assert [(row.key, row.to_json()) for row in rows] == [(row.key, row.to_json()) for row in output.rows]
    assert [row.key for row in rows] == ["a", "b"]
    assert read_rows(tmp_path, "p1") == []      # a shard without rows
