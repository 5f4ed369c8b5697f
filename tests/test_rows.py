"""The output contract's record types (`core.rows`): round trips, and the JSON a real run writes."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import FAST, TINY, read_output, run_cli, video_sample, write_shard
from vidbatch.core.rows import STAGES, DoneMarker, EditRow, SampleRecord
from vidbatch.core.errors import ConfigError
from vidbatch.metrics import METRIC_KEYS
from vidbatch.io.output_shards import is_done, marker_path, read_done_marker

# The README's "Output (a contract)" section, written out: other tools read exactly these keys.
CONTRACT_ROW_KEYS = ["key", "edit", "status", "error", "frames", "width", "height", "fps", "prompt",
                     "inversion_cache", "seconds", "peak_memory_mb", "metrics", "metrics_by",
                     "model_fingerprint", "metrics_error", "method", "settings"]
CONTRACT_MARKER_KEYS = ["shard", "stem", "samples", "samples_ok", "samples_failed", "rows_ok", "rows_failed",
                        "frames", "seconds", "started_at", "finished_at", "config_hash", "files", "aggregates"]
CONTRACT_STAGES = ["decode", "invert", "edit", "encode", "metrics", "total"]


def an_ok_row(key: str = "clip", edit: str = "ink") -> EditRow:
    row = EditRow.pending(key, edit, metric_names=METRIC_KEYS, frames=4, width=48, height=32, fps=8.0)
    row.status, row.prompt, row.inversion_cache = "ok", "ink drawing", "miss"
    row.seconds.update(invert=0.5, edit=1.25, encode=0.125)
    row.close_seconds()
    row.peak_memory_mb = 512.5
    row.metrics = {**row.metrics, "warp_error": 0.0625, "interp_psnr": 21.5}
    row.metrics_by = {"flow": "dis", "clip": None, "clip_off": "disabled"}
    return row


def test_the_types_have_the_contract_fields_in_order():
    assert [f.name for f in dataclasses.fields(EditRow)] == CONTRACT_ROW_KEYS
    assert [f.name for f in dataclasses.fields(DoneMarker)] == CONTRACT_MARKER_KEYS
    assert list(STAGES) == CONTRACT_STAGES


def test_a_pending_row_is_failed_and_complete():
    row = EditRow.pending("clip", "ink", metric_names=METRIC_KEYS, error="cannot decode clip.mp4")
    data = row.to_json()
    assert list(data) == CONTRACT_ROW_KEYS
    assert data["status"] == "failed" and not row.ok and data["error"] == "cannot decode clip.mp4"
    assert data["metrics"] == dict.fromkeys(METRIC_KEYS) and list(data["seconds"]) == CONTRACT_STAGES


def test_close_seconds_sums_the_stages_into_total():
    row = an_ok_row()
    assert row.seconds["total"] == pytest.approx(1.875)
    assert list(row.seconds) == CONTRACT_STAGES


def test_edit_row_round_trip():
    row = an_ok_row()
    assert EditRow.from_json(row.to_json()) == row
    assert EditRow.from_json(json.loads(json.dumps(row.to_json()))) == row
    data = row.to_json()
    data["seconds"]["edit"] = 99.0  # to_json gives a copy: the row is not changed through it
    assert row.seconds["edit"] == 1.25


def test_from_json_refuses_unknown_and_missing_fields():
    data = an_ok_row().to_json()
    with pytest.raises(ValueError, match="unknown field.*colour"):
        EditRow.from_json({**data, "colour": "red"})
    with pytest.raises(ValueError, match="missing field.*edit"):
        EditRow.from_json({k: v for k, v in data.items() if k != "edit"})
    older = {k: v for k, v in data.items() if k not in ("metrics_by", "metrics_error")}
    assert EditRow.from_json(older).metrics_by is None  # rows written before a field existed still read


def test_sample_record_round_trip():
    record = SampleRecord("clip", [an_ok_row(edit="ink"), an_ok_row(edit="neon")])
    assert list(record.to_json()) == ["key", "rows"]
    assert SampleRecord.from_json(record.to_json()) == record


def test_done_marker_counts_and_round_trip():
    failed = EditRow.pending("bad", "ink", metric_names=METRIC_KEYS, error="no video", frames=7)
    half = EditRow.pending("half", "neon", metric_names=METRIC_KEYS, error="out of memory", frames=4)
    rows = [an_ok_row("good", "ink"), an_ok_row("good", "neon"), an_ok_row("half", "ink"), half, failed]
    marker = DoneMarker.for_shard(shard="in/part.tar", stem="part", keys=["good", "half", "bad"], rows=rows,
                                  seconds=12.34567, started_at="2024-01-01T00:00:00+00:00",
                                  finished_at="2024-01-01T00:00:12+00:00")
    assert (marker.samples, marker.samples_ok, marker.samples_failed) == (3, 1, 2)  # one failed edit fails a video
    assert (marker.rows_ok, marker.rows_failed) == (3, 2)
    assert marker.frames == 12 and marker.seconds == 12.346  # frames of ok rows only
    assert list(marker.to_json()) == CONTRACT_MARKER_KEYS
    assert DoneMarker.from_json(marker.to_json()) == marker


def test_a_file_that_is_not_a_marker_is_named(tmp_path):
    assert read_done_marker(tmp_path, "part") is None and not is_done(tmp_path, "part")
    path = marker_path(tmp_path, "part")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"samples": 3}))
    with pytest.raises(ConfigError, match="part.json is not a done marker"):
        is_done(tmp_path, "part")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One good and one undecodable video, two edits, through the CLI (a few seconds)."""
    from vidbatch.testing.clips import make_test_video

    root = tmp_path_factory.mktemp("rows")
    clip = make_test_video(root / "clip.mp4", seconds=0.5, fps=8, size=(48, 32))
    write_shard(root / "in.tar", [video_sample("clip", clip), {"__key__": "corrupt", "mp4": b"not a video"}])
    edits = 'edits=[{"name": "ink", "prompt": "{prompt}, ink"}, {"name": "neon", "prompt": "neon"}]'
    sets = [*FAST, edits, "inversion.cache=false", "runtime.backend=local"]
    code = run_cli("run", TINY, "--input", root / "in.tar", "--output", root / "out",
                   *sum((["--set", s] for s in sets), []))
    assert code == 0
    return root / "out"


