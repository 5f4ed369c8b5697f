"""The Lightning side of one worker: a dataset over one input shard and a module that edits videos.

`ShardDataset` decodes each sample (ffmpeg) where the DataLoader runs it; `VideoEditModule`'s
`predict_step` edits one video for every configured edit and encodes the results, returning the
output members and the jsonl rows. Nothing here writes files: the prediction writer does.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from vidbatch.config import Config, EditSpec
from vidbatch.editing import EditorSettings, VideoEditor
from vidbatch.errors import SampleError, VidbatchError
from vidbatch.inversion_cache import InversionCache, cache_max_bytes
from vidbatch.models import LoraSpec, load_pipeline, model_fingerprint
from vidbatch.samples import InputSample, read_samples
from vidbatch.video_io import decode_video, encode_mp4

log = logging.getLogger("vidbatch")


@dataclass
class PreparedSample:
    """A decoded sample ready for editing, or the reason it cannot be edited."""

    key: str
    edits: list[EditSpec]
    prompt: str | None = None
    frames: np.ndarray | None = None
    fps: float | None = None
    audio: bytes | None = None
    error: str | None = None
    decode_seconds: float = 0.0


@dataclass
class SampleResult:
    key: str
    members: dict[str, bytes]
    rows: list[dict]
    frames_edited: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _identity(item: Any) -> Any:
    return item


def inversion_cache_dir(config: Config) -> Path:
    """`inversion.cache_dir`, or `inversions` under $VIDBATCH_CACHE (default ~/.cache/vidbatch)."""
    if config.inversion.cache_dir:
        return Path(config.inversion.cache_dir).expanduser()
    root = os.environ.get("VIDBATCH_CACHE") or Path.home() / ".cache" / "vidbatch"
    return Path(root).expanduser() / "inversions"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class ShardDataset(IterableDataset):
    """Samples of one shard, decoded to frames; decode failures become `error`s, not exceptions."""

    def __init__(self, url: str, config: Config, size_multiple: int):
        self.url = url
        self.config = config
        self.size_multiple = size_multiple

    def prepare(self, sample: InputSample) -> PreparedSample:
        prepared = PreparedSample(key=sample.key, edits=sample.edits or self.config.edits,
                                  prompt=sample.prompt, error=sample.error)
        if prepared.error is not None:
            return prepared
        v = self.config.video
        started = time.perf_counter()
        try:
            decoded = decode_video(
                sample.video, sample.video_ext, short_side=v.size, multiple=self.size_multiple,
                max_frames=v.max_frames, frame_stride=v.frame_stride, min_frames=v.min_frames,
                max_input_bytes=int(v.max_input_mb * 2**20), max_source_pixels=v.max_source_pixels)
        except SampleError as exc:
            prepared.error = f"cannot decode {sample.key}.{sample.video_ext}: {exc}"
        else:
            prepared.frames, prepared.fps, prepared.audio = decoded.frames, decoded.fps, decoded.audio
        prepared.decode_seconds = time.perf_counter() - started
        return prepared

    def __iter__(self) -> Iterator[PreparedSample]:
        for sample in read_samples(self.url):
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
        pipe = load_pipeline(config.model.id, dtype=dtype, device=self.target_device,
                             loras=[LoraSpec(l.path, l.scale) for l in config.model.loras],
                             single_file_config=config.model.single_file_config)
        loras = [LoraSpec(l.path, l.scale) for l in config.model.loras]
        cache, identity = None, None
        if config.inversion.cache:
            cache = InversionCache(inversion_cache_dir(config), cache_max_bytes(config.inversion.cache_max_gb), log)
            identity = model_fingerprint(pipe, loras)
        # A plain attribute, not a submodule: the editor places the weights itself and Lightning
        # must not move or wrap them.
        object.__setattr__(self, "editor", VideoEditor(pipe, self.editor_settings(config), cache, identity))

    @staticmethod
    def editor_settings(config: Config) -> EditorSettings:
        chunk = config.merge.chunk_size
        return EditorSettings(
            method=config.edit.method, control=config.edit.control, steps=config.edit.steps,
            inversion_steps=config.inversion.steps, guidance=config.edit.guidance,
            negative_prompt=config.edit.negative_prompt, eta=config.edit.eta, strength=config.edit.strength,
            chunk_size=chunk if isinstance(chunk, int) else 4, chunk_order=config.merge.chunk_order,
            inversion_batch=config.inversion.batch_size)

    def dataloader(self, url: str) -> DataLoader:
        dataset = ShardDataset(url, self.config, self.editor.size_multiple)
        # One decode worker overlaps ffmpeg with the GPU; more would duplicate an IterableDataset.
        workers = 1 if self.target_device.type == "cuda" else 0
        return DataLoader(dataset, batch_size=None, collate_fn=_identity, num_workers=workers)

    def predict_step(self, sample: PreparedSample, batch_idx: int = 0) -> SampleResult:
        return self.edit_sample(sample)

    def _row(self, sample: PreparedSample, edit: EditSpec) -> dict:
        frames = sample.frames
        return {"key": sample.key, "edit": edit.name, "status": "failed", "error": sample.error,
                "frames": None if frames is None else int(frames.shape[0]),
                "width": None if frames is None else int(frames.shape[2]),
                "height": None if frames is None else int(frames.shape[1]),
                "fps": sample.fps, "prompt": None, "inversion_cache": None,
                "seconds": {"decode": 0.0, "invert": 0.0, "edit": 0.0, "encode": 0.0, "total": 0.0},
                "peak_memory_mb": None}

    def edit_sample(self, sample: PreparedSample) -> SampleResult:
        """Edits one sample for every edit; each failure becomes a `failed` row naming its cause."""
        device = self.target_device
        rows = [self._row(sample, edit) for edit in sample.edits]
        rows[0]["seconds"]["decode"] = sample.decode_seconds  # shared stages count on the first edit
        members: dict[str, bytes] = {}
        frames_edited = 0
        if sample.error is None:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                # Without a description the inversion runs with the rest of the template (often
                # empty, the null prompt); only edits that ask for {prompt} need one.
                source_prompt = self.config.inversion.prompt.replace("{prompt}", sample.prompt or "").strip()
                prompts = []
                for edit in sample.edits:
                    prompts.append((edit.name, fill_prompt(edit.prompt, sample.prompt, f"edit '{edit.name}'")))
                result = self.editor.edit(sample.frames, source_prompt, prompts,
                                          seed=self.config.edit.seed, key=sample.key)
                for row, (name, prompt) in zip(rows, prompts):
                    started = time.perf_counter()
                    members[f"{name}.mp4"] = encode_mp4(result.frames[name], sample.fps, audio=sample.audio,
                                                        crf=self.config.video.crf)
                    row["seconds"].update(result.seconds[name])
                    row["seconds"]["encode"] = time.perf_counter() - started
                    row.update(status="ok", error=None, prompt=prompt, inversion_cache=result.inversion_cache)
                    frames_edited += len(result.frames[name])
            except VidbatchError as exc:
                self._fail(rows, sample.key, str(exc))
            except Exception as exc:  # one bad sample must not end the shard; the row names the cause
                log.exception("sample %s failed", sample.key)
                self._fail(rows, sample.key, f"{type(exc).__name__}: {exc}")
            memory = peak_memory_mb(device)
            for row in rows:
                row["peak_memory_mb"] = round(memory, 1)
        else:
            log.warning("sample %s failed: %s", sample.key, sample.error)
        for row in rows:
            row["seconds"]["total"] = sum(v for k, v in row["seconds"].items() if k != "total")
            row["seconds"] = {k: round(v, 4) for k, v in row["seconds"].items()}
        return SampleResult(key=sample.key, members=members, rows=rows, frames_edited=frames_edited)

    @staticmethod
    def _fail(rows: list[dict], key: str, message: str) -> None:
        log.warning("sample %s failed: %s", key, message)
        for row in rows:
            if row["status"] != "ok":
                row.update(status="failed", error=message)
