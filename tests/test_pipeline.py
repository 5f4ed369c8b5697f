"""End to end through the CLI: real shards, ffmpeg, Lightning and the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import FAST, TINY, read_output, run_cli, video_sample, write_shard
from vidbatch.io.video import decode_video, probe_video

EDITS = 'edits=[{"name": "ink", "prompt": "{prompt}, ink drawing"}, {"name": "neon", "prompt": "neon glow"}]'


def decode_bytes(data: bytes):
    return decode_video(data, "mp4", short_side=None, multiple=2)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, clips):
    """Two shards of good samples, run once through the CLI."""
    root = tmp_path_factory.mktemp("good")
    write_shard(root / "in" / "part-000000.tar", [video_sample("pattern", clips["pattern"]),
                                                   video_sample("fractal", clips["fractal"])])
    write_shard(root / "in" / "part-000001.tar", [video_sample("cells", clips["cells"])])
    out = root / "out"
    # A cache of its own: other tests edit the same clips, and this run must start cold.
    sets = [*FAST, EDITS, f"inversion.cache_dir={root / 'cache'}"]
    args = ["run", TINY, "--input", str(root / "in" / "part-{000000..000001}.tar"), "--output", out,
            *sum((["--set", s] for s in sets), [])]
    return run_cli(*args), root, out, args


def test_run_writes_the_output_contract(good_run, clips):
    code, root, out, args = good_run
    assert code == 0
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["part-000000.tar", "part-000001.tar"]
    first = read_output(out / "shards" / "part-000000.tar")
    assert list(first) == ["pattern", "fractal"]
    for key, sample in first.items():
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"ink.mp4", "neon.mp4", "json"}
        record = json.loads(sample["json"])
        assert [r["edit"] for r in record["rows"]] == ["ink", "neon"]
        assert all(r["status"] == "ok" and r["error"] is None for r in record["rows"])
    rows = [json.loads(l) for l in (out / "stats" / "part-000000.jsonl").read_text().splitlines()]
    assert [(r["key"], r["edit"]) for r in rows] == [("pattern", "ink"), ("pattern", "neon"),
                                                     ("fractal", "ink"), ("fractal", "neon")]
    for row in rows:
        assert set(row["seconds"]) == {"decode", "invert", "edit", "encode", "metrics", "total"}
        assert row["method"] == "vidtome" and row["settings"]["edit"]["method"] == "vidtome"
        assert row["seconds"]["total"] == pytest.approx(sum(v for k, v in row["seconds"].items() if k != "total"),
                                                        abs=1e-3)
        assert row["peak_memory_mb"] > 0
    assert rows[0]["prompt"] == "a test clip, ink drawing" and rows[1]["prompt"] == "neon glow"
    # One inversion per video, made (and cached) for its first edit, shared by the second.
    assert [r["inversion_cache"] for r in rows] == ["miss", "shared", "miss", "shared"]
    marker = json.loads((out / "stats" / "part-000000.json").read_text())
    assert marker["samples"] == 2 and marker["rows_ok"] == 4 and marker["rows_failed"] == 0
    assert marker["started_at"] <= marker["finished_at"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"]["ok"] == 3 and summary["edits"]["ok"] == 6 and summary["shards"]["done"] == 2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["edit"]["steps"] == 3 and [e["name"] for e in saved["edits"]] == ["ink", "neon"]
    assert not list(out.rglob("*.tmp"))
    assert "shard part-000001 done" in (out / "run.log").read_text()


def test_output_videos_match_the_source_frames_size_and_fps(good_run, clips):
    code, root, out, args = good_run
    outputs = {**read_output(out / "shards" / "part-000000.tar"), **read_output(out / "shards" / "part-000001.tar")}
    for key, clip in clips.items():
        source = decode_video(clip.read_bytes(), clip.suffix.lstrip("."), short_side=32, multiple=16)
        for edit in ("ink", "neon"):
            edited = decode_bytes(outputs[key][f"{edit}.mp4"])
            assert edited.frames.shape == source.frames.shape, (key, edit)
            assert edited.fps == pytest.approx(source.fps, rel=1e-3)
        row = json.loads(outputs[key]["json"])["rows"][0]
        assert (row["frames"], row["height"], row["width"]) == source.frames.shape[:3]


def test_audio_track_is_carried_over(good_run, tmp_path):
    code, root, out, args = good_run
    sample = read_output(out / "shards" / "part-000000.tar")["pattern"]
    path = tmp_path / "edited.mp4"
    path.write_bytes(sample["ink.mp4"])
    assert probe_video(path).has_audio
    path.write_bytes(read_output(out / "shards" / "part-000000.tar")["fractal"]["ink.mp4"])
    assert not probe_video(path).has_audio


def test_rerun_skips_done_shards_and_overwrite_redoes_them(good_run):
    code, root, out, args = good_run
    marker = out / "stats" / "part-000000.json"
    before = marker.read_text()
    assert run_cli(*args) == 0
    assert marker.read_text() == before
    assert run_cli(*args, "--overwrite") == 0
    assert marker.read_text() != before
    rows = [json.loads(l) for l in (out / "stats" / "part-000000.jsonl").read_text().splitlines()]
    assert [r["inversion_cache"] for r in rows] == ["hit", "shared"] * 2   # the rerun reuses every inversion
    assert run_cli(*args, "--overwrite", "--set", "inversion.cache=false") == 0
    rows = [json.loads(l) for l in (out / "stats" / "part-000000.jsonl").read_text().splitlines()]
    assert [r["inversion_cache"] for r in rows] == ["off", "shared"] * 2


def test_same_seed_is_bit_identical_and_another_seed_differs(tmp_path, clips):
    write_shard(tmp_path / "in.tar", [video_sample("pattern", clips["pattern"])])
    outputs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        sets = [*FAST, "edit.eta=0.5", f"edit.seed={seed}"]
        assert run_cli("run", TINY, "--input", tmp_path / "in.tar", "--output", tmp_path / name,
                       *sum((["--set", s] for s in sets), [])) == 0
        sample = read_output(tmp_path / name / "shards" / "in.tar")["pattern"]
        outputs[name] = decode_bytes(sample["watercolor.mp4"]).frames
    assert np.array_equal(outputs["a"], outputs["b"])
    assert not np.array_equal(outputs["a"], outputs["c"])


def test_bad_inputs_fail_their_rows_and_the_shard_goes_on(tmp_path, clips):
    from vidbatch.testing.clips import make_test_video

    data = clips["pattern"].read_bytes()
    one_frame = make_test_video(tmp_path / "one.mp4", seconds=0.125, fps=8, size=(64, 64))
    big = make_test_video(tmp_path / "big.mp4", seconds=0.5, fps=8, size=(320, 240))
    samples = [
        video_sample("good1", clips["pattern"]),
        {"__key__": "corrupt", "mp4": os.urandom(5000), "txt": "x"},
        {"__key__": "truncated", "mp4": data[: len(data) // 3], "txt": "x"},
        {"__key__": "empty", "mp4": b"", "txt": "x"},
        {"__key__": "novideo", "json": {"prompt": "just a prompt"}},
        {"__key__": "noprompt", "mp4": data},
        video_sample("oneframe", one_frame),
        video_sample("toolarge", big),
        {"__key__": "badjson", "mp4": data, "json": "{not json"},
        video_sample("good2", clips["cells"]),
    ]
    write_shard(tmp_path / "bad.tar", samples)
    out = tmp_path / "out"
    sets = [*FAST, "video.max_source_pixels=20000", 'edits=[{"name": "e", "prompt": "{prompt}, sketch"}]']
    code = run_cli("run", TINY, "--input", tmp_path / "bad.tar", "--output", out,
                   *sum((["--set", s] for s in sets), []))
    assert code == 0  # failed samples are recorded, not fatal
    rows = {json.loads(l)["key"]: json.loads(l) for l in (out / "stats" / "bad.jsonl").read_text().splitlines()}
    assert list(rows) == [s["__key__"] for s in samples]
    assert rows["good1"]["status"] == "ok" and rows["good2"]["status"] == "ok"
    expected_words = {"corrupt": "corrupt", "truncated": "truncated", "empty": "empty", "novideo": "no video",
                      "noprompt": "no prompt", "oneframe": "at least 2", "toolarge": "too large",
                      "badjson": "badjson.json"}
    for key, word in expected_words.items():
        assert rows[key]["status"] == "failed", key
        assert word in rows[key]["error"].lower(), (key, rows[key]["error"])
    output = read_output(out / "shards" / "bad.tar")
    assert list(output) == list(rows)  # one sample per input video, failed ones with their json only
    assert "e.mp4" in output["good1"] and "e.mp4" not in output["corrupt"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == {"total": 10, "ok": 2, "failed": 8}
    assert sum(summary["failures_by_cause"].values()) == 8


def test_usage_errors_exit_2_with_the_cause(tmp_path, capsys):
    assert run_cli("run", TINY, "--input", tmp_path / "missing.tar", "--output", tmp_path / "o") == 2
    assert "missing.tar" in capsys.readouterr().out
    write_shard(tmp_path / "in.tar", [])
    assert run_cli("run", TINY, "--input", tmp_path / "in.tar", "--output", tmp_path / "o",
                   "--set", "edit.stepz=3") == 2
    out = capsys.readouterr().out
    assert "edit.stepz" in out and "steps" in out
    assert run_cli("run", TINY, "--input", tmp_path / "in.tar", "--output", tmp_path / "o",
                   "--set", f"model.id={tmp_path / 'nomodel'}") == 2
    assert "nomodel" in capsys.readouterr().out


def test_a_broken_shard_fails_alone_and_a_rerun_finishes_it(tmp_path, clips):
    write_shard(tmp_path / "in" / "a.tar", [video_sample("pattern", clips["pattern"])])
    (tmp_path / "in" / "b.tar").write_bytes(b"this is not a tar file at all" * 100)
    args = ["run", TINY, "--input", tmp_path / "in" / "{a,b}.tar", "--output", tmp_path / "out",
            *sum((["--set", s] for s in FAST), [])]
    assert run_cli(*args) == 1
    assert (tmp_path / "out" / "stats" / "a.json").is_file()
    assert not (tmp_path / "out" / "stats" / "b.json").exists()
    assert not (tmp_path / "out" / "shards" / "b.tar").exists()
    assert not list((tmp_path / "out").rglob("*.tmp"))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["shards"]["failed"] == 1 and "b" in summary["shards"]["failed_shards"]
    done_a = (tmp_path / "out" / "stats" / "a.json").read_text()
    write_shard(tmp_path / "in" / "b.tar", [video_sample("cells", clips["cells"])])
    assert run_cli(*args) == 0
    assert (tmp_path / "out" / "stats" / "a.json").read_text() == done_a
    assert list(read_output(tmp_path / "out" / "shards" / "b.tar")) == ["cells"]


def test_killed_run_resumes_without_redoing_finished_shards(tmp_path, clips):
    """SIGKILL the CLI process once its first shard is done; a rerun completes the rest."""
    for i in range(3):
        write_shard(tmp_path / "in" / f"p{i}.tar", [video_sample(f"v{i}{j}", clips["pattern"]) for j in range(2)])
    args = [sys.executable, "-m", "vidbatch.cli", "run", str(TINY), "--input", str(tmp_path / "in" / "p{0..2}.tar"),
            "--output", str(tmp_path / "out"), *sum((["--set", s] for s in FAST), [])]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "out" / "stats" / "p0.json"
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.exists(), "the first shard never finished"
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = {p.name: p.read_text() for p in (tmp_path / "out" / "stats").glob("p*.json")}
    for tar in (tmp_path / "out" / "shards").glob("*.tar"):  # every visible tar is complete and marked done
        assert (tmp_path / "out" / "stats" / f"{tar.stem}.json").exists()
    assert subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    for name, text in done_before.items():
        assert (tmp_path / "out" / "stats" / name).read_text() == text
    for i in range(3):
        assert list(read_output(tmp_path / "out" / "shards" / f"p{i}.tar")) == [f"v{i}0", f"v{i}1"]
    assert not list((tmp_path / "out").rglob("*.tmp"))