def test_a_real_run_writes_exactly_the_contract(tiny_run):
    lines = (tiny_run / "stats" / "in.jsonl").read_text().splitlines()
    assert len(lines) == 4
    for line in lines:
        data = json.loads(line)
        assert list(data) == CONTRACT_ROW_KEYS
        assert list(data["seconds"]) == CONTRACT_STAGES and list(data["metrics"]) == list(METRIC_KEYS)
        # Reading a row and writing it back gives the same bytes: the types change nothing on disk.
        assert json.dumps(EditRow.from_json(data).to_json()) == line
    statuses = [(json.loads(l)["key"], json.loads(l)["status"]) for l in lines]
    assert statuses == [("clip", "ok"), ("clip", "ok"), ("corrupt", "failed"), ("corrupt", "failed")]
    text = marker_path(tiny_run, "in").read_text()
    assert list(json.loads(text)) == CONTRACT_MARKER_KEYS
    assert json.dumps(DoneMarker.from_json(json.loads(text)).to_json(), indent=2) == text
    marker = read_done_marker(tiny_run, "in")
    assert (marker.samples, marker.samples_failed, marker.rows_ok, marker.rows_failed) == (2, 1, 2, 2)
    rows_by_key = {}
    for line in lines:
        rows_by_key.setdefault(json.loads(line)["key"], []).append(EditRow.from_json(json.loads(line)))
    for key, sample in read_output(tiny_run / "shards" / "in.tar").items():
        assert SampleRecord.from_json(json.loads(sample["json"])) == SampleRecord(key, rows_by_key[key])
