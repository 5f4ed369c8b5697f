"""The Lightning side of one worker: a dataset over one input shard and a module that edits videos.

`ShardDataset` decodes each sample (ffmpeg) where the DataLoader runs it; `VideoEditModule`'s
`predict_step` edits one video for every configured edit and encodes the results, returning the
output members and the jsonl rows. Nothing here writes files: the prediction writer does.
"""

from __future__ import annotations

import logging
import resource
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from vidbatch.config.schema import Config, resolve_control
from vidbatch.engine.controls.controlnet import canny_frames, load_controlnet
from vidbatch.engine.plugins import get_method
from vidbatch.core.rows import STATUS_OK, EditRow
from vidbatch.batch.edits import EditorPool, PlannedEdit, plan_edits, row_settings
from vidbatch.engine.editor import MAX_AUTO_BATCH_VIDEOS, EditedVideo, VideoEditor, VideoRequest, batches_videos
from vidbatch.core.errors import SampleError, VidbatchError
from vidbatch.core.faults import is_infrastructure_error, is_out_of_memory
from vidbatch.engine.inversion_cache import InversionCache, cache_max_bytes, inversion_cache_dir
from vidbatch.metrics import compute_metrics, load_clip_scorer, metric_keys
from vidbatch.metrics.clip import resolve_clip_model
from vidbatch.models.loading import LoraSpec, load_pipeline, model_fingerprint, quiet_loading
from vidbatch.models.dtype import auto_dtype
from vidbatch.models.motion import with_motion_adapter
from vidbatch.io.frames import FrameFile
from vidbatch.io.input_shards import InputLimits, InputSample, SampleRange, read_samples
from vidbatch.io.video import decode_video, encode_mp4

log = logging.getLogger("vidbatch")


@dataclass
class PreparedSample:
    """A decoded sample ready for editing, or the reason it cannot be edited."""

    key: str
    edits: list[PlannedEdit]                   # the sample's (or the run's) edits, resolved (`plan_edits`)
    prompt: str | None = None
    frames: FrameFile | None = None            # (T, H, W, 3) uint8 on local disk: read in windows
    fps: float | None = None
    audio: bytes | None = None
    control_frames: np.ndarray | None = None   # ControlNet condition images, (T, H, W, 3) uint8
    mask: np.ndarray | None = None             # foreground, (T, H, W) bool, for methods that use one
    error: str | None = None
    decode_seconds: float = 0.0
    reused: bool = False                       # kept from the committed shard (--retry-failed): not edited


@dataclass
class SampleResult:
    key: str
    members: dict[str, bytes]
    rows: list[EditRow]
    frames_edited: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    reused: bool = False                       # the writer copies the sample from the committed shard
    # Encoding and metrics still running in the background (`runtime.finishing`): members, rows and
    # frames_edited are complete once it is done; `finished()` waits for it.
    pending: Future | None = None

    def finished(self) -> "SampleResult":
        """This result once its background work is done (re-raises what that work raised)."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None
        return self


def _identity(item: Any) -> Any:
    return item


@dataclass
class _GroupEdit:
    """The edits of one sample that one editor runs (a group of `VideoEditModule._groups`), with what their
    results go into."""

    sample: PreparedSample
    edits: list[PlannedEdit]
    rows: list[EditRow]
    shared: dict                               # the sample's inversions, by key (shared by its groups)
    result: SampleResult
    slot: int                                  # its place among the sample's groups (finishing keeps that order)

    @property
    def config(self) -> Config:
        return self.edits[0].config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`model.dtype` on `device`: `auto` is :func:`vidbatch.models.dtype.auto_dtype`."""
    if name == "auto":
        return auto_dtype(device)
    return getattr(torch, name)


