"""Hostile and broken input through the real CLI: escaping keys, oversized members (sparse and
compressed bombs), samples that cannot be parsed. Each fails its sample alone, with its cause."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import FAST, TINY, read_output, run_cli, video_sample, write_shard
from vidbatch.core.names import MAX_STEM_CHARS, MemberStems, safe_member_stem

SETS = [*FAST, "video.max_frames=3", "metrics.clip_model=none", "inversion.cache=false"]


def cli_args(inputs: list[Path] | Path, out: Path, *sets: str) -> list:
    inputs = inputs if isinstance(inputs, list) else [inputs]
    return ["run", TINY, *sum((["--input", p] for p in inputs), []), "--output", out,
            *sum((["--set", s] for s in [*SETS, *sets]), [])]


def rows_of(out: Path, stem: str) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for line in (out / "stats" / f"{stem}.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["key"], []).append(row)
    return rows


# -- safe member names ----------------------------------------------------------------------------

NASTY_KEYS = ["../../evil", "/abs/path", "a/b", "a_b", "..", ".", "", "-rf", "x" * 300, "caf\udce9",
              "emoji\U0001F600", "back\\slash", "C:\\win", "nul\0byte", "ok_key-1"]


def test_safe_member_stem_is_a_plain_bounded_name_and_unique():
    stems = [safe_member_stem(k) for k in NASTY_KEYS]
    for key, stem in zip(NASTY_KEYS, stems):
        assert 0 < len(stem) <= MAX_STEM_CHARS, key
        assert all(c.isascii() and (c.isalnum() or c in "_-") for c in stem), (key, stem)
        assert not stem.startswith("-") and stem not in (".", "..")
        assert safe_member_stem(key) == stem          # pure
    assert len(set(stems)) == len(stems)              # different keys, different stems
    assert safe_member_stem("ok_key-1") == "ok_key-1"  # a safe key is its own name
    names = MemberStems()
    assert [names.assign(k) for k in ("v", "v", "v")] == ["v", "v-2", "v-3"]


def test_escaping_keys_become_safe_members_and_keep_their_key(tmp_path, clips):
    """`../../evil` and `/abs/path` as input keys: a plain `tarfile.extractall` of the output stays in
    its folder, stock webdataset reads it, and each sample's json keeps the original key."""
    keys = ["../../evil", "/abs/path", "dir/clip"]
    write_shard(tmp_path / "in" / "p0.tar", [video_sample(k, clips["cells"]) for k in keys])
    out = tmp_path / "work" / "out"
    assert run_cli(*cli_args(tmp_path / "in" / "p0.tar", out)) == 0

    dest = tmp_path / "work" / "extract" / "here"
    dest.mkdir(parents=True)
    before = set(Path("/").glob("abs*")) | set(tmp_path.rglob("*"))
    with tarfile.open(out / "shards" / "p0.tar") as tar:
        names = tar.getnames()
        tar.extractall(dest)   # no filter: what a user's script does
    assert all("/" not in n and not n.startswith(".") for n in names), names
    new = (set(Path("/").glob("abs*")) | set(tmp_path.rglob("*"))) - before
    assert len(new) == 6 and all(p.parent == dest for p in new), new

    samples = read_output(out / "shards" / "p0.tar")     # stock webdataset
    assert len(samples) == 3
    by_key = {json.loads(s["json"])["key"]: stem for stem, s in samples.items()}
    assert set(by_key) == set(keys)
    assert by_key == {k: safe_member_stem(k) for k in keys}
    assert all("watercolor.mp4" in s for s in samples.values())
    assert list(rows_of(out, "p0")) == keys   # the stats rows keep the original keys


# -- limits before reading ------------------------------------------------------------------------

def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode = size, kind, 0o444
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def write_sparse_shard(path: Path, huge: dict[str, tuple[int, bytes]], after: list[tuple[str, bytes]]) -> Path:
    """A tar whose members in `huge` (name -> (size, type)) declare `size` bytes that are a hole in
    the file (never written, so the tar costs no disk or memory), followed by the members `after`."""
    with open(path, "wb") as f:
        for name, (size, kind) in huge.items():
            f.write(_header(name, size, kind))
            f.seek(size + (-size % 512), os.SEEK_CUR)
        for name, data in after:
            f.write(_header(name, len(data)) + data + bytes(-len(data) % 512))
        f.write(bytes(1024))
    return path


