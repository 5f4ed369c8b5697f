"""The editing engine: VAE encode, DDIM inversion, chunked guided denoising, VAE decode.

One `VideoEditor` holds a loaded pipeline and edits one video at a time for any number of edit
prompts. Frames go through the UNet chunk by chunk, so memory is bounded by the chunk, not the
video. How self-attention sees the other frames of a chunk is the business of the method (a
:class:`vidbatch.engine.method.Method` from the registry, with its attention processors); this
module only cuts the chunks and drives the loop, calling the method's hooks where it varies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from vidbatch.core.errors import ConfigError
from vidbatch.engine import ddim, memory
from vidbatch.engine.controls.controlnet import condition_tensor
from vidbatch.engine.controls.pnp import PnpResidualInjector, injection_steps
from vidbatch.engine.controls.sdedit import first_step
from vidbatch.engine.inversion_cache import InversionCache, inversion_key
from vidbatch.engine.method import EditorSettings, Inversion, Method
from vidbatch.engine.plugins import get_method, resolve_control
from vidbatch.io.disk_tensor import disk_tensor, on_disk
from vidbatch.io.frames import FrameFile
from vidbatch.models.motion import is_motion_unet

log = logging.getLogger("vidbatch")


@dataclass
class EditedVideo:
    frames: dict[str, np.ndarray | FrameFile]              # edit name -> (T, H, W, 3) uint8, kept like the input
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # edit name -> {"invert", "edit"}
    inversion_cache: str = "off"                           # "hit", "miss", "off", or "shared" (see `edit`)
    inversion_use: dict[str, str] = field(default_factory=dict)  # edit name -> the first's status, then "shared"


@dataclass
class DenoiseJob:
    """One video's denoising in :meth:`VideoEditor.guided_denoise_videos`.

    `method`: a fresh instance for this video (its hooks keep per-video state); `inversion` the video's
    (its trajectory (S, T, 4, h, w) gives the start and the source branch); `control_images` (T, H, W, 3)
    uint8 for the ControlNet. `progress` (stage, done, total) and `stage` report this video's steps;
    None: the editor's `on_step` and current stage.
    """

    method: Method
    inversion: Inversion
    prompt: str
    seed: int
    source_prompt: str = ""
    control_images: np.ndarray | None = None
    progress: Callable[[str, int, int], None] | None = None
    stage: str | None = None


@dataclass
class VideoRequest:
    """One video and its edits for :meth:`VideoEditor.edit_videos` (the arguments of :meth:`VideoEditor.edit`).

    `progress` receives (stage, done, total) of this video's inversion and edits; None: the editor's `on_step`.
    """

    frames: np.ndarray | FrameFile
    source_prompt: str
    edits: list[tuple[str, str]]
    seed: int
    key: str
    control_images: np.ndarray | None = None
    mask: np.ndarray | None = None
    shared: dict[str, Inversion] | None = None
    progress: Callable[[str, int, int], None] | None = None


@dataclass(eq=False)
class _Video:
    """The loop's state of one video of a batch: its job, generators, latents and chunks of the step."""

    index: int                                  # its place in the batch
    job: DenoiseJob
    generator: torch.Generator
    merge_generator: torch.Generator
    x: Tensor                                   # (T, 4, h, w) float32 on the device
    cond: Tensor                                # (1, 77, C) the edit prompt's embedding
    source: Tensor                              # (1, 77, C) the source prompt's embedding
    condition: Tensor | None                    # (T, 3, H, W) ControlNet condition, or None
    chunk_size: int
    state: object = None                        # the method's processor state for this video
    with_source: bool = False
    source_latents: Tensor | None = None        # (T, 4, h, w): the inverted latent of the step
    step_uncond: Tensor | None = None
    chunks: list[Tensor] = field(default_factory=list)
    out: Tensor | None = None                   # the step's next latents (eta 0) or predictions (eta > 0)


# Methods whose videos were edited one at a time although several were asked to share UNet calls: said once.
_SAID_NO_BATCH: set[str] = set()
# `runtime.batch_videos: auto` on a GPU: at most this many videos share a UNet call (past it the calls are
# large enough to fill the device; more only delays the first results).
MAX_AUTO_BATCH_VIDEOS = 8


def batches_videos(method: Method | type[Method]) -> bool:
    """Whether chunks of several videos may share a UNet call with `method` (`Method.batches_videos`, and the
    engine's own loop). When not, says once per method why its videos are edited one at a time."""
    cls = method if isinstance(method, type) else type(method)
    if cls.batches_videos and cls.denoise is Method.denoise:
        return True
    if cls.name not in _SAID_NO_BATCH:
        _SAID_NO_BATCH.add(cls.name)
        log.info("runtime.batch_videos: edit.method %s edits one video at a time (its hooks or its own loop "
                 "follow a single video)", cls.name)
    return False


def sample_seed(seed: int, *parts: str) -> int:
    """A 63-bit seed from the run seed and names (sample key, edit name).

    Seeding per sample rather than per process makes a video's result independent of which worker
    edits it and in which order, so distributed runs and reruns reproduce exactly.
    """
    text = "\x00".join([str(seed), *parts])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