class ShardDataset(IterableDataset):
    """Samples of one shard, decoded to frames; decode failures become `error`s, not exceptions."""

    def __init__(self, url: str, config: Config, size_multiple: int, reuse: frozenset[str] = frozenset(),
                 sample_range: SampleRange | None = None):
        """`reuse`: keys of samples kept from the committed shard (--retry-failed): passed on undecoded.
        `sample_range`: only these samples of the shard (a work item); None: all of them."""
        self.url = url
        self.sample_range = sample_range
        self.config = config
        self.size_multiple = size_multiple
        self.reuse = reuse

    def prepare(self, sample: InputSample) -> PreparedSample:
        """Decodes one sample; whatever goes wrong (a SampleError or any surprise) becomes its `error`."""
        prepared = PreparedSample(key=sample.key, edits=plan_edits(self.config, sample.edits or self.config.edits),
                                  prompt=sample.prompt, error=sample.error)
        if prepared.error is not None:
            return prepared
        v = self.config.video
        started = time.perf_counter()
        what = f"{sample.key}.{sample.video_ext}"
        try:
            decoded = decode_video(
                sample.video, sample.video_ext, short_side=v.size, multiple=self.size_multiple,
                max_frames=v.max_frames, frame_stride=v.frame_stride, min_frames=v.min_frames,
                max_input_bytes=int(v.max_input_mb * 2**20), max_source_pixels=v.max_source_pixels,
                keep="disk")  # a clip of any length: host memory holds a window of frames, not the clip
            prepared.frames, prepared.fps, prepared.audio = decoded.frames, decoded.fps, decoded.audio
            prepared.control_frames, prepared.error = self.control_frames(sample, decoded.frames, prepared.edits)
            if prepared.error is None:
                prepared.mask, prepared.error = self.mask(sample, decoded.frames, prepared.edits)
        except SampleError as exc:
            prepared.error = f"cannot decode {what}: {exc}"
        except Exception as exc:  # noqa: BLE001 - one sample's surprise must not end the shard
            log.exception("preparing sample %s failed", sample.key)
            prepared.error = f"cannot prepare {what}: {type(exc).__name__}: {exc}"
        prepared.decode_seconds = time.perf_counter() - started
        return prepared

    def control_frames(self, sample: InputSample, frames: FrameFile,
                       edits: list[PlannedEdit]) -> tuple[np.ndarray | None, str | None]:
        """The ControlNet condition of a sample whose `edits` use the ControlNet, or the reason it has none:
        (images, error)."""
        c = self.config.controlnet
        if not any(e.config and "controlnet" in resolve_control(e.config.edit.method, e.config.edit.control)
                   for e in edits):
            return None, None
        if c.condition == "canny":
            return canny_frames(frames, c.canny_low, c.canny_high), None
        if sample.control_video is None:
            return None, f"controlnet.condition is 'video' but the sample has no {sample.key}.control.mp4"
        return self._companion_video(sample.control_video, f"{sample.key}.control.mp4", frames,
                                     "control frames must match the video's count and aspect ratio")

    def mask(self, sample: InputSample, frames: FrameFile, edits: list[PlannedEdit]) -> tuple[np.ndarray | None, str | None]:
        """The foreground mask of a sample (`{key}.mask.mp4`, white = foreground), when one of its `edits`'
        methods uses one: (T, H, W) bool or None (no mask: all foreground), or the reason it cannot be used."""
        if not any(e.method and get_method(e.method).uses_mask for e in edits) or sample.mask_video is None:
            return None, None
        mask, error = self._companion_video(sample.mask_video, f"{sample.key}.mask.mp4", frames,
                                            "a mask must match the video's frame count and aspect ratio")
        return (None, error) if mask is None else (mask.mean(axis=-1) > 127, None)

    def _companion_video(self, data: bytes, name: str, frames: FrameFile,
                         rule: str) -> tuple[np.ndarray | None, str | None]:
        """A video that goes with the sample's (control frames, a mask), decoded like it and checked to match
        its frames: (frames, None) or (None, the reason)."""
        v = self.config.video
        try:
            decoded = decode_video(data, "mp4", short_side=v.size, multiple=self.size_multiple,
                                   max_frames=v.max_frames, frame_stride=v.frame_stride, min_frames=1,
                                   max_input_bytes=int(v.max_input_mb * 2**20),
                                   max_source_pixels=v.max_source_pixels).frames
        except SampleError as exc:
            return None, f"cannot decode {name}: {exc}"
        if decoded.shape != frames.shape:
            return None, f"{name} gives frames of shape {decoded.shape[:3]}, the video {frames.shape[:3]}; {rule}"
        return decoded, None

    def __iter__(self) -> Iterator[PreparedSample]:
        limits = InputLimits(max_video_bytes=int(self.config.video.max_input_mb * 2**20))
        for sample in read_samples(self.url, limits, sample_range=self.sample_range):
            if sample.key in self.reuse:
                yield PreparedSample(key=sample.key, edits=[], reused=True)
            else:
                yield self.prepare(sample)


