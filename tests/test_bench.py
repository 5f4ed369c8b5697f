"""`vidbatch bench`: its JSON rows, the FLOP counting it relies on, its memory meter. No timing assertions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from vidbatch.tools.bench.flops import SyncOpCounter, probe_unet_flops
from vidbatch.tools.bench.main import native_size
from vidbatch.tools.bench.sampler import PeakMemory
from vidbatch.tools.bench.spec import REQUIRED_FIELDS
from vidbatch.tools.bench.tables import markdown_table
from vidbatch.engine.editor import EditorSettings, VideoEditor
from vidbatch.models.loading import load_pipeline


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


def test_bench_cli_prints_one_json_row_per_method(capsys):
    code = run_cli("bench", "--model", "tiny", "--frames", "4", "--steps", "2", "--json",
                   "--methods", "per-frame", "vidtome")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert code == 0
    rows = [json.loads(line) for line in lines]  # every stdout line is one JSON object
    assert [r["method"] for r in rows] == ["per-frame", "vidtome"]
    for row in rows:
        assert "error" not in row, row.get("error")
        assert set(REQUIRED_FIELDS) <= set(row)
        assert row["frames"] == 4 and row["steps"] == 2
        assert row["size"] == 64  # the tiny model's own resolution (8x8 latent x 8)
        assert row["invert_s_per_frame"] > 0 and row["edit_s_per_frame"] > 0
        assert row["edit_s_per_frame"] >= row["decode_s_per_frame"] > 0
        assert 50 < row["peak_memory_mb"] < 50_000  # a Python process with torch, nothing absurd
        assert 0 <= row["activation_memory_mb"] <= row["peak_memory_mb"]
        # 2 inversion steps of one branch; PnP: [source, uncond, cond] on step 0, [uncond, cond] on step 1.
        assert row["unet_samples_per_frame_invert"] == 2
        assert row["unet_samples_per_frame_edit"] == 5
        assert row["unet_gflop_per_sample_invert"] > 0 and row["unet_gflop_per_sample_edit"] > 0
        expected = (2 * row["unet_gflop_per_sample_invert"] + 5 * row["unet_gflop_per_sample_edit"]) / 1e3
        assert row["unet_tflop_per_frame"] == pytest.approx(expected)
        assert row["device_peak_tflops"] > 0 and 0 < row["peak_fraction"]
    per_frame, vidtome = rows
    # Inversion is per-frame for every method; the edit differs (merged attention, matching).
    assert per_frame["unet_gflop_per_sample_invert"] == pytest.approx(vidtome["unet_gflop_per_sample_invert"])
    assert per_frame["unet_gflop_per_sample_edit"] == pytest.approx(per_frame["unet_gflop_per_sample_invert"])
    assert vidtome["unet_gflop_per_sample_edit"] != pytest.approx(per_frame["unet_gflop_per_sample_edit"])
    assert per_frame["device_peak_tflops"] == vidtome["device_peak_tflops"]  # one ceiling for the whole run
    assert per_frame["syncs_per_unet_call_edit"] == 0  # stock attention never reads a tensor back
    assert vidtome["syncs_per_unet_call_edit"] == 0   # merging decides on the device: no host reads inside the UNet


def test_sync_counter_counts_host_reads():
    x = torch.arange(6)
    with SyncOpCounter() as counter:
        x = x * 2 + 1                   # device work only
        assert counter.count == 0
        int(x[0])                       # .item()
        (x > 3).nonzero()               # data-dependent size
        bool(x.sum() > 0)               # Python truth value
    assert counter.count == 3


def test_bench_rejects_unknown_method(capsys):
    assert run_cli("bench", "--model", "tiny", "--frames", "2", "--methods", "per-frame", "nope", "--json") == 2
    assert "nope" in capsys.readouterr().out


def test_attention_flops_are_counted_on_cpu(pipe):
    """Extended minus per-frame attention is exactly the bigger score matrices: per sample and block,
    4*C*N^2*(F-1) FLOPs (QK^T and AV over F*N keys instead of N). Zero here would mean the CPU's fused
    SDPA kernel went uncounted."""
    frames = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    shapes = {}

    def record(name):
        def hook(module, args, kwargs):
            shapes[name] = kwargs.get("hidden_states", args[0] if args else None).shape
        return hook

    handles = [m.attn1.register_forward_pre_hook(record(n), with_kwargs=True)
               for n, m in pipe.unet.named_modules() if hasattr(m, "attn1")]
    try:
        per_frame = probe_unet_flops(VideoEditor(pipe, EditorSettings(method="per-frame", chunk_size=3)), frames)
    finally:
        for h in handles:
            h.remove()
    extended = probe_unet_flops(VideoEditor(pipe, EditorSettings(method="extended", chunk_size=3)), frames)
    assert shapes, "no self-attention block was seen"
    expected = sum(4 * c * n * n * (len(frames) - 1) for _, n, c in shapes.values())
    assert extended["edit"] - per_frame["edit"] == pytest.approx(expected)
    assert extended["invert"] == per_frame["invert"] == per_frame["edit"] > 0


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory(torch.device("cpu")) as meter:
        block = torch.ones(32 * 2**20 // 4)  # 32 MiB, touched
        meter.sample()
        del block
    assert meter.peak_bytes - meter.baseline_bytes >= 30 * 2**20


def test_native_size_and_markdown(pipe, hermetic_cache):
    from vidbatch.models.builtin import tiny_model_dir

    assert native_size(tiny_model_dir()) == 64
    assert native_size(None) is None
    table = markdown_table([{"method": "vidtome", "frames": 4, "size": 64, "invert_s_per_frame": 0.5,
                             "peak_fraction": 0.25},
                            {"method": "extended", "frames": 4, "size": 64, "error": "OutOfMemoryError: x"}])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| vidtome | 4 | 64 | 0.5 |") and "25.0%" in lines[2]
    assert "failed: OutOfMemoryError" in lines[3]


def test_the_gpu_script_runs_the_bench_with_valid_arguments(capsys):
    """Every GPU measurement is a `vidbatch bench` command line the CLI parses, with settings the config
    accepts for each of its methods (running them takes a GPU; the script must not fail on a typo there)."""
    from vidbatch.cli import build_parser
    from vidbatch.tools.bench.gpu import commands
    from vidbatch.tools.bench.spec import BenchSpec, bench_config

    parser = build_parser()
    measured, batched = set(), set()
    for label, command, _ in commands():
        args = parser.parse_args(command[command.index("bench"):])
        assert (args.model, args.size, args.steps, args.dtype) == ("sd15-random", 512, 50, "float16"), label
        for method in args.methods:
            config = bench_config(BenchSpec(model="tiny", method=method, frames=args.frames[0], clip_path="unused",
                                            size=args.size, steps=args.steps, control=args.control,
                                            dtype=args.dtype, overrides=args.overrides))
            assert (config.edit.method, config.edit.steps, config.video.size) == (method, 50, 512), label
            measured.add((method, args.frames[0], args.compile, config.merge.chunk_size))
            batched.update((method, args.frames[0], n) for n in args.batch_videos if n > 1)
    # What BENCHMARKS.md's GPU table asks for: every method at 32 frames, vidtome at 128 (memory flat),
    # extended over the whole 32-frame clip (the memory reference), vidtome compiled, videodirector.
    for method in ("per-frame", "extended", "vidtome", "tokenflow"):
        assert (method, 32, False, 4) in measured
    assert {("vidtome", 128, False, 4), ("extended", 32, False, 32), ("vidtome", 32, True, 4)} <= measured
    assert any(method == "videodirector" for method, *_ in measured)
    # Short clips several to a UNet call (runtime.batch_videos), against one at a time.
    assert ("vidtome", 8, False, 4) in measured and {("vidtome", 8, 4), ("vidtome", 8, 8)} <= batched
