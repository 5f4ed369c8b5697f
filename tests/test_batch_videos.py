"""Several videos' chunks in one UNet call (`runtime.batch_videos`): each video is edited as it is alone.

On the CPU a larger matrix product rounds differently, so batched latents match one-at-a-time ones to a
tight tolerance rather than bit for bit; VidToMe's merge decisions (which tokens merge where) must be
identical, which they would not be if a video's merging saw another video's tokens or random draws.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from conftest import FAST, TINY, moving_frames, read_output, video_sample, write_shard
from vidbatch.batch.module import VideoEditModule
from vidbatch.batch.shard import process_shard
from vidbatch.config.schema import load_config
from vidbatch.engine import memory
from vidbatch.engine.editor import TEST_MAX_CHUNK_ENV, DenoiseJob, VideoEditor, VideoRequest, method_for
from vidbatch.engine.method import EditorSettings
from vidbatch.engine.methods.vidtome import FrameAttnProcessor
from vidbatch.tools.bench.main import run_bench

# Clips of different lengths: the videos' chunk lists differ in count, so some calls hold fewer videos.
LENGTHS = (7, 5, 6)


class UnetCalls:
    """Records the batch size (rows) of every UNet call."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.rows: list[int] = []
        self._handle = unet.register_forward_pre_hook(lambda module, args: self.rows.append(int(args[0].shape[0])))

    def remove(self) -> None:
        self._handle.remove()


def invert_all(editor: VideoEditor, count: int = len(LENGTHS)):
    return [editor.invert(moving_frames(n, 32, seed=i), f"source {i}") for i, n in enumerate(LENGTHS[:count])]


def jobs_for(editor: VideoEditor, inversions) -> list[DenoiseJob]:
    return [DenoiseJob(method_for(editor.settings), inversion, f"edit {i}", seed=100 + i, source_prompt=f"source {i}")
            for i, inversion in enumerate(inversions)]


def test_vidtome_with_pnp_batched_equals_one_at_a_time_with_the_same_matchings(pipe, monkeypatch):
    editor = VideoEditor(pipe, EditorSettings(method="vidtome", control="pnp", steps=3, chunk_size=3,
                                              chunk_order="mix", guidance=5.0))
    inversions = invert_all(editor)
    # Every merge decision, with the processor state (one per video) that made it.
    decisions: list[tuple[object, str, list]] = []
    merge_chunk = FrameAttnProcessor.merge_chunk

    def recording(self, x, num_frames, num_branches, state=None):
        merged = merge_chunk(self, x, num_frames, num_branches, state)
        parts = [merged.local.keep, merged.local.back]
        if merged.glob is not None:
            parts += [merged.glob.keep, merged.glob.back]
        decisions.append((self.state if state is None else state, self.name, [p.clone() for p in parts]))
        return merged

    monkeypatch.setattr(FrameAttnProcessor, "merge_chunk", recording)
    calls = UnetCalls(pipe.unet)
    try:
        alone, alone_decisions = [], []
        for job in jobs_for(editor, inversions):
            decisions.clear()
            alone.append(editor.guided_denoise_videos([job])[0])
            alone_decisions.append([(name, parts) for _, name, parts in decisions])
        alone_calls, calls.rows = calls.rows, []
        decisions.clear()
        together = editor.guided_denoise_videos(jobs_for(editor, inversions))
    finally:
        calls.remove()
    # Batched: chunk i of every video in one call, so fewer and larger calls (3 branches x up to 3 frames each).
    assert len(calls.rows) < len(alone_calls) and max(calls.rows) > max(alone_calls) == 9
    for a, b in zip(alone, together):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=2e-4, rtol=0)
    states = list(dict.fromkeys(state for state, _, _ in decisions))  # in first-call order: the videos' order
    assert len(states) == len(LENGTHS)
    for video, state in enumerate(states):
        mine = [(name, parts) for s, name, parts in decisions if s is state]
        assert [name for name, _ in mine] == [name for name, _ in alone_decisions[video]]
        for (_, got), (_, want) in zip(mine, alone_decisions[video]):
            assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("method, control", [("extended", "none"), ("per-frame", "pnp")])