def fill_prompt(template: str, prompt: str | None, what: str) -> str:
    """Substitutes `{prompt}` (the sample's description); a SampleError if it is needed and missing."""
    if "{prompt}" not in template:
        return template
    if not prompt:
        raise SampleError(f"{what} uses {{prompt}} but the sample has no prompt "
                          "(add {key}.txt or a 'prompt' in {key}.json, or write the prompt out in the config)")
    return template.replace("{prompt}", prompt)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class VideoEditModule(L.LightningModule):
    """Holds the loaded model; `predict_step` edits one prepared sample for each of its edits."""

    def __init__(self, config: Config, device: str | torch.device | None = None):
        super().__init__()
        self.config = config
        self.target_device = resolve_device(device or config.runtime.device)
        dtype = resolve_dtype(config.model.dtype, self.target_device)
        loras = [LoraSpec(l.path, l.scale) for l in config.model.loras]
        pipe = load_pipeline(config.model.id, dtype=dtype, device=self.target_device, loras=loras,
                             single_file_config=config.model.single_file_config)
        if config.model.motion_adapter is not None:
            with_motion_adapter(pipe, config.model.motion_adapter, config=config.model.motion_adapter_config)
        cache, identity = None, None
        if config.inversion.cache:
            cache = InversionCache(inversion_cache_dir(config.inversion.cache_dir), cache_max_bytes(config.inversion.cache_max_gb), log)
            identity = model_fingerprint(pipe, loras)
        # A plain attribute, not a submodule: the editor places the weights itself and Lightning
        # must not move or wrap them.
        controlnet = None
        run_edits = plan_edits(config, config.edits)     # valid: the config was validated with them
        if any("controlnet" in resolve_control(e.config.edit.method, e.config.edit.control) for e in run_edits):
            controlnet = load_controlnet(config.controlnet.model, dtype=dtype, device=self.target_device)
        object.__setattr__(self, "editors", EditorPool(pipe, cache, identity, controlnet))
        # The editor of the run's first edit: what every editor shares (model identity, size multiple).
        object.__setattr__(self, "editor", self.editors.get(run_edits[0].config))
        # Told (video key, stage, done, total) after every inversion/denoising step (progress in a long video).
        object.__setattr__(self, "step_sink", None)
        object.__setattr__(self, "_background", None)  # made on first use (`background`)
        self._setup_metrics(config, dtype)

    def dataloader(self, url: str, reuse: frozenset[str] = frozenset(),
                   sample_range: SampleRange | None = None) -> DataLoader:
        dataset = ShardDataset(url, self.config, self.editor.size_multiple, reuse, sample_range)
        # One decode worker overlaps ffmpeg with the GPU; more would duplicate an IterableDataset.
        workers = 1 if self.target_device.type == "cuda" else 0
        batch = self.batch_videos
        # More than one video per step: lists of up to `batch` consecutive samples, in the shard's order.
        return DataLoader(dataset, batch_size=None if batch == 1 else batch, collate_fn=_identity, num_workers=workers)

    @property
    def batch_videos(self) -> int:
        """The most videos one step edits together (`runtime.batch_videos`): `auto` is 1 on a CPU (it is full
        already: batching gains nothing there), `MAX_AUTO_BATCH_VIDEOS` on a GPU (fewer where the memory
        estimate says so, see `_edit_batches`)."""
        value = self.config.runtime.batch_videos
        if value == "auto":
            return MAX_AUTO_BATCH_VIDEOS if self.target_device.type == "cuda" else 1
        return int(value)

    def predict_step(self, batch: PreparedSample | list[PreparedSample], batch_idx: int = 0
                     ) -> SampleResult | list[SampleResult]:
        """One sample's result, or with `runtime.batch_videos` above 1 the results of a list of samples, in order."""
        if isinstance(batch, list):
            return self.edit_samples(batch)
        return self.edit_sample(batch)

    @staticmethod
    def _row(sample: PreparedSample, edit: PlannedEdit) -> EditRow:
        """The row of one (video, edit) before editing: failed with the decode error (or the edit's own
        settings error), if any, metrics null; the edit's method and settings recorded."""
        frames = sample.frames
        row = EditRow.pending(sample.key, edit.spec.name, metric_names=metric_keys(), error=sample.error or edit.error,
                              frames=None if frames is None else int(frames.shape[0]),
                              width=None if frames is None else int(frames.shape[2]),
                              height=None if frames is None else int(frames.shape[1]),
                              fps=sample.fps)
        if edit.config is not None:
            row.method, row.settings = edit.config.edit.method, row_settings(edit.config)
        return row

    def edit_sample(self, sample: PreparedSample) -> SampleResult:
        """Edits one sample for every edit; each failure becomes a `failed` row naming its cause.

        Edits are grouped by the editor that runs them (their engine settings and seed); the groups
        share one inversion per distinct inversion key (`shared`), whatever editor made it.
        """
        return self.edit_samples([sample])[0]

    def edit_samples(self, samples: list[PreparedSample]) -> list[SampleResult]:
        """:meth:`edit_sample` of consecutive samples, their results in the same order.

        The groups of edits that one editor runs are gathered over the samples; those of videos of one frame
        size are edited together (`VideoEditor.edit_videos`: their chunks share UNet calls), at most
        `batch_videos` at once and as many as the memory estimate allows. Each video's result is the one it
        gets alone; a batch that fails is edited again one video at a time, so a bad video fails alone with
        its own error.
        """
        results: list[SampleResult] = []
        groups: list[_GroupEdit] = []
        finishing: dict[int, list[Callable[[], None] | None]] = {}
        for sample in samples:
            if sample.reused:
                results.append(SampleResult(key=sample.key, members={}, rows=[], reused=True))
                continue
            rows = [self._row(sample, edit) for edit in sample.edits]
            rows[0].seconds["decode"] = sample.decode_seconds  # shared stages count on the first edit
            result = SampleResult(key=sample.key, members={}, rows=rows)
            results.append(result)
            finishing[id(result)] = []
            if sample.error is None:
                shared: dict = {}
                for slot, indices in enumerate(self._groups(sample.edits)):
                    groups.append(_GroupEdit(sample, [sample.edits[i] for i in indices], [rows[i] for i in indices],
                                             shared, result, slot))
                    finishing[id(result)].append(None)
            else:
                log.warning("sample %s failed: %s", sample.key, sample.error)
        for batch in self._edit_batches(groups):
            for group, finish in zip(batch, self._edit_groups(batch)):
                finishing[id(group.result)][group.slot] = finish
        for result in results:
            if not result.reused:
                self._finish(result, finishing[id(result)])
        return results

    def _finish(self, result: SampleResult, steps: list[Callable[[], None] | None]) -> None:
        """Runs the finishing `steps` of a sample (encoding, metrics), in its groups' order, inline or in the
        background."""
        def finish() -> None:
            for step in steps:
                step()
            for row in result.rows:
                row.close_seconds()

        if self.background is None:
            finish()
        else:
            result.pending = self.background.submit(finish)

    def _edit_batches(self, groups: list[_GroupEdit]) -> list[list[_GroupEdit]]:
        """`groups` cut into the batches that are edited together, in order of first appearance: groups of one
        editor on videos of one frame size, at most `batch_videos` (and, with `auto`, what the memory estimate
        allows) per batch; a group alone where its method edits one video at a time."""
        if self.batch_videos == 1:
            return [[group] for group in groups]
        buckets: dict[str, list[_GroupEdit]] = {}
        for group in groups:
            frames = group.sample.frames
            key = repr((EditorPool.key(group.config), tuple(frames.shape[1:3])))
            buckets.setdefault(key, []).append(group)
        batches = []
        for bucket in buckets.values():
            config, frames = bucket[0].config, bucket[0].sample.frames
            size = 1
            if len(bucket) > 1 and batches_videos(get_method(config.edit.method)):
                size = self.batch_videos
                if self.config.runtime.batch_videos == "auto":
                    try:
                        editor = self.editors.get(config)
                        size = editor.videos_per_call(max(g.sample.frames.shape[0] for g in bucket),
                                                      (frames.shape[1] // editor.vae_scale,
                                                       frames.shape[2] // editor.vae_scale), size)
                    except Exception:  # noqa: BLE001 - the editor cannot be built: each group fails alone with the reason
                        size = 1
            batches += [bucket[i:i + size] for i in range(0, len(bucket), size)]
        return batches

    def _edit_groups(self, groups: list[_GroupEdit]) -> list[Callable[[], None]]:
        """Edits `groups` (one editor, videos of one size) together; returns what finishes each. A failure
        edits them again one at a time (:meth:`_edit_group`), so each fails or succeeds on its own; a device
        failure propagates (core.faults)."""
        if len(groups) == 1:
            return [self._edit_group(groups[0])]
        device, config = self.target_device, groups[0].config
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        keys = ", ".join(group.sample.key for group in groups)
        # The samples' shared inversions as they were: a video edited again alone after a failed batch inverts
        # (or reads the cache) as it would have, and its rows say so.
        shared_before = [dict(group.shared) for group in groups]
        try:
            editor = self.editors.get(config)
            editor.on_step = None
            requests, prompts, source_prompts = [], [], []
            for group in groups:
                source_prompt, group_prompts = self._prompts(group)
                requests.append(VideoRequest(group.sample.frames, source_prompt, group_prompts, config.edit.seed,
                                             group.sample.key, group.sample.control_frames, group.sample.mask,
                                             group.shared, self._progress(group.sample.key)))
                prompts.append(group_prompts)
                source_prompts.append(source_prompt)
            edited = editor.edit_videos(requests)
        except Exception as exc:
            if is_infrastructure_error(exc):
                raise  # the device failed, not a sample: the worker is retired (core.faults)
            log.warning("editing videos %s together failed (%s: %s); editing them one at a time", keys,
                        type(exc).__name__, exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for group, before in zip(groups, shared_before):
                group.shared.clear()
                group.shared.update(before)
            return [self._edit_group(group) for group in groups]
        memory = round(peak_memory_mb(device), 1)  # the batch's peak, before the next one starts
        return [self._finisher(group, prompts[i], source_prompts[i], edited[i], memory)
                for i, group in enumerate(groups)]

    def _prompts(self, group: _GroupEdit) -> tuple[str, list[tuple[str, str]]]:
        """The source prompt and the (edit name, prompt) pairs of a group of a sample's edits."""
        sample, config = group.sample, group.config
        # Without a description the inversion runs with the rest of the template (often
        # empty, the null prompt); only edits that ask for {prompt} need one.
        source_prompt = config.inversion.prompt.replace("{prompt}", sample.prompt or "").strip()
        return source_prompt, [(e.spec.name, fill_prompt(e.spec.prompt, sample.prompt, f"edit '{e.spec.name}'"))
                               for e in group.edits]

    def _progress(self, key: str) -> Callable[[str, int, int], None] | None:
        """The step callback of video `key` (to `step_sink`), or None."""
        sink = self.step_sink
        return None if sink is None else (lambda stage, done, total: sink(key, stage, done, total))

    @property
    def background(self) -> ThreadPoolExecutor | None:
        """The thread that encodes and measures a video while the next one is edited (`runtime.finishing`),
        or None when that runs inline."""
        finishing = self.config.runtime.finishing
        if finishing == "inline" or (finishing == "auto" and self.target_device.type != "cuda"):
            return None
        if self._background is None:
            # One thread: one video finishing while the next is edited; its frames wait on local disk.
            object.__setattr__(self, "_background", ThreadPoolExecutor(1, thread_name_prefix="vidbatch-finish"))
        return self._background

    @staticmethod
    def _groups(edits: list[PlannedEdit]) -> list[list[int]]:
        """Indices of the runnable edits, grouped by engine settings and seed, in order of first appearance."""
        groups: dict[str, list[int]] = {}
        for i, edit in enumerate(edits):
            if edit.config is not None:
                key = repr((EditorPool.key(edit.config), edit.config.edit.seed, edit.config.inversion.prompt))
                groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _edit_group(self, group: _GroupEdit) -> Callable[[], None]:
        """Runs the edits of one editor on a sample and returns what finishes them: encoding and metrics,
        which fill their rows and the sample's result (members, frames_edited). A failure, here or there,
        fails this group's rows only, naming the cause; a device failure propagates (core.faults)."""
        sample, rows, device, config = group.sample, group.rows, self.target_device, group.config
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with self._failing_rows(rows, sample.key):
            editor = self.editors.get(config)
            editor.on_step = self._progress(sample.key)
            source_prompt, prompts = self._prompts(group)
            edited = self._edit(editor, sample, source_prompt, prompts, config.edit.seed, group.shared)
            memory = round(peak_memory_mb(device), 1)  # the edit's peak, before the next video's starts
            return self._finisher(group, prompts, source_prompt, edited, memory)
        memory = round(peak_memory_mb(device), 1)

        def failed() -> None:
            for row in rows:
                row.peak_memory_mb = memory
        return failed

    def _finisher(self, group: _GroupEdit, prompts: list[tuple[str, str]], source_prompt: str, edited: EditedVideo,
                  memory: float) -> Callable[[], None]:
        """What finishes a group's edited video: encoding and metrics into its rows and the sample's result."""
        sample, rows, result = group.sample, group.rows, group.result

        def finish() -> None:
            with self._failing_rows(rows, sample.key):
                for row, (name, prompt) in zip(rows, prompts):
                    started = time.perf_counter()
                    result.members[f"{name}.mp4"] = encode_mp4(edited.frames[name], sample.fps,
                                                               audio=sample.audio, crf=self.config.video.crf)
                    row.seconds.update(edited.seconds[name])
                    row.seconds["encode"] = time.perf_counter() - started
                    row.status, row.error, row.prompt = STATUS_OK, None, prompt
                    row.inversion_cache = edited.inversion_use[name]
                    result.frames_edited += len(edited.frames[name])
                    self._measure(row, sample.frames, edited.frames[name], prompt, source_prompt)
            for row in rows:
                row.peak_memory_mb = memory

        return finish

    @contextmanager
    def _failing_rows(self, rows: list[EditRow], key: str) -> Iterator[None]:
        """Turns an exception into failed `rows` naming the cause; a device failure propagates (core.faults)."""
        try:
            yield
        except VidbatchError as exc:
            self._fail(rows, key, str(exc))
        except Exception as exc:  # one bad sample must not end the shard; the row names the cause
            if is_infrastructure_error(exc):
                raise  # the device failed, not the sample: the worker is retired (core.faults)
            log.exception("sample %s failed", key)
            self._fail(rows, key, f"{type(exc).__name__}: {exc}")

    def _edit(self, editor: VideoEditor, sample: PreparedSample, source_prompt: str, prompts: list[tuple[str, str]],
              seed: int, shared: dict) -> EditedVideo:
        """The editor's edit; out of memory, it is tried once more with chunks half as large."""
        def edit() -> EditedVideo:
            return editor.edit(sample.frames, source_prompt, prompts, seed=seed, key=sample.key,
                               control_images=sample.control_frames, mask=sample.mask, shared=shared)

        try:
            return edit()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            log.warning("sample %s ran out of memory (%s); trying it once more with chunks half as large",
                        sample.key, exc)
        if self.target_device.type == "cuda":
            torch.cuda.empty_cache()
        with editor.smaller_chunks(2):
            return edit()

    # -- quality metrics ---------------------------------------------------------------------------

    def _setup_metrics(self, config: Config, dtype: torch.dtype) -> None:
        """Loads the CLIP scorer once per worker; a CLIP model that cannot be loaded turns the CLIP
        scores off (null values) with the reason logged here once and recorded with every row."""
        m = config.metrics
        clip_model, reason = resolve_clip_model(m.clip_model)
        scorer = None
        if clip_model is not None:
            clip_dtype = dtype if self.target_device.type == "cuda" else torch.float32
            with quiet_loading():
                scorer, reason = load_clip_scorer(clip_model, self.target_device, clip_dtype)
        if reason not in (None, "disabled"):
            log.warning("CLIP scores are off for this run: %s", reason)
        self.clip_scorer = scorer
        # Which implementation produced each figure travels with the rows (workers may differ).
        self.metrics_by = {"flow": m.flow if m.warp_error else None,
                           "clip": clip_model if scorer is not None else None,
                           "clip_off": None if scorer is not None else reason}

    def _measure(self, row: EditRow, source: np.ndarray, edited: np.ndarray, prompt: str, source_prompt: str) -> None:
        """Fills `row.metrics` for one edited video; a metric that fails leaves nulls and a
        `metrics_error`, never failing the edit itself. `source` are the decoded frames that were edited."""
        m = self.config.metrics
        started = time.perf_counter()
        row.metrics_by = dict(self.metrics_by)
        row.model_fingerprint = self.editor.model_identity  # computed for the inversion cache, else null
        try:
            row.metrics = compute_metrics(source, edited, prompt, source_prompt or None, warp=m.warp_error,
                                          interp=m.interp_psnr, clip=self.clip_scorer, flow_method=m.flow)
        except Exception as exc:  # noqa: BLE001 - a metric bug must not cost the edited video
            log.warning("metrics of %s/%s failed: %s: %s", row.key, row.edit, type(exc).__name__, exc)
            row.metrics_error = f"{type(exc).__name__}: {exc}"
        row.seconds["metrics"] = time.perf_counter() - started

    @staticmethod
    def _fail(rows: list[EditRow], key: str, message: str) -> None:
        log.warning("sample %s failed: %s", key, message)
        for row in rows:
            if not row.ok:
                row.error = message  # still `failed`: rows are built failed and turn ok only when encoded
