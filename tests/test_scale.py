"""The driver at scale: brace expansion, set-based planning, aggregates in the done markers, a streaming
summary and a report that pages failures and samples successes. Small synthetic outputs, no model."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import braceexpand
import pytest

from vidbatch.config.schema import load_config
from vidbatch.core.aggregates import Dist, ShardAggregates
from vidbatch.dispatch.plan import plan_run, read_plan_file
from vidbatch.io.input_shards import expand_urls
from vidbatch.io.output_shards import read_rows
from vidbatch.report import write_report
from vidbatch.report.summary import build_summary, failure_cause, write_summary
from vidbatch.tools.bench.driver import make_synthetic_output, synthetic_row

from exact_figures import distribution, percentiles


def _expand_like_before(specs: list[str]) -> list[str]:
    """The expansion as it was written first (a list searched for each URL): the reference for order."""
    urls: list[str] = []
    for spec in specs:
        for url in braceexpand.braceexpand(spec):
            if url not in urls:
                urls.append(url)
    return urls


@pytest.mark.parametrize("specs", [
    ["data/part-{000000..000011}.tar"],
    ["a/{x,y}-{3..1}.tar", "a/x-{1..4}.tar", "a/{y,x}-2.tar"],
    ["pipe:curl -s http://h/{a,b}/s-{00..03}.tar", "pipe:curl -s http://h/a/s-{03..00}.tar"],
    ["s3://b/p/{0..2}/{0..2}.tar", "s3://b/p/1/{2..0}.tar", "plain.tar", "plain.tar"],
    ["x-{1..20..3}.tar", "x-{a..e}.tar", "x-{1..20}.tar"],
])
def test_brace_expansion_equals_the_first_implementation_in_order(specs):
    assert expand_urls(specs) == _expand_like_before(specs)
    assert expand_urls(specs[0]) == _expand_like_before(specs[:1])


# ---------------------------------------------------------------------------------------------
# Aggregates in the done markers, and the summary made from them


def _summary(out: Path) -> dict:
    urls, stems = read_plan_file(out)
    return build_summary(out, load_config(out / "config.yaml"), stems, urls, {}, 1.0)


def _all_rows(out: Path):
    _, stems = read_plan_file(out)
    return [row for stem in stems for row in read_rows(out, stem)]


def test_summary_from_marker_aggregates_equals_the_summary_from_rows(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    make_synthetic_output(new, 7, 12, fail_every=5, markers="new")
    make_synthetic_output(old, 7, 12, fail_every=5, markers="old")
    assert "aggregates" in json.loads((new / "stats" / "part-000000.json").read_text())
    assert "aggregates" not in json.loads((old / "stats" / "part-000000.json").read_text())
    from_markers, from_rows = _summary(new), _summary(old)
    assert from_markers == from_rows
    # ... and both are what the rows say, computed here the plain way.
    rows = _all_rows(old)
    ok = [r for r in rows if r.ok]
    assert from_markers["edits"] == {"ok": len(ok), "failed": len(rows) - len(ok)}
    assert from_markers["quantiles"] == "exact"
    for key in ("warp_error", "interp_psnr", "clip_text"):
        assert from_markers["metrics"][key] == distribution([r.metrics[key] for r in ok])
    assert from_markers["metrics"]["clip_dir"] is None
    for stage in ("invert", "total"):
        assert from_markers["seconds_per_edit"][stage] == percentiles([r.seconds[stage] for r in ok])
    assert from_markers["peak_memory_mb"] == percentiles([r.peak_memory_mb for r in ok])
    causes = Counter(failure_cause(r.error, r.key) for r in rows if not r.ok)
    assert from_markers["failures_by_cause"] == dict(causes.most_common())
    assert from_markers["by_method"]["vidtome"]["edits"]["ok"] == len(ok)
    assert from_markers["metrics_cost"]["seconds"] == pytest.approx(sum(r.seconds["metrics"] for r in ok), abs=1e-3)
    assert sum(from_markers["distributions"]["stage:total"]["counts"]) == len(ok)


def test_a_mix_of_old_and_new_markers_summarises_like_all_new(tmp_path):
    new, mixed = tmp_path / "new", tmp_path / "mixed"
    make_synthetic_output(new, 5, 6, markers="new")
    make_synthetic_output(mixed, 5, 6, markers="new")
    for stem in ("part-000001", "part-000003"):
        path = mixed / "stats" / f"{stem}.json"
        data = json.loads(path.read_text())
        data["aggregates"] = None
        path.write_text(json.dumps(data))
    assert _summary(mixed) == _summary(new)


def test_a_dist_past_its_exact_limit_gives_quantiles_within_one_percent():
    rng = random.Random(3)
    values = [rng.lognormvariate(1, 1.5) for _ in range(3000)] + [0.0] * 20 + [-rng.uniform(1, 5) for _ in range(80)]
    parts = [Dist() for _ in range(7)]
    for i, v in enumerate(values):
        parts[i % 7].add(v, exact_limit=50)
    merged = Dist()
    for part in reversed(parts):   # any order
        merged.merge(Dist.from_json(json.loads(json.dumps(part.to_json()))), exact_limit=100)
    assert not merged.exact and merged.n == len(values)
    ordered = sorted(values)
    for q in (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0):
        want = ordered[int(round(q * (len(ordered) - 1)))]
        assert merged.quantile(q) == pytest.approx(want, rel=0.0101, abs=1e-12)
    assert merged.mean() == pytest.approx(sum(values) / len(values))
    assert (merged.low, merged.high) == (ordered[0], ordered[-1])
    assert sum(merged.histogram()["counts"]) == len(values)


def test_shard_aggregates_round_trip_and_merge_counts():
    rng = random.Random(1)
    rows = [synthetic_row(rng, f"k{i // 2}", ("ink", "oil")[i % 2], i % 4 == 3, i) for i in range(16)]
    agg = ShardAggregates.from_rows(rows)
    again = ShardAggregates.from_json(json.loads(json.dumps(agg.to_json())))
    assert again == agg
    assert ShardAggregates.from_json({"version": 999}) is None   # another layout: read the rows
    agg.merge(again)
    assert sum(m.ok + m.failed for m in agg.methods.values()) == 2 * len(rows)


# ---------------------------------------------------------------------------------------------
# Planning from one listing


def test_planning_from_one_listing_skips_done_redoes_damaged_and_takes_absent(tmp_path):
    out = tmp_path / "out"
    [spec] = make_synthetic_output(out, 6, 4, fail_every=7)   # rows 6, 13, 20 fail: shards 1, 3, 5
    config_hash = json.loads((out / "stats" / "part-000000.json").read_text())["config_hash"]
    (out / "stats" / "part-000002.json").unlink()                    # absent
    with open(out / "stats" / "part-000004.jsonl", "a") as f:         # damaged: another size
        f.write("\n")
    (out / "stats" / "part-000005.json").write_text("garbage{")       # damaged: unreadable marker
    plan = plan_run([spec], out, False, config_hash=config_hash)
    assert [plan.stems[i] for i in plan.todo] == ["part-000002", "part-000004", "part-000005"]
    assert set(plan.redo) == {"part-000004", "part-000005"}
    assert "bytes" in plan.redo["part-000004"]
    retry = plan_run([spec], out, False, retry_failed=True, config_hash=config_hash)
    assert {retry.stems[i] for i in retry.retry} == {"part-000001", "part-000003"}


# ---------------------------------------------------------------------------------------------
# The report: every failure (paged), a bounded, reproducible sample of successes


def _table_rows(html: str) -> list[tuple[str, str, str, bool]]:
    """(shard, key, edit, failed) of each row of a page's table."""
    return [(shard, key, edit, bool(cls)) for key, edit, cls, shard in re.findall(
        r'<tr data-i="\d+" data-key="([^"]+)" data-edit="([^"]+)"( class="failed")?><td data-v="([^/"]+)/', html)]


