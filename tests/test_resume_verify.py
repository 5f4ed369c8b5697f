"""A resume that verifies, `vidbatch verify`, one live run per output, and what failed writes leave
behind: through the real CLI on shards made on the fly."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import FAST, TINY, read_output, run_cli, video_sample, write_shard

SETS = [*FAST, "video.max_frames=3", "metrics.clip_model=none", "inversion.cache=false"]
SHARDS = 5


def run_args(inputs: str, out: Path, *sets: str) -> list:
    return ["run", TINY, "--input", inputs, "--output", out, *sum((["--set", s] for s in [*SETS, *sets]), [])]


@pytest.fixture
def finished(tmp_path, clips) -> tuple[str, Path]:
    """SHARDS input shards of one clip each, edited once: (input pattern, output folder)."""
    for i in range(SHARDS):
        write_shard(tmp_path / "in" / f"p{i}.tar", [video_sample(f"v{i}", clips["cells"])])
    inputs, out = str(tmp_path / "in" / f"p{{0..{SHARDS - 1}}}.tar"), tmp_path / "out"
    assert run_cli(*run_args(inputs, out)) == 0
    return inputs, out


def printed(capsys) -> str:
    """What the CLI printed, rich's line wrapping undone."""
    return " ".join(capsys.readouterr().out.split())


def marker(out: Path, stem: str) -> dict:
    return json.loads((out / "stats" / f"{stem}.json").read_text())


def test_rerun_redoes_damaged_shards_and_keeps_intact_ones(finished, capsys):
    """Truncated tar, deleted tar, emptied jsonl, a marker that is `garbage{` and one that is `{}`: the
    plain rerun redoes exactly those shards (no traceback, exit 0); the intact one is skipped."""
    inputs, out = finished
    first = {i: marker(out, f"p{i}") for i in range(SHARDS)}
    assert first[0]["config_hash"] and set(first[0]["files"]) == {"shards/p0.tar", "stats/p0.jsonl"}
    tar = out / "shards" / "p0.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    (out / "shards" / "p1.tar").unlink()
    (out / "stats" / "p2.jsonl").write_text("")
    (out / "stats" / "p3.json").write_text("garbage{")
    (out / "stats" / "p4.json").write_text("{}")
    capsys.readouterr()
    assert run_cli("verify", out) == 1
    listed = printed(capsys)
    assert all(f"p{i}" in listed for i in range(5)) and "5 damaged" in listed

    (out / "stats" / "p4.json").write_text(json.dumps(first[4]))    # p4 intact again: must be skipped
    assert run_cli(*run_args(inputs, out)) == 0
    said = printed(capsys)
    assert "1 shard(s) already done" in said
    assert "p0.tar has 1000 bytes" in said and "p1.tar is missing" in said
    for i in range(4):
        assert list(read_output(out / "shards" / f"p{i}.tar")) == [f"v{i}"]
        assert [json.loads(l)["key"] for l in (out / "stats" / f"p{i}.jsonl").read_text().splitlines()] == [f"v{i}"]
    assert marker(out, "p4") == first[4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"]["done"] == SHARDS and summary["samples"]["ok"] == SHARDS
    assert run_cli("verify", out) == 0


def test_verify_finds_a_flipped_byte_that_the_sizes_miss(finished, capsys):
    _, out = finished
    tar = out / "shards" / "p2.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF   # inside the first member's data: same size, another checksum
    tar.write_bytes(bytes(data))
    capsys.readouterr()
    assert run_cli("verify", out) == 1
    said = printed(capsys)
    assert "p2: shards/p2.tar does not match its sha256" in said and "4 intact, 1 damaged" in said
    assert run_cli("verify", out / "nothing") == 2


def test_a_changed_output_config_is_refused_until_overwrite(finished, capsys):
    inputs, out = finished
    first_hash = marker(out, "p0")["config_hash"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run_cli(*run_args(inputs, out, "edit.steps=2")) == 2
    said = printed(capsys)
    assert "another output config" in said and "--overwrite" in said and "another --output" in said
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "run.log"} == \
        {p: t for p, t in before.items() if p.name != "run.log"}
    # Where and how fast it runs is not the output's shape: a rerun with another runtime resumes.
    assert run_cli(*run_args(inputs, out, "runtime.log_every_s=5", "inversion.cache=true")) == 0
    assert "5 shard(s) already done" in printed(capsys)
    assert run_cli(*run_args(inputs, out, "edit.steps=2"), "--overwrite") == 0
    hashes = {marker(out, f"p{i}")["config_hash"] for i in range(SHARDS)}
    assert len(hashes) == 1 and hashes != {first_hash}


def test_failed_writes_leave_no_temporaries_and_cache_entries_follow_the_umask(tmp_path, clips):
    """A report that cannot be written (a folder in its way) is a one-line error and leaves no
    temporary; a killed writer's old temporary is swept; inversion cache entries are group-readable
    under umask 002 (safetensors alone writes 0600)."""
    write_shard(tmp_path / "in" / "p0.tar", [video_sample("v0", clips["cells"])])
    out, cache = tmp_path / "out", tmp_path / "cache"
    old_umask = os.umask(0o002)
    try:
        assert run_cli(*run_args(str(tmp_path / "in" / "p0.tar"), out, "inversion.cache=true",
                                 f"inversion.cache_dir={cache}")) == 0
    finally:
        os.umask(old_umask)
    entries = list(cache.rglob("*.safetensors"))
    assert entries and all(e.stat().st_mode & 0o777 == 0o664 for e in entries)

    killed = out / ".report.html.999999.0123456789ab.tmp"    # what a SIGKILLed writer leaves
    killed.write_text("half a page")
    os.utime(killed, (time.time() - 7200, time.time() - 7200))
    (out / "report.html").unlink()
    (out / "report.html").mkdir()                            # the write's rename must fail
    assert run_cli("report", out) == 2
    assert not killed.exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
