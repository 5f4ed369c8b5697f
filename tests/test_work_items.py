"""Work items (`runtime.samples_per_task`): input shards split into ranges of samples, each its own output
shard; and `vidbatch compact OUT`, which merges the work items' outputs into larger shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds

import vidbatch.dispatch.plan as plan_module
from conftest import FAST, TINY, read_output, run_cli, video_sample, write_shard
from vidbatch.config.output_hash import output_config_hash
from vidbatch.config.schema import load_config
from vidbatch.core.errors import ConfigError
from vidbatch.dispatch.leases import LeaseBook
from vidbatch.dispatch.plan import plan_run, read_plan_file
from vidbatch.io.input_shards import InputLimits, SampleRange, count_samples, read_samples
from vidbatch.io.output_shards import marker_path, shard_path
from vidbatch.tools.compact import CompactError, compact_output

KEYS = [f"v{i}" for i in range(5)]


def five_sample_shard(path: Path, clip: Path | None = None) -> Path:
    """p0.tar: 5 samples v0..v4, each a video (the clip, or a few stand-in bytes) and a prompt."""
    samples = [video_sample(k, clip) if clip is not None else {"__key__": k, "mp4": f"video {k}", "txt": "a clip"}
               for k in KEYS]
    return write_shard(path, samples)


def test_ranges_of_a_shard_give_each_sample_once_in_order(tmp_path):
    shard = str(five_sample_shard(tmp_path / "p0.tar"))
    assert count_samples(shard) == 5
    got = [[s.key for s in read_samples(shard, sample_range=SampleRange(first, 2))] for first in (0, 2, 4)]
    assert got == [["v0", "v1"], ["v2", "v3"], ["v4"]]
    # The samples before the range are skipped unread: members over a limit there raise nothing.
    tight = InputLimits(max_video_bytes=1)
    later = list(read_samples(shard, tight, sample_range=SampleRange(3, 1)))
    assert [s.key for s in later] == ["v3"] and "over the limit" in (later[0].error or "")


def test_plan_splits_a_shard_into_items_and_keeps_the_counts(tmp_path, monkeypatch):
    shard = str(five_sample_shard(tmp_path / "in" / "p0.tar"))
    empty = str(write_shard(tmp_path / "in" / "q.tar", []))
    out = tmp_path / "out"
    plan = plan_run([shard, empty], out, False, samples_per_task=2)
    assert plan.stems == ["p0-00000", "p0-00001", "p0-00002", "q-00000"]
    assert plan.urls == [shard, shard, shard, empty]
    assert [(r.first, r.count) for r in plan.ranges] == [(0, 2), (2, 2), (4, 1), (0, 0)]
    assert plan.todo == [0, 1, 2, 3] and plan.counts == {shard: 5, empty: 0}
    # Without samples_per_task: one item per shard, named after it, as always.
    whole = plan_run([shard, empty], out, False)
    assert whole.stems == ["p0", "q"] and whole.ranges == [] and whole.sample_range(0) is None

    out.mkdir()
    (out / "plan.json").write_text(json.dumps(plan_module.plan_record(plan)))

    def no_counting(url):
        raise AssertionError(f"{url} counted again")

    monkeypatch.setattr(plan_module, "count_samples", no_counting)
    again = plan_run([shard, empty], out, False, samples_per_task=3)   # counts from plan.json
    assert again.stems == ["p0-00000", "p0-00001", "q-00000"]
    assert [(r.first, r.count) for r in again.ranges] == [(0, 3), (3, 2), (0, 0)]


def test_an_unreadable_shard_or_bad_value_names_its_cause(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ConfigError, match=r"cannot count the samples of input shard .*bad\.tar.*samples_per_task"):
        plan_run([str(bad)], tmp_path / "out", False, samples_per_task=2)
    with pytest.raises(ConfigError, match="runtime.samples_per_task"):
        plan_run([str(bad)], tmp_path / "out", False, samples_per_task=0)


@pytest.mark.parametrize("value", ["0", "-3", "two", "1.5"])
def test_bad_samples_per_task_is_refused_naming_the_key(value, capsys):
    assert run_cli("config", "validate", TINY, "--set", f"runtime.samples_per_task={value}") == 2
    assert "runtime.samples_per_task" in capsys.readouterr().out


def test_samples_per_task_shapes_the_output_hash():
    base = load_config(TINY)
    hashes = {n: output_config_hash(load_config(TINY, [f"runtime.samples_per_task={n}"])) for n in ("2", "3")}
    assert hashes["2"] != hashes["3"]
    assert output_config_hash(base) not in hashes.values()
    # Null leaves the hash as it was before the setting existed: the runtime section never counts.
    assert output_config_hash(base) == output_config_hash(load_config(TINY, ["runtime.log_every_s=5"]))


def test_work_items_run_resume_and_compact(tmp_path, clips):
    """Through the CLI on the tiny model: 5 samples, 2 per task -> 3 output shards; a rerun after one item
    lost its marker redoes that item alone; compact merges them into stock WebDataset shards."""
    five_sample_shard(tmp_path / "in" / "p0.tar", clips["cells"])
    out = tmp_path / "out"
    args = ["run", TINY, "--input", tmp_path / "in" / "p0.tar", "--output", out,
            *sum((["--set", s] for s in [*FAST, "video.max_frames=2", "metrics.clip_model=none",
                                         "runtime.samples_per_task=2"]), [])]
    assert run_cli(*args) == 0
    stems = ["p0-00000", "p0-00001", "p0-00002"]
    assert read_plan_file(out) == ([str(tmp_path / "in" / "p0.tar")] * 3, stems)
    outputs = [list(read_output(shard_path(out, s))) for s in stems]
    assert outputs == [["v0", "v1"], ["v2", "v3"], ["v4"]]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"]["total"] == 3 and summary["samples"]["ok"] == 5
    assert summary["inputs"] == [str(tmp_path / "in" / "p0.tar")]

    kept = {s: shard_path(out, s).stat().st_mtime_ns for s in stems}
    marker_path(out, "p0-00001").unlink()   # item 1 not done: the rerun does it, and it alone
    assert run_cli(*args) == 0
    after = {s: shard_path(out, s).stat().st_mtime_ns for s in stems}
    assert [after[s] == kept[s] for s in stems] == [True, False, True]
    assert list(read_output(shard_path(out, "p0-00001"))) == ["v2", "v3"]

    assert run_cli("compact", out, "--target-samples", "3") == 0
    parts = sorted((out / "compacted").glob("*.tar"))
    assert [p.name for p in parts] == ["part-000000.tar", "part-000001.tar"]   # items 0+1 (4 samples), item 2
    dataset = wds.WebDataset([str(p) for p in parts], shardshuffle=False, nodesplitter=None, empty_check=False)
    samples = list(dataset)
    assert [json.loads(s["json"])["key"] for s in samples] == KEYS
    assert [s["__key__"] for s in samples] == [f"{stem}/{k}" for stem, ks in zip(stems, outputs) for k in ks]
    assert all("watercolor.mp4" in s for s in samples)
    rows = [json.loads(line) for p in sorted((out / "compacted").glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert [(r["work_item"], r["key"]) for r in rows] == [(stem, k) for stem, ks in zip(stems, outputs) for k in ks]
    manifest = json.loads((out / "compacted" / "manifest.json").read_text())
    assert [p["work_items"] for p in manifest["parts"]] == [stems[:2], stems[2:]]
    assert [p["samples"] for p in manifest["parts"]] == [4, 1] and manifest["left_out"] == []
    assert all(shard_path(out, s).is_file() and marker_path(out, s).is_file() for s in stems)   # untouched

    # Rerunnable, here into one part; the old folder is replaced whole.
    assert compact_output(out, target_mb=1000).parts[0].items == stems
    assert [p.name for p in (out / "compacted").glob("*.tar")] == ["part-000000.tar"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    # A work item in progress (a live lease of another driver): refused, nothing replaced.
    book = LeaseBook(out, "other-driver", 600)
    assert book.claim("p0-00002")
    with pytest.raises(CompactError, match="p0-00002.*other-driver"):
        compact_output(out, target_samples=3)
    assert [p.name for p in (out / "compacted").glob("*.tar")] == ["part-000000.tar"]
    book.release_all()