def test_a_report_of_many_rows_has_every_failure_and_a_bounded_reproducible_sample(tmp_path):
    out = tmp_path / "out"
    make_synthetic_output(out, 30, 10, fail_every=3)          # 300 rows: 100 failed, 200 ok
    write_summary(out, _summary(out))
    assert write_report(out, strict=True, sample_ok=20, failures_per_page=30) == out / "report.html"
    page = (out / "report.html").read_text()
    shown = _table_rows(page)
    assert sum(not failed for *_, failed in shown) == 20
    assert sum(failed for *_, failed in shown) == 30
    _, stems = read_plan_file(out)
    every = [(stem, r.key, r.edit, not r.ok) for stem in stems for r in read_rows(out, stem)]
    # The table keeps input order; its failures are the first 30, the rest on pages 2..4.
    assert shown == sorted(shown, key=every.index)
    pages = sorted((out / "report_media").glob("failures-*.html"))
    assert [p.name for p in pages] == ["failures-0002.html", "failures-0003.html", "failures-0004.html"]
    assert all(f'href="report_media/{p.name}"' in page for p in pages)
    paged = [row for p in pages for row in _table_rows(p.read_text())]
    assert all(failed for *_, failed in paged) and all('href="../report.html"' in p.read_text() for p in pages)
    assert [r for r in shown if r[3]] + paged == [r for r in every if r[3]]
    # The sample: the successes whose shard/key/edit hash lowest, so a rebuild shows the same ones.
    ok = [r for r in every if not r[3]]
    lowest = sorted(ok, key=lambda r: hashlib.sha1(f"{r[0]}/{r[1]}/{r[2]}".encode()).digest())[:20]
    assert sorted(r for r in shown if not r[3]) == sorted(lowest)
    write_report(out, strict=True, sample_ok=20, failures_per_page=30)
    assert _table_rows((out / "report.html").read_text()) == shown
    # The charts are over every edit, from the summary's distributions.
    assert page.count("edits per bin") >= 4 and "200 successful edits" in page.replace(",", "")
