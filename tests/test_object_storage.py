"""Inputs and outputs in object storage, against a real S3-compatible server (moto's server mode) on
loopback, through s3fs: a run reads from and writes to buckets, resumes from the store's markers, and a
process killed between its uploads and its marker leaves the shard not done, so the rerun redoes it and
every sample ends up exactly once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3fs

from conftest import FAST, REPO, TINY, check_exactly_once, make_inputs, read_output, run_cli, video_sample, write_shard
from vidbatch.core.errors import UsageError
from vidbatch.core.paths import check_url_supported, is_url, local_path
from vidbatch.io.object_store import TEST_KILL_ENV, TEST_KILL_EXIT, staging_dir

# Small and quick: every stage real, on 3 frames, no CLIP metrics.
SETTINGS = [*FAST, "video.max_frames=3", "metrics.clip_model=none", "runtime.threads=1"]
SETS = sum((["--set", s] for s in SETTINGS), [])
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free loopback port for this module; yields its endpoint URL."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail("moto's S3 server did not start")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """An s3fs filesystem on the server, its environment set as a user's would be (AWS_ENDPOINT_URL and
    friends), a node-local staging folder per test and a fresh bucket per test."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VIDBATCH_STAGING", str(tmp_path / "staging"))
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"b{time.monotonic_ns()}"
    fs.mkdir(bucket)
    fs.bucket = bucket
    return fs


def _upload_inputs(fs, local: Path, shards: int) -> str:
    for i in range(shards):
        fs.put_file(str(local / f"p{i}.tar"), f"{fs.bucket}/in/p{i}.tar")
    return f"s3://{fs.bucket}/in/p{{0..{shards - 1}}}.tar"


