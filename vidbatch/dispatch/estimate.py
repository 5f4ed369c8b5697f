"""`vidbatch run --dry-run`: the plan of a run (shards, samples, edits, frames) and its estimated GPU-hours,
from the shards' tar headers, their prompt members and a few probed videos. Nothing is written and no
model is loaded.

The GPU-hours are an estimate from the UNet's arithmetic, not a measurement:
    frames x UNet passes per frame x TFLOP per pass / assumed throughput,
where a pass is one frame of one guidance branch at one step (inversion: 1 branch a step; each edit:
`edit.steps` x its branches, 3 with PnP's source branch, else 2), the TFLOP per pass is SD 1.x's at
512x512 (0.80, from `vidbatch bench`'s FLOP counter, BENCHMARKS.md) scaled by the pixel count, and the
throughput is an assumed 250 TFLOP/s of one data-centre GPU in fp16 (about a quarter of an H100's
dense peak). VAE encode/decode, ffmpeg and metrics are not counted.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from vidbatch.batch.edits import editor_settings
from vidbatch.config.schema import Config, resolve_control
from vidbatch.core.errors import VidbatchError
from vidbatch.engine.editor import method_for
from vidbatch.io.input_shards import SampleRange
from vidbatch.io.shard_index import IndexedSample, index_shard, read_member
from vidbatch.io.video import output_size, probe_video

SD_TFLOP_PER_PASS_512 = 0.80
ASSUMED_GPU_TFLOPS = 250.0
PROBE_VIDEOS = 8


@dataclass
class PlanEstimate:
    """What a dry run found; None where it could not tell."""

    shards_total: int
    shards_todo: int
    unknown_shards: int = 0                 # pipe:/remote or unreadable: not counted
    samples: int = 0
    edits: int = 0
    failing: int = 0                        # samples that already fail (no video, bad json)
    no_prompt: int = 0                      # samples without a prompt that an edit needs
    probed: int = 0
    frames_per_video: float | None = None
    pixels: float | None = None             # edited pixels per frame, mean of the probed videos
    passes_per_frame: float | None = None   # UNet passes per frame: inversion + every edit
    notes: list[str] = field(default_factory=list)

    @property
    def frames(self) -> float | None:
        if self.frames_per_video is None:
            return None
        return self.frames_per_video * (self.samples - self.failing)

    @property
    def gpu_hours(self) -> float | None:
        if self.frames is None or self.pixels is None or self.passes_per_frame is None:
            return None
        tflop = self.frames * self.passes_per_frame * SD_TFLOP_PER_PASS_512 * self.pixels / 512**2
        return tflop / ASSUMED_GPU_TFLOPS / 3600


def _needs_prompt(config: Config, sample: IndexedSample) -> bool:
    edits = sample.edits or config.edits
    return any("{prompt}" in e.prompt for e in edits)


def _edit_passes(config: Config) -> float:
    """UNet passes per frame of one edit (all branches, all steps it runs)."""
    controls = resolve_control(config.edit.method, config.edit.control)
    branches = method_for(editor_settings(config)).max_branches(controls)
    steps = config.edit.steps * (config.edit.strength if "sdedit" in controls else 1.0)
    return steps * branches


def _probe(config: Config, url: str, sample: IndexedSample) -> tuple[int, float] | None:
    """(frames edited, pixels per edited frame) of one video, or None if it cannot be probed."""
    v = config.video
    suffix = Path(sample.video_member or "").suffix
    if sample.video_bytes > v.max_input_mb * 2**20:
        return None   # the run will refuse it unread; so does the estimate
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        tmp.write(read_member(url, sample.video_member, int(v.max_input_mb * 2**20)))
        tmp.flush()
        try:
            info = probe_video(tmp.name)
        except (VidbatchError, OSError):
            return None
    if not info.duration_s or not info.fps:
        return None
    frames = math.ceil(info.duration_s * info.fps / v.frame_stride)
    if v.max_frames is not None:
        frames = min(frames, v.max_frames)
    width, height = output_size(info.width, info.height, v.size, 8)
    return frames, float(width * height)


def _item_samples(urls: Sequence[str], ranges: Sequence[SampleRange | None], index: int,
                  indexed: dict[str, list[IndexedSample] | None]) -> list[IndexedSample] | None:
    """The indexed samples of work item `index` (its range of its shard; `ranges` empty: the whole shard),
    each shard indexed once (`indexed`, by URL, holds the last one: items of a shard are consecutive)."""
    url = urls[index]
    if url not in indexed:
        indexed.clear()
        indexed[url] = index_shard(url)
    samples = indexed[url]
    sample_range = ranges[index] if ranges else None
    if samples is None or sample_range is None:
        return samples
    return samples[sample_range.first:sample_range.end]


def estimate_plan(config: Config, urls: Sequence[str], todo: Sequence[int],
                  ranges: Sequence[SampleRange | None] = ()) -> PlanEstimate:
    """Counts the samples and edits of the work items to do (`ranges`: their samples, when they are not
    whole shards) and probes up to PROBE_VIDEOS of their videos."""
    plan = PlanEstimate(shards_total=len(urls), shards_todo=len(todo))
    probes: list[tuple[int, float]] = []
    edits_with_video = 0
    indexed: dict[str, list[IndexedSample] | None] = {}
    for i in todo:
        samples = _item_samples(urls, ranges, i, indexed)
        if samples is None:
            plan.unknown_shards += 1
            continue
        for sample in samples:
            plan.samples += 1
            count = len(sample.edits or config.edits)
            plan.edits += count
            if sample.error is not None or sample.video_member is None:
                plan.failing += 1
                continue
            edits_with_video += count
            if not sample.prompt and _needs_prompt(config, sample):
                plan.no_prompt += 1
            if len(probes) < PROBE_VIDEOS:
                probed = _probe(config, urls[i], sample)
                if probed is not None:
                    probes.append(probed)
    plan.probed = len(probes)
    if probes:
        plan.frames_per_video = sum(f for f, _ in probes) / len(probes)
        plan.pixels = sum(p for _, p in probes) / len(probes)
    with_video = plan.samples - plan.failing
    if with_video:
        inversion = config.inversion.steps or config.edit.steps
        plan.passes_per_frame = inversion + edits_with_video / with_video * _edit_passes(config)
    return plan


def describe(plan: PlanEstimate, config: Config) -> list[str]:
    """The dry run's lines, each a statement a user can check."""
    lines = [f"shards: {plan.shards_total} ({plan.shards_todo} to do, {plan.shards_total - plan.shards_todo} "
             "already done)"]
    counted = plan.shards_todo - plan.unknown_shards
    unknown = f"; {plan.unknown_shards} pipe:/remote shard(s) not counted" if plan.unknown_shards else ""
    lines.append(f"samples: {plan.samples} in the {counted} shard(s) to do that could be read{unknown}")
    lines.append(f"edits: {plan.edits} (the config's: {', '.join(e.name for e in config.edits)}; a sample's own "
                 "edits replace them)")
    if plan.failing:
        lines.append(f"problems: {plan.failing} sample(s) have no video or a bad json/txt: they will fail")
    if plan.no_prompt:
        lines.append(f"problems: {plan.no_prompt} sample(s) have no prompt but an edit uses {{prompt}}: they will "
                     "fail (add {key}.txt or a prompt in {key}.json, or write the prompt out)")
    if plan.frames is None:
        lines.append("frames: unknown (no video could be probed)")
        return lines
    side = "source size" if config.video.size is None else f"short side {config.video.size} px"
    lines.append(f"frames: about {plan.frames_per_video:.0f} per video ({plan.probed} video(s) probed; {side}, "
                 f"video.max_frames {config.video.max_frames}, frame_stride {config.video.frame_stride}), "
                 f"about {plan.frames:,.0f} in all")
    lines.append(
        f"estimated GPU-hours: {plan.gpu_hours:.3g} = {plan.frames:,.0f} frames x {plan.passes_per_frame:,.0f} UNet "
        f"passes per frame (inversion + edits, every guidance branch) x {SD_TFLOP_PER_PASS_512} TFLOP per pass "
        f"(SD 1.x at 512x512, scaled to {plan.pixels:,.0f} pixels) / {ASSUMED_GPU_TFLOPS:g} TFLOP/s (assumed for one "
        "data-centre GPU in fp16); VAE, ffmpeg and metrics not counted")
    return lines


def known_video_total(urls: Sequence[str], todo: Sequence[int],
                      ranges: Sequence[SampleRange | None] = ()) -> int | None:
    """The number of samples in the work items to do, when every one of them can be read ahead (or, for
    ranges of shards, was counted when planned); else None."""
    if ranges:
        counted = [ranges[i] for i in todo]
        if all(r is not None for r in counted):
            return sum(r.count for r in counted if r is not None)
    total = 0
    indexed: dict[str, list[IndexedSample] | None] = {}
    for i in todo:
        samples = _item_samples(urls, ranges, i, indexed)
        if samples is None:
            return None
        total += len(samples)
    return total