def write_gzip_bomb(path: Path, name: str, size: int, after: list[tuple[str, bytes]]) -> Path:
    """A .tar.gz whose member `name` inflates to `size` zero bytes (a few hundred kB on disk)."""
    with tarfile.open(path, "w:gz", compresslevel=6) as tar, open("/dev/zero", "rb") as zeros:
        info = tarfile.TarInfo(name)
        info.size = size
        tar.addfile(info, zeros)
        for member, data in after:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def peak_rss_mb(args: list) -> tuple[int, float]:
    """Runs the CLI in a child process: (exit code, its peak RSS in MB, from wait4)."""
    process = subprocess.Popen([sys.executable, "-m", "vidbatch.cli", *map(str, args)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss / 1024


def test_size_limits_are_checked_before_reading_and_bound_memory(tmp_path, clips):
    """A member declaring 1.5 GiB (sparse), a 1.5 GiB pax header and a .tar.gz member inflating to
    512 MiB, with `video.max_input_mb=1`: each is a failed row naming the limit and the sample, the
    good samples after them are edited, and the run's peak memory stays within 100 MB of a run over
    the good samples alone."""
    clip = clips["cells"].read_bytes()
    huge = 3 * 2**29
    (tmp_path / "in").mkdir()
    sparse = write_sparse_shard(tmp_path / "in" / "big.tar", {"big.mp4": (huge, tarfile.REGTYPE), "paxbomb.mp4": (huge, tarfile.XHDTYPE)},
                                [("paxbomb.mp4", clip), ("v0.mp4", clip), ("v0.txt", b"a clip")])
    bomb = write_gzip_bomb(tmp_path / "in" / "bomb.tar.gz", "bomb.mp4", 2**29,
                           [("v1.mp4", clip), ("v1.txt", b"a clip")])
    assert sparse.stat().st_blocks * 512 < 2**20 and bomb.stat().st_size < 2**20
    write_shard(tmp_path / "in" / "plain0.tar", [video_sample("v0", clips["cells"])])
    write_shard(tmp_path / "in" / "plain1.tar", [video_sample("v1", clips["cells"])])

    code, normal_mb = peak_rss_mb(cli_args([tmp_path / "in" / "plain0.tar", tmp_path / "in" / "plain1.tar"],
                                           tmp_path / "normal", "video.max_input_mb=1"))
    assert code == 0
    out = tmp_path / "out"
    code, hostile_mb = peak_rss_mb(cli_args([sparse, bomb], out, "video.max_input_mb=1"))
    assert code == 0

    big, bombed = rows_of(out, "big"), rows_of(out, "bomb")
    assert [r["status"] for r in big["v0"]] == ["ok"] and [r["status"] for r in bombed["v1"]] == ["ok"]
    assert big["big"][0]["status"] == "failed"
    assert big["big"][0]["error"] == (f"member big.mp4 is {huge} bytes, over the limit video.max_input_mb "
                                      f"({2**20} bytes); not read")
    assert "bomb.mp4 is 536870912 bytes, over the limit video.max_input_mb" in bombed["bomb"][0]["error"]
    assert "extended tar header" in big["paxbomb"][0]["error"]
    causes = json.loads((out / "summary.json").read_text())["failures_by_cause"]
    assert "member <key>.mp4 is N bytes, over the limit video.max_input_mb (N bytes); not read" in causes
    assert hostile_mb < normal_mb + 100, (hostile_mb, normal_mb)


# -- every sample-level problem is a failed row ---------------------------------------------------

def test_each_unparsable_sample_fails_alone(tmp_path, clips):
    """A json nested 100,000 deep, a txt and a json that are not UTF-8, a member twice in a sample, a key
    whose bytes are not UTF-8, and a key repeated later in the shard: each is one failed row with its
    cause; the shard commits and the good samples are edited."""
    video = clips["cells"].read_bytes()
    members = [
        ("good.mp4", video), ("good.txt", b"a clip"),
        ("deep.mp4", video), ("deep.json", b"[" * 100_000 + b"]" * 100_000),
        ("badtxt.mp4", video), ("badtxt.txt", b"\xff\xfe not utf-8"),
        ("badjson.mp4", video), ("badjson.json", b'{"prompt": "caf\xe9"}'),
        ("other.mp4", video), ("other.json", b'{"prompt": "x", "edits": [{"name": "../x", "prompt": "p"}]}'),
        ("twice.mp4", video), ("twice.mp4", video),
        ("caf\udce9.mp4", video), ("caf\udce9.txt", b"a clip"),   # names' bytes b"caf\xe9...": not UTF-8
        ("good.mp4", video), ("good.txt", b"a clip"),   # the key again, not adjacent
    ]
    path = write_sparse_shard(tmp_path / "p0.tar", {}, members)
    out = tmp_path / "out"
    assert run_cli(*cli_args(path, out)) == 0

    rows = rows_of(out, "p0")
    errors = {key: [r["error"] for r in key_rows] for key, key_rows in rows.items()}
    assert [r["status"] for r in rows["good"]] == ["ok", "failed"]
    assert errors["good"][1] == "key 'good' appears again in the shard (first as sample 1); only its first sample is edited"
    assert errors["deep"] == ["bad deep.json: JSON nested too deeply to parse"]
    assert errors["badtxt"][0].startswith("bad badtxt.txt: 'utf-8' codec can't decode byte 0xff")
    assert errors["badjson"][0].startswith("bad badjson.json: 'utf-8' codec can't decode byte 0xe9")
    assert errors["other"][0].startswith("bad other.json: edits[0].name must be letters")
    assert errors["twice"] == ["member twice.mp4 appears twice in the sample"]
    assert [r["status"] for r in rows["caf\\xe9"]] == ["ok"]   # the key's byte kept visible, not dropped
    marker = json.loads((out / "stats" / "p0.json").read_text())
    assert (marker["samples"], marker["samples_failed"]) == (8, 6)
    members = read_output(out / "shards" / "p0.tar")
    assert {json.loads(s["json"])["key"] for s in members.values()} == set(rows)
    assert len(members) == 8   # the repeated key has a json of its own, under a unique name


def test_failure_causes_group_without_mangling_words():
    from vidbatch.report.summary import failure_cause

    assert failure_cause("cannot decode s0v1.mp4: video has 1 frame(s), at least 2 needed", "s0v1") == \
        "video has N frame(s), at least N needed"
    assert failure_cause("member a.mp4 is 1610612736 bytes, over the limit video.max_input_mb (1048576 bytes)", "a") \
        == "member <key>.mp4 is N bytes, over the limit video.max_input_mb (N bytes)"
    assert failure_cause("h264 error at 12.5s in a 640x480 x264 stream of 1.5MB (3gp)", "k") == \
        "h264 error at Ns in a N x264 stream of NMB (3gp)"