# VidToMe's default chunk order is "mix-4": a quarter of the chunks visited first, at random.
MIX_DIVISOR = 4
# Test-only: a UNet call on more frames than this raises torch.OutOfMemoryError, as a device with
# less memory would. Unset (always, outside tests) it does nothing.
TEST_MAX_CHUNK_ENV = "VIDBATCH_TEST_MAX_CHUNK_FRAMES"


def _simulated_memory_limit(frames: int) -> None:
    """Raises the out-of-memory error a device would if `VIDBATCH_TEST_MAX_CHUNK_FRAMES` is below `frames`."""
    limit = os.environ.get(TEST_MAX_CHUNK_ENV)
    if limit and frames > int(limit):
        raise torch.OutOfMemoryError(f"out of memory: a chunk of {frames} frames is over the simulated limit "
                                     f"of {limit} ({TEST_MAX_CHUNK_ENV})")


def chunk_schedule(num_frames: int, chunk_size: int, order: str, generator: torch.Generator) -> list[Tensor]:
    """Cuts frames 0..num_frames-1 into chunks of consecutive frames for one denoising step.

    `seq`: fixed chunks of `chunk_size`, in order (no randomness). `rand` and `mix` cut as VidToMe's
    `get_chunks` does: the first chunk has a random length in 1..chunk_size (so chunk borders move
    from step to step, even for a clip shorter than a chunk) and the chunk list is reversed with
    probability 0.5; then `rand` visits the chunks in a random permutation, and `mix` (VidToMe's
    `mix-4`) visits a random `len // 4` of them first, in random order, then the others in order,
    forwards or backwards, whichever starts nearer the last random chunk. The order matters only
    through VidToMe's global tokens (each chunk merges with the previous chunk's).
    Returns a list of index tensors (int64, on the CPU).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    frames = torch.arange(num_frames)
    if order == "seq":
        return list(frames.split(chunk_size))
    if order not in ("rand", "mix"):
        raise ValueError(f"unknown chunk order {order!r}: expected 'seq', 'rand' or 'mix'")
    first = int(torch.randint(1, chunk_size + 1, (1,), generator=generator))
    chunks = [c for c in (frames[:first], *frames[first:].split(chunk_size)) if len(c)]
    if torch.rand((), generator=generator) < 0.5:
        chunks.reverse()
    visit = torch.randperm(len(chunks), generator=generator).tolist()
    if order == "mix":
        count = len(chunks) // MIX_DIVISOR
        rest = sorted(visit[count:])
        if count and abs(rest[-1] - visit[count - 1]) < abs(rest[0] - visit[count - 1]):
            rest.reverse()  # continue from the end nearer the last randomly visited chunk
        visit = visit[:count] + rest
    return [chunks[i] for i in visit]


def _positions(timesteps: Tensor, wanted: Tensor) -> Tensor | None:
    """Positions in `timesteps` (I,) of every value of `wanted` (S,), as (S,) int64; None if one is missing."""
    match = timesteps[None, :] == wanted[:, None]   # (S, I)
    if not bool(match.any(1).all()):
        return None
    return match.int().argmax(1)


def mask_digest(mask: np.ndarray) -> str:
    """A digest of a (T, H, W) bool mask's content and shape (part of a cache key)."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    return hashlib.sha256(repr(mask.shape).encode() + np.packbits(mask).tobytes()).hexdigest()


def method_for(settings: EditorSettings) -> Method:
    """A fresh instance of `settings.method` (its hooks keep per-edit state)."""
    return get_method(settings.method)(settings)


