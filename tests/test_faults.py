"""Failure taxonomy: what counts as the device's fault, the sample's, or a transient out of memory.

The classification is checked on the exceptions torch itself raises; the out-of-memory retry runs the
real pipeline (local backend, tiny model) on a device whose memory is limited by the test-only
`VIDBATCH_TEST_MAX_CHUNK_FRAMES` hook (a UNet call on more frames raises torch.OutOfMemoryError).
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAST, TINY, read_output, run_cli, video_sample, write_shard
from vidbatch.core.faults import InfrastructureError, is_infrastructure_error, is_out_of_memory


def test_device_errors_are_infrastructure_and_out_of_memory_is_transient():
    cuda = RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA")
    assert is_infrastructure_error(cuda) and not is_out_of_memory(cuda)
    if hasattr(torch, "AcceleratorError"):  # what torch raises for CUDA errors since 2.8
        assert is_infrastructure_error(torch.AcceleratorError("CUDA error: unspecified launch failure"))
    assert is_infrastructure_error(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))
    assert is_infrastructure_error(InfrastructureError("worker hung"))
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_out_of_memory(oom) and not is_infrastructure_error(oom)
    # The cause travels wrapped (Ray's RayTaskError keeps it as `cause`, Python chains keep __cause__).
    wrapper = Exception("task failed")
    wrapper.cause = cuda  # type: ignore[attr-defined]
    assert is_infrastructure_error(wrapper)
    try:
        try:
            raise oom
        except torch.OutOfMemoryError as exc:
            raise ValueError("edit failed") from exc
    except ValueError as chained:
        assert is_out_of_memory(chained) and not is_infrastructure_error(chained)
    # A sample's own problems are neither.
    for sample_error in (ValueError("bad frame count"), RuntimeError("shape mismatch [4, 3] vs [4, 4]")):
        assert not is_infrastructure_error(sample_error) and not is_out_of_memory(sample_error)


def _run_one_sample(tmp_path, clips, sets: list[str]) -> tuple[int, dict, str]:
    write_shard(tmp_path / "in" / "p0.tar", [video_sample("v0", clips["pattern"])])
    out = tmp_path / "out"
    args = ["run", TINY, "--input", tmp_path / "in" / "p0.tar", "--output", out,
            *sum((["--set", s] for s in [*FAST, "video.max_frames=4", "merge.chunk_size=4",
                                           "inversion.cache=false", *sets]), [])]
    code = run_cli(*args)
    row = json.loads((out / "stats" / "p0.jsonl").read_text().splitlines()[0])
    return code, row, (out / "run.log").read_text()


def test_out_of_memory_is_retried_once_with_smaller_chunks(tmp_path, clips, monkeypatch):
    monkeypatch.setenv("VIDBATCH_TEST_MAX_CHUNK_FRAMES", "2")  # chunks of 4 frames do not fit, 2 do
    code, row, log = _run_one_sample(tmp_path, clips, [])
    assert code == 0
    assert row["status"] == "ok" and row["error"] is None and row["frames"] == 4
    assert "sample v0 ran out of memory" in log and "chunks half as large" in log


def test_out_of_memory_twice_is_a_failed_row_naming_it(tmp_path, clips, monkeypatch):
    monkeypatch.setenv("VIDBATCH_TEST_MAX_CHUNK_FRAMES", "1")  # halving 4 to 2 is not enough
    code, row, _ = _run_one_sample(tmp_path, clips, [])
    assert code == 0  # a failed sample does not fail the shard
    assert row["status"] == "failed" and row["error"].startswith("OutOfMemoryError: out of memory")


def test_retry_failed_redoes_only_the_failed_samples_of_a_finished_output(tmp_path, clips):
    """A first run where sample b is not a video (the input is fixed afterwards), then `--retry-failed` on
    the finished output: b is edited, a stays byte for byte (its row too, timings included, so it was
    copied, not edited again), and a shard without failures is not touched at all."""
    good_a = video_sample("a", clips["fractal"])
    write_shard(tmp_path / "in" / "p0.tar", [good_a, {"__key__": "b", "mp4": b"not a video" * 50, "txt": "x"}])
    write_shard(tmp_path / "in" / "p1.tar", [video_sample("c", clips["cells"])])
    out = tmp_path / "out"
    sets = sum((["--set", s] for s in [*FAST, "video.max_frames=4", "inversion.cache=false"]), [])
    args = ["run", TINY, "--input", tmp_path / "in" / "p{0..1}.tar", "--output", out, *sets]
    assert run_cli(*args) == 0
    first = {row["key"]: row for row in map(json.loads, (out / "stats" / "p0.jsonl").read_text().splitlines())}
    assert first["a"]["status"] == "ok" and first["b"]["status"] == "failed" and "cannot decode" in first["b"]["error"]
    kept_a = read_output(out / "shards" / "p0.tar")["a"]
    untouched = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in
                 (out / "shards" / "p1.tar", out / "stats" / "p1.jsonl", out / "stats" / "p1.json")}

    write_shard(tmp_path / "in" / "p0.tar", [good_a, video_sample("b", clips["pattern"])])  # the input fixed
    assert run_cli(*args) == 0  # a plain rerun: every shard is done, nothing is redone
    assert json.loads((out / "stats" / "p0.json").read_text())["samples_failed"] == 1
    assert run_cli(*args, "--retry-failed") == 0
    redone = read_output(out / "shards" / "p0.tar")
    assert list(redone) == ["a", "b"]
    assert all(redone["a"][k] == kept_a[k] for k in ("watercolor.mp4", "json"))
    rows = {row["key"]: row for row in map(json.loads, (out / "stats" / "p0.jsonl").read_text().splitlines())}
    assert rows["a"] == first["a"] and rows["b"]["status"] == "ok" and rows["b"]["frames"] == 4
    assert json.loads(redone["b"]["json"])["rows"][0]["status"] == "ok"
    marker = json.loads((out / "stats" / "p0.json").read_text())
    assert marker["samples"] == 2 and marker["samples_failed"] == 0 and marker["frames"] == 8
    for path, (data, mtime) in untouched.items():
        assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == {"total": 3, "ok": 3, "failed": 0}
    assert not list(out.rglob("*.tmp"))