def _download_output(fs, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    fs.get(f"{fs.bucket}/out/", str(out), recursive=True)
    return out


def _check_store_output(out: Path, shards: int, keys: list[str]) -> None:
    """Every input key exactly once across the downloaded shards, read with stock webdataset
    (`check_exactly_once`); every shard's marker lists its tar and jsonl with their sizes."""
    check_exactly_once(out, shards, keys)
    for i in range(shards):
        marker = json.loads((out / "stats" / f"p{i}.json").read_text())
        for name, record in marker["files"].items():
            assert (out / name).stat().st_size == record["bytes"]


def test_run_reads_and_writes_buckets_then_resumes(s3, tmp_path, clips, monkeypatch, capsys):
    _, keys = make_inputs(tmp_path / "in", clips["cells"], shards=2, videos=2)
    inputs = _upload_inputs(s3, tmp_path / "in", 2)
    out_url = f"s3://{s3.bucket}/out"
    assert run_cli("run", TINY, "--input", inputs, "--output", out_url, *SETS) == 0
    assert not Path("s3:").exists()   # never a local folder named after the scheme

    out = _download_output(s3, tmp_path, "first")
    _check_store_output(out, 2, keys)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"]["done"] == 2 and summary["samples"]["ok"] == len(keys)
    assert all((out / name).is_file() for name in ("report.html", "config.yaml", "plan.json", "run.log"))

    # A rerun from a fresh staging folder (another machine) resumes from the store: nothing is redone.
    etags = {p: s3.info(p)["ETag"] for p in s3.find(f"{s3.bucket}/out/stats")}
    monkeypatch.setenv("VIDBATCH_STAGING", str(tmp_path / "staging-2"))
    capsys.readouterr()
    assert run_cli("run", TINY, "--input", inputs, "--output", out_url, *SETS) == 0
    assert "2 shard(s) already done" in capsys.readouterr().out
    assert {p: s3.info(p)["ETag"] for p in s3.find(f"{s3.bucket}/out/stats")} == etags   # markers untouched

    # A dry run against the store (another fresh staging folder) sees the same: nothing to do.
    monkeypatch.setenv("VIDBATCH_STAGING", str(tmp_path / "staging-3"))
    assert run_cli("run", TINY, "--input", inputs, "--output", out_url, "--dry-run", *SETS) == 0
    assert "shards: 2 (0 to do, 2 already done)" in capsys.readouterr().out


def test_store_shard_missing_its_tar_is_redone(s3, tmp_path, clips):
    """"Done" is checked against the store's listing: a marker whose tar is gone is redone."""
    _, keys = make_inputs(tmp_path / "in", clips["cells"], shards=1, videos=2)
    inputs = _upload_inputs(s3, tmp_path / "in", 1)
    out_url = f"s3://{s3.bucket}/out"
    assert run_cli("run", TINY, "--input", inputs, "--output", out_url, *SETS) == 0
    s3.rm_file(f"{s3.bucket}/out/shards/p0.tar")
    assert run_cli("run", TINY, "--input", inputs, "--output", out_url, *SETS) == 0
    assert s3.exists(f"{s3.bucket}/out/shards/p0.tar")
    _check_store_output(_download_output(s3, tmp_path, "out"), 1, keys)


def test_kill_between_upload_and_marker_leaves_shard_not_done(s3, s3_server, tmp_path, clips):
    """A driver killed after uploading shard p1's tar and jsonl, before its marker: p1 is not done in the
    store (no marker), the rerun redoes it, and every sample is in the output exactly once."""
    _, keys = make_inputs(tmp_path / "in", clips["cells"], shards=2, videos=2)
    inputs = _upload_inputs(s3, tmp_path / "in", 2)
    out_url = f"s3://{s3.bucket}/out"
    env = {**os.environ, TEST_KILL_ENV: "p1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-m", "vidbatch.cli", "run", str(TINY), "--input", inputs,
                             "--output", out_url, *SETS],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == TEST_KILL_EXIT, killed.stderr[-2000:]
    listed = {p.split("/out/", 1)[1] for p in s3.find(f"{s3.bucket}/out")}
    assert {"shards/p1.tar", "stats/p1.jsonl"} <= listed     # uploaded ...
    assert "stats/p1.json" not in listed                     # ... but not done
    assert "stats/p0.json" in listed

    p0_before = s3.info(f"{s3.bucket}/out/shards/p0.tar")["LastModified"]
    assert run_cli("run", TINY, "--input", inputs, "--output", out_url, *SETS) == 0
    assert s3.info(f"{s3.bucket}/out/shards/p0.tar")["LastModified"] == p0_before   # p0 not redone
    _check_store_output(_download_output(s3, tmp_path, "out"), 2, keys)


def test_a_marker_already_in_the_store_is_a_lost_lease(s3, tmp_path, monkeypatch):
    """The marker is a conditional put: an attempt that finds one written meanwhile publishes nothing."""
    from vidbatch.core.faults import LeaseLost
    from vidbatch.core.rows import DoneMarker
    from vidbatch.io.object_store import ObjectStore, bind_staging
    from vidbatch.io.output_shards import ShardOutput, marker_path

    staging = tmp_path / "stage"
    bind_staging(staging, f"s3://{s3.bucket}/out")
    output = ShardOutput(staging, "p0")
    output.add("a", {"e.mp4": b"x" * 100, "json": b"{}"}, [])
    marker = DoneMarker.for_shard(shard="in/p0.tar", stem="p0", keys=output.keys, rows=[], seconds=1.0,
                                  started_at="2020-01-01T00:00:00+00:00", finished_at="2020-01-01T00:00:01+00:00")

    original = ObjectStore.upload

    def upload(self, local, name):   # the other attempt's marker lands just after this one's last upload
        original(self, local, name)
        if name.endswith(".jsonl"):
            s3.pipe_file(f"{s3.bucket}/out/stats/p0.json", b'{"other": true}')

    monkeypatch.setattr(ObjectStore, "upload", upload)
    with pytest.raises(LeaseLost, match="appeared"):
        output.commit(marker)
    output.abort()
    assert json.loads(s3.cat_file(f"{s3.bucket}/out/stats/p0.json")) == {"other": True}
    assert not marker_path(staging, "p0").exists()


def test_unknown_scheme_is_a_clear_error_before_any_work(tmp_path, capsys):
    code = run_cli("run", TINY, "--input", str(tmp_path / "x.tar"), "--output", "s4://bucket/out")
    assert code == 2
    err = capsys.readouterr()
    assert "unknown URL scheme 's4://'" in err.out + err.err
    assert not Path("s4:").exists()
    code = run_cli("run", TINY, "--input", "nosuch://x/y.tar", "--output", str(tmp_path / "out"))
    assert code == 2
    assert "--input 'nosuch://x/y.tar': unknown URL scheme 'nosuch://'" in (tmp_path / "out" / "run.log").read_text()
    assert not list((tmp_path / "out").glob("shards/*"))


def test_missing_package_names_it(monkeypatch):
    """gs:// without gcsfs (not installed here): the message names the URL, the scheme and the package."""
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed")
    with pytest.raises(UsageError, match=r"--output 'gs://b/out': the 'gs://' scheme needs the package 'gcsfs'.*"
                                         r"pip install gcsfs"):
        check_url_supported("gs://b/out", "--output")


def test_url_or_path():
    assert is_url("s3://b/k") and is_url("gs://b") and not is_url("file:///x/y.tar")
    assert not is_url("data/part-000.tar") and not is_url("pipe:aws s3 cp s3://b/x.tar -")
    assert local_path("file:///x/y.tar") == "/x/y.tar" and local_path("a/b") == "a/b"


def test_output_url_refused_with_several_drivers(s3, tmp_path):
    code = run_cli("run", TINY, "--input", str(tmp_path / "x.tar"), "--output", f"s3://{s3.bucket}/out",
                   "--num-shards", "2", "--shard-index", "0")
    assert code == 2


def test_cache_dir_url_refused(s3, tmp_path, clips):
    make_inputs(tmp_path / "in", clips["cells"], shards=1, videos=1)
    code = run_cli("run", TINY, "--input", str(tmp_path / "in" / "p0.tar"), "--output", str(tmp_path / "out"),
                   "--set", "inversion.cache_dir=s3://bucket/cache")
    assert code == 2
    assert "inversion.cache_dir" in (tmp_path / "out" / "run.log").read_text()


def test_retry_failed_copies_ok_samples_from_the_store(s3, tmp_path, clips):
    """--retry-failed on a store output: the ok samples are copied from the committed tar, which only the
    store has (the staging folder keeps no tars), and the shard is committed again."""
    write_shard(tmp_path / "in" / "p0.tar", [video_sample("good", clips["cells"]), {"__key__": "bad", "txt": "x"}])
    inputs = _upload_inputs(s3, tmp_path / "in", 1)
    out_url = f"s3://{s3.bucket}/out"
    assert run_cli("run", TINY, "--input", inputs, "--output", out_url, *SETS) == 0
    first = _download_output(s3, tmp_path, "first")
    marker_etag = s3.info(f"{s3.bucket}/out/stats/p0.json")["ETag"]
    assert json.loads((first / "stats" / "p0.json").read_text())["samples_failed"] == 1

    assert run_cli("run", TINY, "--input", inputs, "--output", out_url, "--retry-failed", *SETS) == 0
    assert s3.info(f"{s3.bucket}/out/stats/p0.json")["ETag"] != marker_etag    # committed again
    second = _download_output(s3, tmp_path, "second")
    old, new = read_output(first / "shards" / "p0.tar"), read_output(second / "shards" / "p0.tar")
    assert list(new) == ["good", "bad"]
    assert new["good"]["watercolor.mp4"] == old["good"]["watercolor.mp4"]   # copied, not edited again


def test_each_output_url_has_its_own_staging_folder(monkeypatch, tmp_path):
    from vidbatch.io.object_store import staging_dir

    monkeypatch.setenv("VIDBATCH_STAGING", str(tmp_path))
    a, b = staging_dir("s3://bucket/a"), staging_dir("s3://bucket/b")
    assert a.parent == b.parent == tmp_path and a != b
    assert staging_dir("s3://bucket/a/") == a


def test_staging_is_in_the_node_local_folder_unless_set(tmp_path, monkeypatch):
    """An output URL's staging folder: under $VIDBATCH_STAGING when set, else under `vidbatch-staging` in the
    node-local folder (the first of $VIDBATCH_LOCAL_DIR, $SLURM_TMPDIR, $TMPDIR); one folder per URL."""
    monkeypatch.delenv("VIDBATCH_STAGING", raising=False)
    monkeypatch.setenv("VIDBATCH_LOCAL_DIR", str(tmp_path / "local"))
    first = staging_dir("s3://bucket/out")
    assert first.parent == tmp_path / "local" / "vidbatch-staging"
    assert staging_dir("s3://bucket/out/") == first and staging_dir("s3://bucket/other") != first
    monkeypatch.setenv("VIDBATCH_STAGING", str(tmp_path / "mine"))
    assert staging_dir("s3://bucket/out").parent == tmp_path / "mine"
