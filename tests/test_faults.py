"""Failure taxonomy: what counts as the device's fault, the sample's, or a transient out of memory.

The classification is checked on the exceptions torch itself raises; the out-of-memory retry runs the
real pipeline (local backend, tiny model) on a device whose memory is limited by the test-only
`VIDBATCH_TEST_MAX_CHUNK_FRAMES` hook (a UNet call on more frames raises torch.OutOfMemoryError).
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAST, TINY, run_cli, video_sample, write_shard
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


def test_out_of_memory_is_retried_once_with_smaller_chunks(tmp_path, clips, monkeypatch, one_thread):
    monkeypatch.setenv("VIDBATCH_TEST_MAX_CHUNK_FRAMES", "2")  # chunks of 4 frames do not fit, 2 do
    code, row, log = _run_one_sample(tmp_path, clips, [])
    assert code == 0
    assert row["status"] == "ok" and row["error"] is None and row["frames"] == 4
    assert "sample v0 ran out of memory" in log and "chunks half as large" in log


def test_out_of_memory_twice_is_a_failed_row_naming_it(tmp_path, clips, monkeypatch, one_thread):
    monkeypatch.setenv("VIDBATCH_TEST_MAX_CHUNK_FRAMES", "1")  # halving 4 to 2 is not enough
    code, row, _ = _run_one_sample(tmp_path, clips, [])
    assert code == 0  # a failed sample does not fail the shard
    assert row["status"] == "failed" and row["error"].startswith("OutOfMemoryError: out of memory")