def test_batched_edit_equals_one_at_a_time(pipe, method, control):
    editor = VideoEditor(pipe, EditorSettings(method=method, control=control, steps=3, chunk_size=4, eta=0.3))
    requests = [VideoRequest(moving_frames(n, 32, seed=i), "a source", [("a", "a cat"), ("b", f"a dog {i}")],
                             seed=7, key=f"k{i}") for i, n in enumerate(LENGTHS)]
    calls = UnetCalls(pipe.unet)
    try:
        alone = [editor.edit(r.frames, r.source_prompt, r.edits, seed=r.seed, key=r.key) for r in requests]
        alone_calls, calls.rows = len(calls.rows), []
        together = editor.edit_videos(requests)
    finally:
        calls.remove()
    assert len(calls.rows) < alone_calls
    for one, many in zip(alone, together):
        assert list(many.frames) == ["a", "b"]
        for name in one.frames:
            diff = np.abs(one.frames[name].astype(int) - many.frames[name].astype(int))
            assert diff.max() <= 1, (name, diff.max())
    # The edits differ from each other (the comparison above is not trivially true).
    assert not np.array_equal(together[0].frames["a"], together[0].frames["b"])


def test_a_method_that_follows_one_video_falls_back_to_one_at_a_time(pipe, caplog):
    editor = VideoEditor(pipe, EditorSettings(method="tokenflow", control="pnp", steps=2, chunk_size=4))
    inversions = invert_all(editor, 2)
    alone = [editor.denoise_videos([job])[0] for job in jobs_for(editor, inversions)]
    calls = UnetCalls(pipe.unet)
    try:
        with caplog.at_level(logging.INFO, logger="vidbatch"):
            together = editor.denoise_videos(jobs_for(editor, inversions))
            editor.denoise_videos(jobs_for(editor, inversions))
    finally:
        calls.remove()
    for a, b in zip(alone, together):
        assert torch.equal(a, b)  # one at a time: the very same computation
    said = [r.getMessage() for r in caplog.records if "one video at a time" in r.getMessage()]
    assert len(said) <= 1 and all("tokenflow" in m for m in said)
    with pytest.raises(ValueError, match="does not edit several videos"):
        editor.guided_denoise_videos(jobs_for(editor, inversions))


def test_videos_of_different_sizes_do_not_share_calls(pipe):
    editor = VideoEditor(pipe, EditorSettings(method="vidtome", steps=2))
    inversions = [editor.invert(moving_frames(4, 32), ""), editor.invert(moving_frames(4, 16), "")]
    with pytest.raises(ValueError, match="latent size"):
        editor.guided_denoise_videos(jobs_for(editor, inversions))


