"""Metrics in a real run, the run summary, and the HTML report (also checked in headless Chromium).

The known answers of the metric functions themselves are in test_metrics.py; here they are checked
as wired into the pipeline: which frames they see, where the values land, how a missing CLIP model
is reported, and that the report page is complete, self-contained and works in a browser.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
from rich.console import Console

import vidbatch.batch.module as lm
from conftest import FAST, TINY, read_output, run_cli, video_sample, write_shard
from vidbatch.core.aggregates import Dist
from vidbatch.core.rows import DoneMarker
from vidbatch.metrics import METRIC_KEYS, compute_metrics
from vidbatch.metrics.clip import resolve_clip_model
from vidbatch.report import write_report
from vidbatch.report.charts import MAX_BARS, _nice_ceiling, svg_bars
from vidbatch.report.media import SHEET_FRAMES, SHEET_HEIGHT, contact_sheet
from vidbatch.report.summary import print_summary
from vidbatch.io.video import decode_video

EDITS = 'edits=[{"name": "ink", "prompt": "{prompt}, ink drawing"}, {"name": "neon", "prompt": "neon glow"}]'
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def sets(*extra: str) -> list[str]:
    return sum((["--set", s] for s in [*FAST, *extra]), [])


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((out / "stats").glob("*.jsonl")) for line in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def metrics_run(tmp_path_factory, clips):
    """Two shards (one with a corrupt sample), two edits, every metric on with the tiny CLIP.

    `compute_metrics` is wrapped to record what the pipeline passes it.
    """
    root = tmp_path_factory.mktemp("report")
    write_shard(root / "in" / "a-000.tar", [video_sample("pattern", clips["pattern"]),
                                            {"__key__": "corrupt", "mp4": b"\x00not a video" * 300, "txt": "x"}])
    write_shard(root / "in" / "a-001.tar", [video_sample("cells", clips["cells"])])
    out = root / "out"
    calls: list[dict] = []

    def recording(source, edited, prompt, source_prompt, **kwargs):
        result = compute_metrics(source, edited, prompt, source_prompt, **kwargs)
        calls.append(dict(source=np.array(source), edited=np.array(edited), prompt=prompt, source_prompt=source_prompt,
                          kwargs=kwargs, result=result))
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm, "compute_metrics", recording)
        code = run_cli("run", TINY, "--input", root / "in" / "a-{000..001}.tar", "--output", out,
                       *sets(EDITS, "metrics.clip_model=tiny"))
    return code, root, out, calls


def test_rows_carry_finite_metrics_in_range(metrics_run, hermetic_cache):
    code, root, out, calls = metrics_run
    assert code == 0
    rows = read_rows(out)
    ok = [r for r in rows if r["status"] == "ok"]
    assert [(r["key"], r["edit"]) for r in ok] == [("pattern", "ink"), ("pattern", "neon"), ("cells", "ink"),
                                                   ("cells", "neon")]
    clip_dir = hermetic_cache / "models" / "tiny-clip"
    for r in ok:
        m = r["metrics"]
        assert set(m) == set(METRIC_KEYS)
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values()), m
        assert 0.0 <= m["warp_error"] <= 1.0
        assert 0.0 < m["interp_psnr"] <= 100.0
        for key in ("clip_text", "clip_frame", "clip_dir"):
            assert -1.0 <= m[key] <= 1.0
        assert r["metrics_by"] == {"flow": "dis", "clip": str(clip_dir), "clip_off": None}
        assert r["metrics_error"] is None
        assert list(r["seconds"]) == ["decode", "invert", "edit", "encode", "metrics", "total"]
        assert r["seconds"]["metrics"] > 0
        assert r["seconds"]["total"] == pytest.approx(
            sum(v for k, v in r["seconds"].items() if k != "total"), abs=1e-3)
        assert re.fullmatch(r"[0-9a-f]{32}", r["model_fingerprint"])  # computed for the inversion cache
    failed = [r for r in rows if r["status"] != "ok"]
    assert [r["key"] for r in failed] == ["corrupt", "corrupt"]
    for r in failed:
        assert r["metrics"] == dict.fromkeys(METRIC_KEYS) and r["seconds"]["metrics"] == 0.0
    # The {key}.json rows inside the output shard are the same rows.
    record = json.loads(read_output(out / "shards" / "a-000.tar")["pattern"]["json"])
    assert record["rows"] == [r for r in rows if r["key"] == "pattern"]
    # The tiny CLIP was built once, atomically, into the cache.
    assert (clip_dir / "preprocessor_config.json").is_file() and (clip_dir / "model.safetensors").is_file()
    assert not [p for p in clip_dir.parent.iterdir() if p.name.startswith(".tiny-clip")]


def test_metrics_see_the_decoded_source_frames_and_the_edited_frames(metrics_run, clips):
    code, root, out, calls = metrics_run
    by_prompt = {c["prompt"]: c for c in calls}
    assert len(calls) == 4 and set(by_prompt) == {"a test clip, ink drawing", "neon glow"}
    rows = {(r["key"], r["edit"]): r for r in read_rows(out)}
    pattern = [c for c in calls if c["source"].shape[0] == rows[("pattern", "ink")]["frames"]
               and c["source"].shape[2] == rows[("pattern", "ink")]["width"]]
    assert len(pattern) == 2
    # warp_error's flow runs on the SOURCE: exactly the frames the pipeline decoded and edited.
    source = decode_video(clips["pattern"].read_bytes(), "mp4", short_side=32, multiple=16, max_frames=16).frames
    for call in pattern:
        assert np.array_equal(call["source"], source)
        assert call["source_prompt"] == "a test clip"
        assert call["kwargs"] == {"warp": True, "interp": True, "clip": call["kwargs"]["clip"], "flow_method": "dis"}
        assert call["kwargs"]["clip"] is not None
    # ... and the edited frames are the ones encoded into the shard (up to H.264 loss, which is
    # large on 48x32 noise-like frames: compare with the other edit's frames).
    ink = next(c for c in pattern if c["prompt"] == "a test clip, ink drawing")
    neon = next(c for c in pattern if c["prompt"] == "neon glow")
    encoded = decode_video(read_output(out / "shards" / "a-000.tar")["pattern"]["ink.mp4"], "mp4",
                           short_side=None, multiple=2).frames.astype(int)
    assert encoded.shape == ink["edited"].shape
    assert np.abs(encoded - ink["edited"]).mean() < 0.6 * np.abs(encoded - neon["edited"]).mean()
    assert rows[("pattern", "ink")]["metrics"] == ink["result"]


def test_summary_has_metric_stats_and_names_clip_and_flow(metrics_run):
    code, root, out, calls = metrics_run
    summary = json.loads((out / "summary.json").read_text())
    ok = [r for r in read_rows(out) if r["status"] == "ok"]
    for key in METRIC_KEYS:
        values = sorted(r["metrics"][key] for r in ok)
        stats = summary["metrics"][key]
        assert stats["n"] == 4
        assert stats["mean"] == pytest.approx(sum(values) / 4)
        assert stats["min"] == values[0] and stats["max"] == values[-1]
        assert values[0] <= stats["p10"] <= stats["p50"] <= stats["p90"] <= values[-1]
    by = summary["metrics_by"]
    assert by["flow"] == "dis" and "DIS" in by["flow_impl"] and "source frames" in by["flow_impl"]
    assert by["clip_model"].endswith("tiny-clip") and by["clip_off"] is None
    assert summary["seconds_per_edit"]["metrics"]["mean"] > 0
    cost = summary["metrics_cost"]
    assert cost["seconds"] == pytest.approx(sum(r["seconds"]["metrics"] for r in ok), abs=1e-3)
    assert 0 < cost["share_of_total"] < 1 and cost["failed"] == 0
    assert summary["model_version"]["id"] == "tiny"
    assert summary["model_version"]["fingerprint"] == ok[0]["model_fingerprint"]
    assert summary["packages"]["torch"] and summary["packages"]["diffusers"]
    # The keys other tools and tests read are all still there.
    for key in ("samples", "edits", "failures_by_cause", "throughput", "device_hours", "config_hash", "inputs"):
        assert key in summary
    console = Console(record=True, width=300)
    print_summary(summary, console, out)
    text = console.export_text()
    assert "CLIP model" in text and "warp error" in text and "tiny-clip" in text
    assert f"{summary['metrics']['clip_frame']['mean']:.4g}" in text


def test_report_page_lists_every_row_with_its_media(metrics_run):
    code, root, out, calls = metrics_run
    page = (out / "report.html").read_text()
    rows = read_rows(out)
    for r in rows:
        assert f'data-key="{r["key"]}" data-edit="{r["edit"]}"' in page
    failed_row = re.search(r'<tr data-i="\d+" data-key="corrupt" data-edit="ink" class="failed">(.*?)</tr>', page)
    assert failed_row and "cannot decode corrupt.mp4" in failed_row.group(1)
    # Self-contained: no external resources; every media reference is a file beside the page.
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<link" not in page
    refs = re.findall(r'(?:src|poster)="([^"]+)"', page)
    assert refs and all((out / ref).is_file() for ref in refs), refs
    assert all(ref.startswith("report_media/") for ref in refs)
    media = out / "report_media"
    assert sorted(p.name for p in (media / "a-000").iterdir()) == [
        "pattern.ink.jpg", "pattern.ink.mp4", "pattern.neon.jpg", "pattern.neon.mp4",
        "pattern.source.jpg", "pattern.source.mp4"]
    # The source plays frame for frame beside the edit: same frame count and size.
    src = decode_video((media / "a-000" / "pattern.source.mp4").read_bytes(), "mp4", short_side=None, multiple=2)
    edited = decode_video((media / "a-000" / "pattern.ink.mp4").read_bytes(), "mp4", short_side=None, multiple=2)
    assert src.frames.shape == edited.frames.shape
    assert src.fps == pytest.approx(edited.fps)
    assert (media / "a-000" / "pattern.ink.mp4").read_bytes() == read_output(out / "shards" / "a-000.tar")["pattern"]["ink.mp4"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_contact_sheets_replace_videos_above_max_videos(metrics_run, tmp_path):
    code, root, out, calls = metrics_run
    copy = shutil.copytree(out, tmp_path / "out")
    assert write_report(copy, max_videos=3, strict=True) == copy / "report.html"
    files = sorted(p.name for p in (copy / "report_media").rglob("*") if p.is_file())
    assert files == ["cells.ink.jpg", "cells.neon.jpg", "pattern.ink.jpg", "pattern.neon.jpg"]
    assert "<video" not in (copy / "report.html").read_text()
    sheet = cv2.cvtColor(cv2.imread(str(copy / "report_media" / "a-000" / "pattern.ink.jpg")), cv2.COLOR_BGR2RGB)
    assert sheet.shape[0] == 2 * SHEET_HEIGHT + 2  # source strip above the edit strip
    # The last tile of the edit strip is the last edited frame, scaled up.
    edited = decode_video(read_output(out / "shards" / "a-000.tar")["pattern"]["ink.mp4"], "mp4",
                          short_side=None, multiple=2).frames
    width = round(edited.shape[2] * SHEET_HEIGHT / edited.shape[1])
    x = 64 + (SHEET_FRAMES - 1) * (width + 2)
    tile = sheet[SHEET_HEIGHT + 2:, x:x + width]
    expected = cv2.resize(edited[-1], (width, SHEET_HEIGHT), interpolation=cv2.INTER_AREA)
    assert np.abs(tile.astype(int) - expected.astype(int)).mean() < 12


def test_missing_clip_model_nulls_clip_scores_says_why_once_and_report_rebuilds(tmp_path, clips):
    write_shard(tmp_path / "in" / "b.tar", [video_sample("fractal", clips["fractal"])])
    out = tmp_path / "out"
    missing = tmp_path / "no-such-clip"
    code = run_cli("run", TINY, "--input", tmp_path / "in" / "b.tar", "--output", out,
                   *sets(EDITS, f"metrics.clip_model={missing}"))
    assert code == 0
    rows = read_rows(out)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for r in rows:
        assert r["metrics"]["clip_text"] is None and r["metrics"]["clip_frame"] is None
        assert r["metrics"]["clip_dir"] is None
        assert r["metrics"]["warp_error"] is not None and r["metrics"]["interp_psnr"] is not None
    summary_text = (out / "summary.json").read_text()
    summary = json.loads(summary_text)
    assert summary["metrics"]["clip_text"] is None and summary["metrics"]["warp_error"]["n"] == 2
    assert summary["metrics_by"]["clip_model"] is None
    assert str(missing) in summary["metrics_by"]["clip_off"]
    assert summary_text.count("could not be loaded") == 1  # said once, not per row
    log_text = (out / "run.log").read_text()
    assert log_text.count("CLIP scores are off") == 1
    # The input shard goes away (as a pipe: URL may be at report time): rebuild shows the edits alone.
    (tmp_path / "in" / "b.tar").unlink()
    (out / "report.html").unlink()
    shutil.rmtree(out / "report_media")
    assert run_cli("report", out) == 0
    page = (out / "report.html").read_text()
    assert "source not available" in page and "no-such-clip" in page
    assert sorted(p.name for p in (out / "report_media" / "b").iterdir()) == [
        "fractal.ink.jpg", "fractal.ink.mp4", "fractal.neon.jpg", "fractal.neon.mp4"]
    assert run_cli("report", tmp_path / "nothing-here") == 2


def test_resolve_clip_model(tmp_path, hermetic_cache, monkeypatch):
    assert resolve_clip_model("none") == (None, "disabled") and resolve_clip_model(None) == (None, "disabled")
    assert resolve_clip_model(str(tmp_path / "x")) == (str(tmp_path / "x"), None)  # ClipScorer names a missing folder
    folder, reason = resolve_clip_model("tiny")
    assert reason is None and folder == str(hermetic_cache / "models" / "tiny-clip")
    # HF_HUB_OFFLINE is read when resolving (not at import): no hub retries, the reason at once.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    folder, reason = resolve_clip_model("vidbatch-test/no-such-clip-model")
    assert folder is None and "HF_HUB_OFFLINE" in reason and "vidbatch-test/no-such-clip-model" in reason


def test_distribution_and_plot_helpers():
    dist = Dist()
    for value in (5.0, 1.0, 3.0, 2.0, 4.0):
        dist.add(value)
    assert dist.distribution() == {"n": 5, "mean": 3.0, "min": 1.0, "p10": 1.0, "p50": 3.0, "p90": 5.0, "max": 5.0}
    assert dist.percentiles() == {"mean": 3.0, "p50": 3.0, "p90": 5.0, "max": 5.0}
    assert Dist().distribution() is None and Dist().percentiles() is None
    assert [_nice_ceiling(x) for x in (0.0, 0.7, 1.0, 1.2, 2.2, 4.9, 730.0)] == [1.0, 1.0, 1.0, 2.0, 2.5, 5.0, 1000.0]
    series = [{"a": 1.0, "b": 2.0}, {"a": 0.5, "b": 0.0}]
    svg = ET.fromstring(svg_bars(series, ["r1", "r2"], {"a": "#111", "b": "#222"}, title="t", unit="s"))
    ns = "{http://www.w3.org/2000/svg}"
    bars = [g for g in svg.iter(f"{ns}g")]
    assert [g.find(f"{ns}title").text for g in bars] == ["r1: a 1, b 2 s", "r2: a 0.5, b 0 s"]
    heights = [[float(r.get("height")) for r in g.iter(f"{ns}rect")] for g in bars]
    assert heights[0][1] == pytest.approx(2 * heights[0][0]) and len(heights[1]) == 1  # zero stages not drawn
    many = [{"a": float(i)} for i in range(3 * MAX_BARS)]
    svg = ET.fromstring(svg_bars(many, [str(i) for i in range(len(many))], {"a": "#111"}, title="t", unit="s"))
    assert len(list(svg.iter(f"{ns}g"))) == MAX_BARS  # means over consecutive rows beyond MAX_BARS


def test_contact_sheet_layout():
    frames = np.zeros((7, 20, 30, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(7)[:, None, None] * 30
    sheet = contact_sheet([("source", frames), ("edit", frames)], frames=3, height=40)
    assert sheet.shape == (2 * 40 + 2, 64 + 3 * (60 + 2), 3)
    # Frames 0, 3 and 6 (evenly spaced, ends included) in order.
    assert [int(sheet[10, 64 + i * 62 + 30, 0]) for i in range(3)] == [0, 90, 180]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_report_in_headless_chromium(metrics_run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary found (install it with `apt-get install -y chromium`, "
                    "or VIDBATCH_INSTALL_CHROMIUM=1 ./install.sh as root)")
    code, root, out, calls = metrics_run
    url = (out / "report.html").as_uri()
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", url + "#sort=warp_error:desc"],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-ready="1"' in html, "the page's script did not finish"
    errors = re.search(r'<div id="js-errors"([^>]*)>(.*?)</div>', html, re.S)
    assert errors and "hidden" in errors.group(1) and errors.group(2).strip() == "", errors.group(0)
    assert "Uncaught" not in dom.stderr
    assert 'data-sorted="warp_error:desc"' in html
    # The browser sorted the rows: warp error descending, rows without a value last.
    shown = re.findall(r'<tr data-i="\d+" data-key="([^"]+)" data-edit="([^"]+)"', html)
    rows = read_rows(out)
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -r["metrics"]["warp_error"])
    assert shown == [(r["key"], r["edit"]) for r in ok] + [("corrupt", "ink"), ("corrupt", "neon")]
    assert "showing 6 of 6 row(s)" in html

    shot = tmp_path / "report.png"
    run = subprocess.run([browser, *flags, "--window-size=1400,1800", f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    image = cv2.imread(str(shot))
    assert image.shape[:2] == (1800, 1400)
    assert image.std() > 20  # a rendered page, not a blank one


# --- a metric added through the registry alone ------------------------------------------------


def test_a_registered_metric_reaches_rows_summary_and_report(tmp_path):
    """One `register(Metric(...))` in this file, nothing else: the metric is computed with the
    others, gets its distribution in summary.json, its row in the console table, and its line and
    sortable column in the report."""
    from vidbatch.config.schema import load_config
    from vidbatch.metrics import Metric, metric_keys, register, unregister
    from vidbatch.report.summary import build_summary, write_summary

    def mean_brightness(inputs) -> float:
        return float(inputs.edited.mean() / 255.0)

    register(Metric("brightness", "mean brightness", "bright", "higher", mean_brightness))
    try:
        rng = np.random.default_rng(0)
        clip = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
        computed = compute_metrics(clip, clip, "p", "s", warp=True, interp=True, clip=None)
        assert list(computed) == [*METRIC_KEYS, "brightness"] == list(metric_keys())
        assert computed["brightness"] == pytest.approx(clip.mean() / 255.0)

        out = tmp_path / "out"
        (out / "stats").mkdir(parents=True)
        rows = [{"key": f"v{i}", "edit": "ink", "prompt": "p", "status": "ok", "error": None, "frames": 4,
                 "width": 16, "height": 16, "fps": 8.0, "peak_memory_mb": 100.0, "metrics_error": None,
                 "metrics": {**computed, "brightness": value},
                 "seconds": {"decode": 0.1, "invert": 0.2, "edit": 0.3, "encode": 0.1, "metrics": 0.1, "total": 0.8}}
                for i, value in enumerate((0.25, 0.75))]
        (out / "stats" / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        marker = DoneMarker(shard="s.tar", stem="s", samples=2, samples_ok=2, samples_failed=0, rows_ok=2, rows_failed=0,
                            frames=8, seconds=1.6, started_at="2026-01-01T00:00:00Z", finished_at="2026-01-01T00:00:02Z")
        (out / "stats" / "s.json").write_text(json.dumps(marker.to_json()))
        summary = build_summary(out, load_config(None), ["s"], ["s.tar"], {}, 2.0)
        assert summary["metrics"]["brightness"]["n"] == 2
        assert summary["metrics"]["brightness"]["mean"] == pytest.approx(0.5)
        write_summary(out, summary)
        assert json.loads((out / "summary.json").read_text())["metrics"]["brightness"]["max"] == 0.75

        console = Console(record=True, width=200)
        print_summary(summary, console, out)
        assert "mean mean brightness" in console.export_text()

        page = write_report(out, strict=True).read_text()
        assert "<th>mean brightness</th>" in page  # its line in the metric table
        assert 'data-col="brightness"' in page and ">bright</button>" in page  # its sortable column
        assert 'title="sort by mean brightness (higher is better)"' in page
        assert 'data-v="0.75"' in page
    finally:
        unregister("brightness")
    assert "brightness" not in metric_keys()


def test_report_write_failure_leaves_no_temporary(tmp_path, monkeypatch):
    """A report that fails half-way (here: rendering the page) leaves neither a temporary media
    folder nor a temporary page, and the previous report in place."""
    import vidbatch.report.page as page

    out = tmp_path / "out"
    (out / "stats").mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"inputs": []}))
    assert write_report(out, strict=True) is not None
    before = sorted(p.name for p in out.iterdir())

    def broken(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(page, "render_report", broken)
    with pytest.raises(RuntimeError, match="render failed"):
        write_report(out, strict=True)
    assert write_report(out) is None  # not strict: logged, no exception
    assert sorted(p.name for p in out.iterdir()) == before == ["report.html", "report_media", "stats", "summary.json"]