class VideoEditor:
    """Edits videos with a loaded Stable Diffusion pipeline (UNet, VAE, text encoder, DDIM schedule)."""

    def __init__(self, pipe, settings: EditorSettings, cache: InversionCache | None = None,
                 model_identity: str | None = None, controlnet=None):
        """`cache` stores inversions keyed by content; `model_identity` (a weights fingerprint) is
        then required, since it is part of every key. `controlnet` is needed by the `controlnet` control."""
        if cache is not None and not model_identity:
            raise ValueError("an inversion cache needs the model's identity (vidbatch.models.loading.model_fingerprint)")
        self.controls = resolve_control(settings.method, settings.control)
        needs_video = method_for(settings).needs_motion_module
        if needs_video != is_motion_unet(pipe.unet):
            wanted = "a video UNet (set model.motion_adapter)" if needs_video else "an image UNet (model.motion_adapter null)"
            raise ConfigError(f"edit.method {settings.method!r} needs {wanted}")
        if ("controlnet" in self.controls) != (controlnet is not None):
            raise ValueError("edit.control includes 'controlnet' exactly when a ControlNet model is given")
        self.controlnet = controlnet
        self.pipe = pipe
        self.settings = settings
        self.cache = cache
        self.model_identity = model_identity
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.device = self.unet.device
        self.dtype = self.unet.dtype
        self.prediction_type = pipe.scheduler.config.prediction_type
        self._scheduler = pipe.scheduler
        self._text_cache: dict[str, Tensor] = {}
        # Told (stage, done, total) after every inversion and denoising step (a method's own loop too): the
        # progress inside a long video, and a Ray worker's liveness signal. It only observes.
        self.on_step: Callable[[str, int, int], None] | None = None
        self._stage = "edit"
        # Chunks and inversion batches are divided by this (`smaller_chunks`, a retry after running
        # out of memory).
        self.chunk_divisor = 1
        # Pixels per latent cell, and the factor every side must be divisible by for the UNet.
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.size_multiple = self.vae_scale * 2 ** (len(self.unet.config.block_out_channels) - 1)

    # -- text ------------------------------------------------------------------------------------

    @torch.no_grad()
    def text_embedding(self, prompt: str) -> Tensor:
        """(1, 77, C) embedding of a prompt, computed once per prompt."""
        if prompt not in self._text_cache:
            tokenizer = self.pipe.tokenizer
            ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(self.device)
            embedding = self.pipe.text_encoder(ids)[0].to(self.dtype)
            if len(self._text_cache) > 256:  # a bounded cache: prompts with {prompt} vary per sample
                self._text_cache.pop(next(iter(self._text_cache)))
            self._text_cache[prompt] = embedding
        return self._text_cache[prompt]

    # -- VAE -------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray) -> Tensor:
        """(T, H, W, 3) uint8 (an array or a `FrameFile`) -> (T, 4, H/8, W/8) latents on the device, in VAE
        batches written into one preallocated tensor (no second whole-clip copy)."""
        out = None
        for start in range(0, len(frames), self.settings.vae_batch):
            batch = torch.from_numpy(np.ascontiguousarray(frames[start:start + self.settings.vae_batch]))
            pixels = batch.to(self.device).permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0
            latent = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor
            if out is None:
                out = torch.empty((len(frames), *latent.shape[1:]), dtype=latent.dtype, device=latent.device)
            out[start:start + len(latent)] = latent
        return out

    @torch.no_grad()
    def decoded_windows(self, latents: Tensor) -> Iterator[np.ndarray]:
        """(T, 4, h, w) latents -> (n, 8h, 8w, 3) uint8 frames, one VAE batch at a time, in order."""
        for start in range(0, len(latents), self.settings.vae_batch):
            batch = latents[start:start + self.settings.vae_batch].to(self.device, self.dtype)
            pixels = self.vae.decode(batch / self.vae.config.scaling_factor).sample
            pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            yield pixels.permute(0, 2, 3, 1).cpu().numpy()

    def decode_latents(self, latents: Tensor) -> np.ndarray:
        """(T, 4, h, w) latents -> (T, 8h, 8w, 3) uint8 frames in one array."""
        return np.concatenate(list(self.decoded_windows(latents)))

    def decode_latents_to_file(self, latents: Tensor) -> FrameFile:
        """(T, 4, h, w) latents -> (T, 8h, 8w, 3) uint8 frames in a `FrameFile`: host memory holds one VAE
        batch of frames, however long the clip."""
        out = None
        for window in self.decoded_windows(latents):
            if out is None:
                out = FrameFile(*window.shape[1:])
            out.append(window)
        return out

    # -- schedule --------------------------------------------------------------------------------

    def timesteps_for(self, steps: int) -> Tensor:
        """The DDIM timesteps of `steps` steps, descending (the scheduler's configured spacing)."""
        self._scheduler.set_timesteps(steps)
        return self._scheduler.timesteps.clone()

    def inversion_schedule(self) -> tuple[Tensor, Tensor]:
        """The inversion's timesteps and where the edit's timesteps are among them.

        Returns ``(timesteps, kept)``: (I,) the DDIM timesteps of `inversion.steps` (``I``; null:
        `edit.steps`), descending, and (S,) int64 positions into them of the edit's ``S`` timesteps,
        so ``timesteps[kept]`` equals the edit's timesteps.

        Raises ConfigError when `inversion.steps` is below `edit.steps`, or when the edit's timesteps
        are not all timesteps of the inversion (the scheduler's `timestep_spacing` decides which
        counts nest): the latents the edit starts its steps from would not exist.
        """
        s = self.settings
        inversion_steps = s.inversion_steps or s.steps
        if inversion_steps < s.steps:
            raise ConfigError(f"inversion.steps ({inversion_steps}) must be at least edit.steps ({s.steps}): the edit "
                              "starts every step from the inverted latent at that step's timestep; set "
                              "inversion.steps to null (follow edit.steps) or to a finer schedule")
        edit_timesteps = self.timesteps_for(s.steps)
        timesteps = self.timesteps_for(inversion_steps)
        kept = _positions(timesteps, edit_timesteps)
        if kept is None:
            spacing = self._scheduler.config.get("timestep_spacing", "leading")
            working = [m for m in range(s.steps, self._scheduler.config.num_train_timesteps + 1, s.steps)
                       if _positions(self.timesteps_for(m), edit_timesteps) is not None]
            raise ConfigError(
                f"inversion.steps ({inversion_steps}) does not contain the timesteps of edit.steps ({s.steps}) with "
                f"the DDIM scheduler's timestep_spacing {spacing!r}: the edit needs the inverted latents at its own "
                f"timesteps. Inversion step counts that do, for edit.steps {s.steps}: "
                f"{', '.join(map(str, working[:6]))}{', ...' if len(working) > 6 else ''} (or null: edit.steps)")
        return timesteps, kept

    def alphas(self) -> tuple[Tensor, Tensor]:
        alphas = self._scheduler.alphas_cumprod.to(self.device, torch.float32)
        final = torch.as_tensor(self._scheduler.final_alpha_cumprod, dtype=torch.float32, device=self.device)
        return alphas, final

    def unet_output(self, latents: Tensor, t: Tensor, embeddings: Tensor, condition: Tensor | None = None) -> Tensor:
        """The UNet's output in float32; with `condition`, the ControlNet's residuals are added."""
        latents = latents.to(self.dtype)
        residuals = {}
        if condition is not None:
            down, mid = self.controlnet(latents, t, encoder_hidden_states=embeddings, controlnet_cond=condition,
                                        conditioning_scale=self.settings.controlnet_scale, return_dict=False)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.unet(latents, t, encoder_hidden_states=embeddings, **residuals).sample.float()

    @contextmanager
    def smaller_chunks(self, divisor: int = 2) -> Iterator[None]:
        """Within the block, chunks and inversion batches are `divisor` times smaller (at least 1 frame)."""
        previous, self.chunk_divisor = self.chunk_divisor, self.chunk_divisor * divisor
        try:
            yield
        finally:
            self.chunk_divisor = previous

    def chunk_size_for(self, num_frames: int, latent_hw: tuple[int, int]) -> int:
        """`chunk_size`, or with "auto" the largest chunk whose estimated memory fits the budget
        (divided by `chunk_divisor`)."""
        return max(1, self._chunk_size_for(num_frames, latent_hw) // self.chunk_divisor)

    def _chunk_size_for(self, num_frames: int, latent_hw: tuple[int, int]) -> int:
        s = self.settings
        if s.chunk_size != "auto":
            return int(s.chunk_size)
        method = method_for(s)
        branches = self.max_branches()
        chunk = self._fit(num_frames, latent_hw, branches=branches, method=s.method,
                          keyframes=method.keyframes(num_frames), share=method.attended_share())
        budget = s.memory_budget_bytes or memory.available_memory_bytes(self.device)
        method.check_budget(num_frames, latent_hw, budget, branches=branches, **self._geometry())
        return chunk

    def videos_per_call(self, num_frames: int, latent_hw: tuple[int, int], most: int | None = None) -> int:
        """How many videos of `num_frames` frames may share a UNet call (`runtime.batch_videos: auto`): as many
        chunks as the memory estimate fits in the budget (`Method.chunk_bytes` of one video's chunk, which
        adds up linearly over the videos: each attends within its own chunk), 1..`most` (default
        `MAX_AUTO_BATCH_VIDEOS`). With `chunk_size: auto` one video's chunk fills the budget already: 1."""
        most = MAX_AUTO_BATCH_VIDEOS if most is None else most
        s = self.settings
        method = method_for(s)
        chunk = min(num_frames, self.chunk_size_for(num_frames, latent_hw))
        one = method.chunk_bytes(chunk, latent_hw, branches=self.max_branches(), share=method.attended_share(),
                                 keyframes=method.keyframes(num_frames), **self._geometry())
        budget = s.memory_budget_bytes or memory.available_memory_bytes(self.device)
        return max(1, min(most, int(memory.BUDGET_SHARE * budget // max(one, 1))))

    def max_branches(self) -> int:
        """The most guidance branches one UNet call of this edit runs (`Method.max_branches`): uncond and
        cond, and the source branch where some step runs it (PnP, or the method's own need)."""
        return method_for(self.settings).max_branches(self.controls)

    def inversion_batch_for(self, num_frames: int, latent_hw: tuple[int, int]) -> int:
        """`inversion_batch`, or with "auto" the largest per-frame batch that fits the budget (divided by
        `chunk_divisor`)."""
        if self.settings.inversion_batch != "auto":
            batch = int(self.settings.inversion_batch)
        else:
            batch = self._fit(num_frames, latent_hw, branches=1, method="per-frame", share=1.0)
        return max(1, batch // self.chunk_divisor)

    def _fit(self, num_frames: int, latent_hw: tuple[int, int], **estimate) -> int:
        budget = self.settings.memory_budget_bytes or memory.available_memory_bytes(self.device)
        return memory.pick_chunk_size(num_frames, budget, latent_hw=latent_hw, **self._geometry(), **estimate)

    def _geometry(self) -> dict:
        """What the memory estimates need to know of the model and device."""
        return dict(channels=self.unet.config.block_out_channels[0], heads=self._heads(),
                    dtype_bytes=torch.finfo(self.dtype).bits // 8, materialised_scores=self.device.type != "cuda")

    def _heads(self) -> int:
        heads = self.unet.config.attention_head_dim  # diffusers' name; for SD 1.x/2.x it holds the head count
        return int(heads[0] if isinstance(heads, (list, tuple)) else heads)

    # -- inversion -------------------------------------------------------------------------------

    @torch.no_grad()
    def invert(self, frames: np.ndarray, prompt: str) -> Inversion:
        """DDIM inversion of every frame with `prompt`, no guidance, in frame batches (`inversion_batch`).

        Inversion sees each frame alone (stock per-frame attention), as in VidToMe and PnP. It runs
        `inversion.steps` DDIM steps (finer steps invert more faithfully: TokenFlow inverts with
        500) and keeps the latents at the edit's timesteps only (:meth:`inversion_schedule`), which
        is all the edit reads.
        """
        timesteps, kept = self.inversion_schedule()
        clean = self.encode_frames(frames).float()
        alphas, final = self.alphas()
        embedding = self.text_embedding(prompt)
        # Inversion step k -> its row in the kept trajectory (only the edit's timesteps are kept).
        row_of = {int(k): row for row, k in enumerate(kept.tolist())}
        # Stored in the model's dtype: halves the cache for fp16 models, and a fresh inversion is
        # rounded exactly like a cached one, so a cache hit and a miss edit identically. Memory-mapped
        # from local disk: a long clip's trajectory need not fit in host memory.
        trajectory = disk_tensor((len(kept), *clean.shape), self.dtype)
        batch = self.inversion_batch_for(len(clean), tuple(clean.shape[-2:]))
        total_steps = math.ceil(len(clean) / batch) * len(timesteps)
        for start in range(0, len(clean), batch):
            x = clean[start:start + batch]
            cond = embedding.expand(len(x), -1, -1)
            alpha_from = final
            for k in range(len(timesteps) - 1, -1, -1):  # ascending noise level
                t = timesteps[k].to(self.device)
                alpha_to = alphas[timesteps[k]]
                out = self.unet_output(x, t, cond)
                x = ddim.inversion_step(x, out, alpha_from, alpha_to, self.prediction_type)
                alpha_from = alpha_to
                self.report_progress("invert", start // batch * len(timesteps) + len(timesteps) - k, total_steps)
                if k in row_of:
                    trajectory[row_of[k], start:start + len(x)] = x.cpu()
        return Inversion(timesteps=timesteps[kept], trajectory=trajectory, clean=on_disk(clean))

    # -- denoising -------------------------------------------------------------------------------

    def _start_index(self, inversion: Inversion) -> int:
        """Index into the edit timesteps where denoising starts (SDEdit skips the noisiest steps)."""
        steps = self.settings.steps
        if "sdedit" in self.controls:
            return first_step(steps, self.settings.strength)
        return 0

    @torch.no_grad()
    def denoise(self, inversion: Inversion, prompt: str, seed: int, source_prompt: str = "",
                control_images: np.ndarray | None = None, mask: np.ndarray | None = None,
                method: Method | None = None) -> Tensor:
        """Denoising from the inverted latents with `prompt`; (T, 4, h, w) on the device.

        The method decides the loop (:meth:`Method.denoise`): the engine's chunked loop
        (:meth:`guided_denoise`) unless it brings its own. `mask` (T, H, W) bool: the sample's
        foreground, for methods that use one (None: all foreground). `method`: a fresh instance of the
        editor's method for this edit (None: made here).
        """
        self._check_denoise(inversion, control_images)
        method = method_for(self.settings) if method is None else method
        return method.denoise(self, inversion, prompt, source_prompt, seed, control_images,
                              mask if method.uses_mask else None)

    def _check_denoise(self, inversion: Inversion, control_images: np.ndarray | None) -> None:
        """Raises ValueError when `inversion` was made with other steps, or the ControlNet lacks its images."""
        s = self.settings
        if not torch.equal(self.timesteps_for(s.steps), inversion.timesteps):
            # `invert` keeps the latents at the edit's timesteps: these come from other settings.
            raise ValueError(
                f"the inversion holds latents at {len(inversion.timesteps)} timesteps that are not the "
                f"{s.steps} timesteps of this edit (edit.steps {s.steps}); invert with this editor's settings")
        if self.controlnet is not None and control_images is None:
            raise ValueError("a ControlNet is loaded but no control images were given")

    @torch.no_grad()
    def denoise_videos(self, jobs: list[DenoiseJob], masks: list[np.ndarray | None] | None = None) -> list[Tensor]:
        """:meth:`denoise` of several videos; their chunks share UNet calls where the method batches videos
        (`Method.batches_videos`, the engine's own loop), else they run one at a time (said once per method).

        The result of every video is that of editing it alone with the same seed. `masks`: (T, H, W) bool
        per job, for a method that uses one. Returns (T_i, 4, h, w) latents per job, in order.
        """
        masks = masks or [None] * len(jobs)
        if len(jobs) < 2 or not batches_videos(jobs[0].method):
            results = []
            for job, mask in zip(jobs, masks):
                with self._reporting(job.progress, job.stage):
                    results.append(self.denoise(job.inversion, job.prompt, job.seed, job.source_prompt,
                                                job.control_images, mask, method=job.method))
            return results
        for job in jobs:
            self._check_denoise(job.inversion, job.control_images)
        return self.guided_denoise_videos(jobs)

    @contextmanager
    def _reporting(self, progress: Callable[[str, int, int], None] | None, stage: str | None = None) -> Iterator[None]:
        """Within the block, progress goes to `progress` under `stage` (None: left as they are)."""
        previous = self.on_step, self._stage
        self.on_step = progress if progress is not None else self.on_step
        self._stage = stage if stage is not None else self._stage
        try:
            yield
        finally:
            self.on_step, self._stage = previous

    @torch.no_grad()
    def guided_denoise(self, method: Method, inversion: Inversion, prompt: str, seed: int, source_prompt: str = "",
                       control_images: np.ndarray | None = None) -> Tensor:
        """The engine's loop for one video (:meth:`guided_denoise_videos` with one job); (T, 4, h, w)."""
        return self.guided_denoise_videos([DenoiseJob(method, inversion, prompt, seed, source_prompt,
                                                      control_images)])[0]

    @torch.no_grad()
    def guided_denoise_videos(self, jobs: list[DenoiseJob]) -> list[Tensor]:
        """The engine's loop: guided DDIM denoising, chunk by chunk, through the methods' hooks; one
        (T_i, 4, h, w) result per job.

        Per step, each video's frames are cut into chunks (`chunk_schedule`, from its own generator);
        the attention processors see one chunk per video per call. Branches per video: `[uncond,
        cond]`, with a leading `source` branch while PnP injects or the method needs it (the inverted
        latent of the step with `source_prompt`). The method's hooks
        (:class:`vidbatch.engine.method.Method`) add their steps to the loop (TokenFlow's keyframe
        pass, vid2vid-zero's null embeddings). `control_images` (T, H, W, 3) uint8 condition the
        ControlNet when one is loaded.

        Several jobs (`runtime.batch_videos`) share the steps: chunk i of every video goes into one
        UNet call, video after video, each with its branches branch-major (``B*F_i`` rows), and each
        keeps its own generators, chunk schedule and processor state (:meth:`Method.patch_videos`), so
        its result is the one it gets alone (up to the rounding of a larger matrix product). They
        must share the latent size and the timesteps (one editor: steps, method, control, guidance);
        the method must batch videos (`Method.batches_videos`).
        """
        s = self.settings
        if not jobs:
            return []
        first = jobs[0]
        if len(jobs) > 1:
            self._check_batch(jobs)
        timesteps = first.inversion.timesteps
        alphas, final = self.alphas()
        alpha_t, alpha_prev = ddim.alphas_for(alphas, final, timesteps.to(self.device))
        start = self._start_index(first.inversion)
        uncond = self.text_embedding(s.negative_prompt)
        pnp = "pnp" in self.controls
        pnp_feature_steps, pnp_attention_steps = injection_steps(s.steps, s.pnp_f_t, s.pnp_attn_t) if pnp else (0, 0)
        videos = [self._start_video(i, job, start) for i, job in enumerate(jobs)]
        if len(jobs) == 1:
            driver = None
            videos[0].state = first.method.patch(self, first.prompt, first.source_prompt)
        else:
            driver = first.method.patch_videos(self, len(jobs))
            for video, state in zip(videos, driver.videos):
                video.state = state
        injector = PnpResidualInjector(self.unet) if pnp else None
        try:
            for k in range(start, len(timesteps)):
                t = timesteps[k].to(self.device)
                inject_features, inject_qk = k < pnp_feature_steps, k < pnp_attention_steps

                def predict(segments: list[tuple[_Video, Tensor]]) -> list[Tensor]:
                    """The guided predictions of step k for the frames `idx` (on the device) of each video:
                    one UNet call on all of them, video after video."""
                    latents, embeddings, conditions, layout = [], [], [], []
                    for video, idx in segments:
                        n = len(idx)
                        branch_latents = [video.x[idx], video.x[idx]]
                        branch_embeddings = [video.step_uncond.expand(n, -1, -1), video.cond.expand(n, -1, -1)]
                        if video.with_source:
                            branch_latents.insert(0, video.source_latents[idx])
                            branch_embeddings.insert(0, video.source.expand(n, -1, -1))
                        branches = len(branch_latents)
                        video.job.method.begin_chunk(idx)
                        video.state.begin_chunk(n, branches, video.merge_generator, inject_qk=inject_qk)
                        latents += branch_latents
                        embeddings += branch_embeddings
                        layout.append((branches, n))
                        if video.condition is not None:
                            conditions.append(video.condition[idx].repeat(branches, 1, 1, 1))
                    if driver is not None:
                        driver.begin_call([video.index for video, _ in segments])
                    if injector is not None:
                        injector.active = inject_features
                        injector.num_branches, injector.segments = layout[0][0], layout if len(layout) > 1 else None
                    out = self.unet_output(torch.cat(latents), t, torch.cat(embeddings),
                                           torch.cat(conditions) if conditions else None)
                    guided = []
                    for (branches, n), part in zip(layout, out.split([b * n for b, n in layout])):
                        out_uncond, out_cond = part.chunk(branches)[-2:]
                        guided.append(out_uncond + s.guidance * (out_cond - out_uncond))
                    return guided

                for video in videos:
                    hooks = video.job.method
                    video.with_source = inject_features or inject_qk or hooks.needs_source(k)
                    video.source_latents = (video.job.inversion.trajectory[k].to(self.device, torch.float32)
                                            if video.with_source else None)
                    video.step_uncond = hooks.uncond_embedding(video.job.inversion, k, uncond)
                    video.state.begin_step()
                    # TokenFlow: the keyframe pass, on this video alone.
                    hooks.begin_step(k, len(video.x), lambda idx, v=video: predict([(v, idx)])[0], video.generator)
                    video.chunks = chunk_schedule(len(video.x), video.chunk_size, hooks.chunk_order(), video.generator)
                    # With eta > 0 the step's noise is drawn after every chunk's prediction (the generator's
                    # order), so the step waits for the whole clip's predictions. Otherwise the DDIM step is
                    # elementwise: each chunk steps as soon as it is predicted, into the next step's latents
                    # (later chunks still read this step's), so no clip-sized prediction and temporaries are
                    # held besides the two latents.
                    video.out = torch.empty_like(video.x)
                for i in range(max(len(video.chunks) for video in videos)):
                    segments = [(video, video.chunks[i].to(self.device)) for video in videos if i < len(video.chunks)]
                    _simulated_memory_limit(sum(len(idx) for _, idx in segments))
                    for (video, idx), prediction in zip(segments, predict(segments)):
                        if s.eta > 0:
                            video.out[idx] = prediction
                        else:
                            video.out[idx] = ddim.denoising_step(video.x[idx], prediction, alpha_t[k], alpha_prev[k],
                                                                 self.prediction_type, 0.0, None)
                for video in videos:
                    if s.eta > 0:
                        noise = torch.randn(video.x.shape, generator=video.generator).to(self.device)
                        video.x = ddim.denoising_step(video.x, video.out, alpha_t[k], alpha_prev[k],
                                                      self.prediction_type, s.eta, noise)
                    else:
                        video.x = video.out
                    video.out = None
                    self._report(video.job, k - start + 1, len(timesteps) - start)
        finally:
            first.method.unpatch(self.unet)
            if injector is not None:
                injector.remove()
        return [video.x for video in videos]

    def _start_video(self, index: int, job: DenoiseJob, start: int) -> _Video:
        """A video's loop state at step `start`: its generators (from its seed), start latents, embeddings."""
        generator = torch.Generator().manual_seed(job.seed)
        # Merging draws on the device (no host round trip per block), from a seed of our generator.
        merge_generator = torch.Generator(device=self.device).manual_seed(
            int(torch.randint(0, 2**62, (1,), generator=generator)))
        x = job.inversion.trajectory[start].to(self.device, torch.float32)
        condition = None
        if self.controlnet is not None:
            condition = condition_tensor(job.control_images, self.device, self.dtype)
        return _Video(index=index, job=job, generator=generator, merge_generator=merge_generator, x=x,
                      cond=self.text_embedding(job.prompt), source=self.text_embedding(job.source_prompt),
                      condition=condition, chunk_size=self.chunk_size_for(len(x), tuple(x.shape[-2:])))

    def _check_batch(self, jobs: list[DenoiseJob]) -> None:
        """Raises ValueError unless `jobs` can share UNet calls: one method that batches videos, one latent
        size, one schedule."""
        first = jobs[0]
        if not type(first.method).batches_videos:
            raise ValueError(f"edit.method {first.method.name!r} does not edit several videos in one UNet call")
        shape = tuple(first.inversion.trajectory.shape[-3:])
        for job in jobs[1:]:
            if type(job.method) is not type(first.method):
                raise ValueError(f"videos of one batch run one method, got {first.method.name!r} and {job.method.name!r}")
            if tuple(job.inversion.trajectory.shape[-3:]) != shape:
                raise ValueError(f"videos of one batch share the latent size, got {shape} and "
                                 f"{tuple(job.inversion.trajectory.shape[-3:])}")
            if not torch.equal(job.inversion.timesteps, first.inversion.timesteps):
                raise ValueError("videos of one batch share the timesteps")

    def _report(self, job: DenoiseJob, done: int, total: int) -> None:
        """Tells the job's progress callback (or the editor's `on_step`) that `done` of `total` steps are done."""
        stage = job.stage if job.stage is not None else self._stage
        if job.progress is not None:
            job.progress(stage, done, total)
        else:
            self.report_progress(stage, done, total)

    def report_progress(self, stage: str, done: int, total: int) -> None:
        """Tells `on_step` (progress inside a long video) that `done` of `total` steps of `stage` are done."""
        if self.on_step is not None:
            self.on_step(stage, done, total)

    def inversion_key(self, frames: np.ndarray, prompt: str, mask: np.ndarray | None = None) -> str:
        """The cache key: the frames' content and everything else that changes the inversion (the mask's
        content too, for a method that uses one)."""
        scheduler = json.loads(json.dumps(dict(self._scheduler.config), default=str))
        steps = self.settings.inversion_steps or self.settings.steps
        method = method_for(self.settings)
        parts = {"model": self.model_identity, "scheduler": scheduler, "dtype": str(self.dtype),
                 "steps": steps, "prompt": prompt, **method.inversion_parts()}
        if method.uses_mask:
            parts["mask"] = "all-foreground" if mask is None else mask_digest(mask)
        if steps != self.settings.steps:
            # A finer inversion keeps only the edit's timesteps: which ones is part of the entry.
            # (Equal counts keep every step, the same entry as before finer inversions existed.)
            parts["edit_steps"] = self.settings.steps
        return inversion_key(frames, parts)

    def cached_invert(self, frames: np.ndarray, prompt: str, mask: np.ndarray | None = None,
                      key: str | None = None) -> tuple[Inversion, str]:
        """`invert` through the cache; returns the inversion and "hit", "miss" or "off". `key`: the
        inversion key when the caller has it already (hashing a long clip's frames costs)."""
        method = method_for(self.settings)
        mask = mask if method.uses_mask else None

        def invert() -> Inversion:
            # Only a method that reads masks is handed one: a plug-in written before masks existed keeps
            # its three-argument `invert`.
            return method.invert(self, frames, prompt, mask) if method.uses_mask else method.invert(self, frames, prompt)

        if self.cache is None:
            return invert(), "off"
        key = key or self.inversion_key(frames, prompt, mask)
        stored = self.cache.load(key)
        if stored is not None:
            return Inversion(timesteps=stored.pop("timesteps"), trajectory=stored.pop("trajectory"),
                             clean=stored.pop("clean"), extras=stored), "hit"
        inversion = invert()
        try:
            self.cache.store(key, {"timesteps": inversion.timesteps, "trajectory": inversion.trajectory,
                                   "clean": inversion.clean, **inversion.extras})
        except OSError as exc:  # a full or read-only cache must not fail the sample
            log.warning("inversion cache: could not store %s: %s", key[:16], exc)
        return inversion, "miss"

    def shared_invert(self, frames: np.ndarray, prompt: str, mask: np.ndarray | None,
                      shared: dict[str, Inversion]) -> tuple[Inversion, str]:
        """`cached_invert`, first looking in `shared` (inversions of this video made by other editors of the
        same model, by inversion key): returns it with "shared", or adds this one."""
        method = method_for(self.settings)
        key = self.inversion_key(frames, prompt, mask if method.uses_mask else None)
        if key in shared:
            return shared[key], "shared"
        inversion, status = self.cached_invert(frames, prompt, mask, key)
        shared[key] = inversion
        return inversion, status

    def edit(self, frames: np.ndarray | FrameFile, source_prompt: str, edits: list[tuple[str, str]], *,
             seed: int, key: str, control_images: np.ndarray | None = None,
             mask: np.ndarray | None = None, shared: dict[str, Inversion] | None = None) -> EditedVideo:
        """Inverts `frames` once (or takes the inversion from the cache) and applies every edit.

        `frames` (T, H, W, 3) uint8: an array, or a `FrameFile` for a clip that need not fit in host memory
        (it is read a VAE batch at a time, and the edited frames are written to `FrameFile`s too).

        The inversion time is counted on the first edit; the others reuse it (their `inversion_use`
        is "shared"). `mask` (T, H, W) bool is the sample's foreground, used by methods that read one
        (None: all foreground). `shared`: inversions of this video other editors made (see
        `shared_invert`); with it, editors with different methods but the same inversion invert once.
        """
        return self.edit_videos([VideoRequest(frames, source_prompt, edits, seed, key, control_images, mask,
                                              shared)])[0]

    def edit_videos(self, requests: list[VideoRequest]) -> list[EditedVideo]:
        """:meth:`edit` of several videos: each is inverted alone, then their edits are denoised together,
        edit by edit (the i-th edit of every video that has one, :meth:`denoise_videos`: one UNet call per
        chunk of all of them where the method batches videos), and decoded.

        Each video's result is the one :meth:`edit` gives it alone (its own seeds, from its key and the
        edit's name). The videos must share the latent size. An edit's `seconds["edit"]` is its equal share
        of the batch's denoising plus its own decoding. Any failure raises (the caller may edit the videos
        one at a time to find the one that failed).
        """
        results: list[EditedVideo] = []
        inversions: list[Inversion] = []
        invert_seconds: list[float] = []
        for request in requests:
            result = EditedVideo(frames={})
            started = time.perf_counter()
            with self._reporting(request.progress):
                if request.shared is None:
                    inversion, result.inversion_cache = self.cached_invert(request.frames, request.source_prompt,
                                                                           request.mask)
                else:
                    inversion, result.inversion_cache = self.shared_invert(request.frames, request.source_prompt,
                                                                           request.mask, request.shared)
            invert_seconds.append(time.perf_counter() - started)
            inversions.append(inversion)
            results.append(result)
        for i in range(max((len(r.edits) for r in requests), default=0)):
            members = [n for n, request in enumerate(requests) if i < len(request.edits)]
            jobs = []
            for n in members:
                request, (name, prompt) = requests[n], requests[n].edits[i]
                results[n].inversion_use[name] = results[n].inversion_cache if i == 0 else "shared"
                jobs.append(DenoiseJob(method_for(self.settings), inversions[n], prompt,
                                       sample_seed(request.seed, request.key, name), request.source_prompt,
                                       request.control_images, progress=request.progress, stage=f"edit {name}"))
            started = time.perf_counter()
            self._stage = jobs[0].stage
            latents = self.denoise_videos(jobs, [requests[n].mask for n in members])
            share = (time.perf_counter() - started) / len(jobs)
            for n, video_latents in zip(members, latents):
                request, result, name = requests[n], results[n], requests[n].edits[i][0]
                started = time.perf_counter()
                # Edited frames are kept like the source frames: in memory, or on disk for a `FrameFile`.
                decode = self.decode_latents_to_file if isinstance(request.frames, FrameFile) else self.decode_latents
                result.frames[name] = decode(video_latents)
                result.seconds[name] = {"invert": invert_seconds[n] if result.inversion_use[name] != "shared" else 0.0,
                                        "edit": share + time.perf_counter() - started}
        return results