def test_auto_batch_size_follows_the_memory_estimate(pipe):
    def editor(budget: int) -> VideoEditor:
        return VideoEditor(pipe, EditorSettings(method="vidtome", control="pnp", chunk_size=4,
                                                memory_budget_bytes=budget))

    probe = editor(2**40)
    assert probe.videos_per_call(8, (64, 64)) == 8  # a large budget: the cap
    method = method_for(probe.settings)
    one = method.chunk_bytes(4, (64, 64), branches=3, share=method.attended_share(), **probe._geometry())
    assert editor(int(3 * one / memory.BUDGET_SHARE) + 1).videos_per_call(8, (64, 64)) == 3
    assert editor(int(3 * one / memory.BUDGET_SHARE) + 1).videos_per_call(2, (64, 64)) > 3  # shorter chunks
    assert editor(one // 4).videos_per_call(8, (64, 64)) == 1


@pytest.fixture(scope="module")
def module(clips):
    config = load_config(TINY, [*FAST, "runtime.batch_videos=2", "metrics.warp_error=false",
                                "metrics.interp_psnr=false", "metrics.clip_model=none"])
    return VideoEditModule(config)


def test_shard_batched_writes_the_same_samples_in_order_and_a_bad_video_fails_alone(module, clips, tmp_path):
    # Pairs of consecutive samples: [a, d] edit together; [b, e] fail together (b has no prompt for
    # "{prompt}") and are edited again one at a time, so only b fails; [f] is alone (another size).
    samples = [video_sample("a", clips["pattern"]), video_sample("d", clips["pattern"], "a dog"),
               video_sample("b", clips["pattern"], prompt=None), video_sample("e", clips["pattern"], "an elk"),
               video_sample("f", clips["cells"])]
    url = str(write_shard(tmp_path / "in.tar", samples))
    outputs, rows = {}, {}
    calls = UnetCalls(module.editor.unet)
    try:
        for batch in (2, 1):
            module.config.runtime.batch_videos = batch
            # Batched with background finishing: the writer queues a list of results and keeps their order.
            module.config.runtime.finishing = "background" if batch == 2 else "inline"
            calls.rows = []
            process_shard(module, url, "in", tmp_path / str(batch))
            outputs[batch] = read_output(tmp_path / str(batch) / "shards" / "in.tar")
            rows[batch] = [json.loads(line) for line in
                           (tmp_path / str(batch) / "stats" / "in.jsonl").read_text().splitlines()]
            if batch == 2:
                batched_rows = max(calls.rows)
            else:
                single_rows = max(calls.rows)
    finally:
        calls.remove()
        module.config.runtime.batch_videos, module.config.runtime.finishing = 2, "auto"
    assert batched_rows > single_rows  # the batched run did put two videos in one call
    assert list(outputs[2]) == list(outputs[1]) == ["a", "d", "b", "e", "f"]
    for key in outputs[1]:
        assert sorted(outputs[2][key]) == sorted(outputs[1][key])
    assert [(r["key"], r["status"]) for r in rows[2]] == [(r["key"], r["status"]) for r in rows[1]] == [
        ("a", "ok"), ("d", "ok"), ("b", "failed"), ("e", "ok"), ("f", "ok")]
    assert "no prompt" in rows[2][2]["error"] and rows[2][2]["error"] == rows[1][2]["error"]


def test_bench_measures_several_videos_per_call(hermetic_cache):
    rows = list(run_bench("tiny", ["per-frame"], [4], size=32, steps=2, control="none", batch_videos=[1, 2],
                          overrides=["merge.chunk_order=seq"], isolate=False))
    assert [(r.get("error"), r["batch_videos"], r["frames"]) for r in rows] == [(None, 1, 4), (None, 2, 4)]
    one, two = rows
    # The same work per frame in fewer, larger edit calls: inversion 2 calls per video, edit 2 instead of 4
    # (one chunk of 4 frames per step).
    assert one["unet_samples_per_frame_edit"] == two["unet_samples_per_frame_edit"] == 4
    assert one["unet_calls"] == 2 + 2 and two["unet_calls"] == 2 * 2 + 2


def test_a_batch_out_of_memory_is_edited_one_video_at_a_time(module, clips, tmp_path, monkeypatch, caplog):
    # A device that holds one video's chunk (4 frames) but not two: the batched call runs out of memory.
    monkeypatch.setenv(TEST_MAX_CHUNK_ENV, "4")
    url = str(write_shard(tmp_path / "in.tar", [video_sample("a", clips["pattern"]),
                                                video_sample("d", clips["pattern"], "a dog")]))
    with caplog.at_level(logging.WARNING, logger="vidbatch"):
        process_shard(module, url, "in", tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "stats" / "in.jsonl").read_text().splitlines()]
    assert [(r["key"], r["status"]) for r in rows] == [("a", "ok"), ("d", "ok")]
    assert any("editing videos a, d together failed (OutOfMemoryError" in r.getMessage() for r in caplog.records)
