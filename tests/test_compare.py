"""Several methods in one run: per-edit method and settings, one shared inversion, the comparison report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vidbatch.config.schema import expand_compare, load_config
from vidbatch.core.errors import ConfigError
from vidbatch.io.video import decode_video

from conftest import FAST, TINY, read_output, run_cli, video_sample, write_shard

METHODS = ["vidtome", "tokenflow", "per-frame"]


def rows_of(out: Path, stem: str = "p0") -> list[dict]:
    return [json.loads(line) for line in (out / "stats" / f"{stem}.jsonl").read_text().splitlines()]


def frames_of(mp4: bytes) -> np.ndarray:
    return decode_video(mp4, "mp4", short_side=None).frames


def test_an_edit_may_carry_its_own_method_control_and_settings():
    edits = json.dumps([{"name": "a", "prompt": "x"},
                        {"name": "b", "prompt": "y", "method": "tokenflow", "set": {"tokenflow.batch_size": 4}}])
    config = load_config(TINY, [f"edits={edits}"])
    assert config.edits[1].method == "tokenflow" and config.edits[1].set == {"tokenflow.batch_size": 4}
    bad_key = json.dumps([{"name": "b", "prompt": "y", "set": {"tokenflow.bogus": 1}}])
    with pytest.raises(ConfigError, match=r"\(b\).*tokenflow.bogus"):
        load_config(TINY, [f"edits={bad_key}"])
    bad_value = json.dumps([{"name": "c", "prompt": "y", "method": "tokenflow", "set": {"edit.steps": 0}}])
    with pytest.raises(ConfigError, match=r"\(c\).*edit.steps"):
        load_config(TINY, [f"edits={bad_value}"])
    not_per_edit = json.dumps([{"name": "d", "prompt": "y", "set": {"video.size": 64}}])
    with pytest.raises(ConfigError, match=r"\(d\).*video.size.*cannot be set per edit"):
        load_config(TINY, [f"edits={not_per_edit}"])
    with pytest.raises(ConfigError, match="edit.compare.*bogus"):
        load_config(TINY, ["edit.compare=[vidtome, bogus]"])


def test_compare_runs_every_edit_once_per_method():
    config = load_config(TINY, ["edit.compare=[vidtome, per-frame]"])
    expanded = expand_compare(config.edits, config.edit.compare)
    assert [(e.name, e.method) for e in expanded] == [("watercolor-vidtome", "vidtome"),
                                                      ("watercolor-per-frame", "per-frame")]


@pytest.fixture(scope="module")
def compared(tmp_path_factory, clips):
    root = tmp_path_factory.mktemp("compare")
    shard = write_shard(root / "in" / "p0.tar", [video_sample("frac", clips["fractal"]),
                                                 video_sample("cells", clips["cells"])])
    out = root / "out"
    # Its own inversion cache: the session's may hold these clips' inversions from other tests.
    code = run_cli("run", TINY, "--input", shard, "--output", out, "--compare", *METHODS,
                   *sum((["--set", s] for s in FAST), []), "--set", "tokenflow.batch_size=4",
                   "--set", f"inversion.cache_dir={root / 'cache'}")
    return code, root, shard, out


def test_three_methods_over_two_clips_invert_each_clip_once(compared):
    code, _, _, out = compared
    assert code == 0
    rows = rows_of(out)
    assert [(r["key"], r["method"]) for r in rows] == [(k, m) for k in ("frac", "cells") for m in METHODS]
    assert all(r["status"] == "ok" for r in rows)
    for key in ("frac", "cells"):
        uses = [r["inversion_cache"] for r in rows if r["key"] == key]
        assert uses == ["miss", "shared", "shared"]            # inverted (and cached) once, shared twice
        assert [r["seconds"]["invert"] > 0 for r in rows if r["key"] == key] == [True, False, False]
    assert rows[1]["settings"]["tokenflow"]["batch_size"] == 4 and "merge" in rows[0]["settings"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == METHODS
    assert all(summary["by_method"][m]["edits"] == {"ok": 2, "failed": 0} for m in METHODS)


def test_each_compared_edit_equals_the_same_edit_run_alone(compared, tmp_path):
    _, _, shard, out = compared
    alone = tmp_path / "alone"
    edits = json.dumps([{"name": "watercolor-tokenflow", "prompt": "{prompt}, watercolor painting",
                         "method": "tokenflow"}])
    code = run_cli("run", TINY, "--input", shard, "--output", alone, "--set", f"edits={edits}",
                   *sum((["--set", s] for s in FAST), []), "--set", "tokenflow.batch_size=4",
                   "--set", "inversion.cache=false")
    assert code == 0
    together, by_itself = read_output(out / "shards" / "p0.tar"), read_output(alone / "shards" / "p0.tar")
    for key in ("frac", "cells"):
        assert np.array_equal(frames_of(together[key]["watercolor-tokenflow.mp4"]),
                              frames_of(by_itself[key]["watercolor-tokenflow.mp4"]))
        assert not np.array_equal(frames_of(together[key]["watercolor-tokenflow.mp4"]),
                                  frames_of(together[key]["watercolor-per-frame.mp4"]))


def test_the_report_compares_every_method(compared):
    _, _, _, out = compared
    page = (out / "report.html").read_text()
    assert "Methods compared" in page
    for method in METHODS:
        assert f'data-method="{method}"' in page
    assert page.count('class="compare-video"') == 2


def test_a_samples_own_edit_with_a_bad_setting_fails_alone(tmp_path, clips):
    meta = {"prompt": "a fractal", "edits": [
        {"name": "good", "prompt": "ink", "method": "per-frame"},
        {"name": "bad", "prompt": "ink", "method": "per-frame", "set": {"pnp.f_t": 7}}]}
    sample = video_sample("frac", clips["fractal"], prompt=None)
    sample["json"] = meta
    shard = write_shard(tmp_path / "in" / "p0.tar", [sample])
    out = tmp_path / "out"
    assert run_cli("run", TINY, "--input", shard, "--output", out, *sum((["--set", s] for s in FAST), [])) == 0
    rows = {r["edit"]: r for r in rows_of(out)}
    assert rows["good"]["status"] == "ok" and rows["good"]["method"] == "per-frame"
    assert rows["bad"]["status"] == "failed" and "'bad'" in rows["bad"]["error"] and "pnp.f_t" in rows["bad"]["error"]
