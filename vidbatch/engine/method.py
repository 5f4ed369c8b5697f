"""What an editing method is to the engine: the :class:`Method` base class, and the data it sees.

The engine (:class:`vidbatch.engine.editor.VideoEditor`) runs one loop for every method: VAE
encode, DDIM inversion, per step the chunks of frames through the UNet with guidance branches
``[source?, uncond, cond]``, VAE decode. A method changes that loop only through the hooks of its
:class:`Method` subclass, and tells the memory budget what one of its UNet calls costs. One file
per method (``vidbatch/engine/methods/*.py``) holds its settings section, its attention processors
and its Method subclass, registered with :func:`vidbatch.engine.registry.register_method`.

A Method instance lives for one :meth:`VideoEditor.denoise` (or one inversion, or one memory
estimate): hooks may keep state on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor

from vidbatch.engine import memory

__all__ = ["Editor", "EditorSettings", "Inversion", "Method", "ProcessorState", "VideoBatchState"]


@dataclass
class EditorSettings:
    """What the engine needs to know; built by the application from the run config.

    `method_settings` is the chosen method's settings section (an instance of its
    ``Method.settings_type``, e.g. :class:`vidbatch.engine.methods.tokenflow.TokenFlowConfig`);
    None: the section's defaults.
    """

    method: str = "per-frame"
    control: str = "none"                     # registered control names joined by '+', "none", or "auto" (per method)
    method_settings: Any = None               # the method's settings section; None: its defaults
    pnp_f_t: float = 0.8
    pnp_attn_t: float = 0.5
    controlnet_scale: float = 1.0
    steps: int = 50
    inversion_steps: int | None = None
    guidance: float = 7.5
    negative_prompt: str = ""
    eta: float = 0.0
    strength: float = 1.0
    chunk_size: int | str = 4                 # frames per UNet call, or "auto" (fit memory_budget_bytes)
    memory_budget_bytes: int | None = None    # for "auto"; None: what the device has free
    chunk_order: str = "seq"
    vae_batch: int = 8
    inversion_batch: int | str = 8            # frames per inversion UNet call, or "auto"


@dataclass
class Inversion:
    """A DDIM inversion trajectory of one video, at the edit's timesteps.

    timesteps: (S,) the edit's DDIM timesteps, descending (``S = edit.steps``). The inversion itself
    may run finer (``inversion.steps`` a refinement of the edit's schedule); only the latents at the
    edit's timesteps are kept. trajectory: (S, T, 4, h, w) on the CPU; trajectory[k] is the latent at
    timesteps[k] (trajectory[0] is the noisiest), i.e. the latent denoising step k starts from.
    clean: (T, 4, h, w), the VAE latents of the frames.
    extras: method-specific tensors cached with the trajectory (vid2vid-zero: "null_embeddings").
    """

    timesteps: Tensor
    trajectory: Tensor
    clean: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


class Editor(Protocol):
    """What a method may use of the engine that runs it (:class:`vidbatch.engine.editor.VideoEditor`).

    The editor drives the methods and hands itself to their hooks; stating what they call back into
    here keeps the dependency one way (the editor imports this module, not the reverse).
    """

    pipe: Any
    unet: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    settings: EditorSettings
    prediction_type: str

    def text_embedding(self, prompt: str) -> Tensor: ...

    def invert(self, frames: np.ndarray, prompt: str) -> Inversion: ...

    def inversion_batch_for(self, num_frames: int, latent_hw: tuple[int, int]) -> int: ...

    def unet_output(self, latents: Tensor, t: Tensor, embeddings: Tensor, condition: Tensor | None = None) -> Tensor: ...

    def alphas(self) -> tuple[Tensor, Tensor]: ...

    def encode_frames(self, frames: np.ndarray) -> Tensor: ...

    def report_progress(self, stage: str, done: int, total: int) -> None: ...

    def timesteps_for(self, steps: int) -> Tensor: ...

    def guided_denoise(self, method: "Method", inversion: Inversion, prompt: str, seed: int, source_prompt: str = "",
                       control_images: np.ndarray | None = None) -> Tensor: ...


class ProcessorState(Protocol):
    """What the engine calls on the state a method's :meth:`Method.patch` returns."""

    def begin_step(self) -> None:
        """A denoising step starts (forget what the previous step's chunks left)."""

    def begin_chunk(self, num_frames: int, num_branches: int, generator: torch.Generator | None = None,
                    inject_qk: bool = False) -> None:
        """The next UNet call: ``num_branches * num_frames`` rows, branch-major; `inject_qk`: PnP's
        query/key injection is on in this step."""


class VideoBatchState(Protocol):
    """What :meth:`Method.patch_videos` returns: one processor state per video of a batch, behind one patch.

    A UNet call of a batch (`runtime.batch_videos`) holds a chunk of several videos one after the other,
    each branch-major on its own (``B_i * F_i`` rows of video ``i``); the processors split the batch into
    these segments and treat each with its video's state (its own merge matching, global tokens, PnP
    source branch), so every video is edited as it would be alone.
    """

    videos: list[ProcessorState]

    def begin_call(self, active: list[int]) -> None:
        """The next UNet call holds the chunks of `videos[i]` for i in `active`, in that order (each declared
        with its state's ``begin_chunk`` already)."""


class Method:
    """Base class of editing methods. Subclass it, set the class attributes, override the hooks
    that differ, register the class (:func:`vidbatch.engine.registry.register_method`).

    Class attributes:
        name: the `edit.method` value.
        section: the config section of its settings (``None``: no settings).
        settings_type: the dataclass of that section; its fields are declared with
            :func:`vidbatch.core.settings.setting` (default, choices, bounds, help), so the config
            validates them and ``--set section.key=value`` works.
        default_control: what `edit.control: auto` means for this method.
        batches_videos: whether chunks of several videos may share one UNet call
            (`runtime.batch_videos`, :meth:`patch_videos`); a method whose hooks or loop follow one
            video (TokenFlow's keyframe pass, its own `denoise`) leaves it False and its videos are
            edited one at a time.

    The defaults serve a method that only swaps self-attention processors: no source branch of its
    own, the configured chunk order, the negative prompt's embedding, plain DDIM inversion.
    """

    name: ClassVar[str] = ""
    section: ClassVar[str | None] = None
    settings_type: ClassVar[type | None] = None
    default_control: ClassVar[str] = "pnp"
    # A text-to-video method runs a UNet inflated with a motion module (`model.motion_adapter`); the
    # image methods run the plain SD UNet and cannot run a video one.
    needs_motion_module: ClassVar[bool] = False
    # Whether the method reads the sample's foreground mask (`{key}.mask.mp4`); only then is it decoded
    # and made part of the inversion's cache key.
    uses_mask: ClassVar[bool] = False
    # Whether `patch_videos` is implemented: several videos' chunks in one UNet call.
    batches_videos: ClassVar[bool] = False

    def __init__(self, settings: EditorSettings) -> None:
        self.settings = settings
        # This method's settings section: given, or the section's defaults.
        self.config = settings.method_settings if settings.method_settings is not None else self.default_settings()

    @classmethod
    def default_settings(cls) -> Any:
        """An instance of `settings_type` with its defaults, or None for a method without settings."""
        return cls.settings_type() if cls.settings_type is not None else None

    # -- the denoising loop ------------------------------------------------------------------------

    def denoise(self, editor: Editor, inversion: Inversion, prompt: str, source_prompt: str, seed: int,
                control_images: np.ndarray | None = None, mask: np.ndarray | None = None) -> Tensor:
        """The edited latents (T, 4, h, w): by default the engine's chunked, guided loop
        (:meth:`Editor.guided_denoise`) driven through this method's hooks. A method whose loop is not
        that one (VideoDirector: windows of a video UNet, a four-branch batch) overrides this.
        `mask`: (T, H, W) bool foreground, for methods that `uses_mask`; None: all foreground."""
        return editor.guided_denoise(self, inversion, prompt, seed, source_prompt, control_images)

    def patch(self, editor: Editor, prompt: str, source_prompt: str) -> ProcessorState:
        """Install the attention processors for one edit; returns the state the loop drives."""
        raise NotImplementedError(f"method {self.name!r} installs no attention processors")

    def patch_videos(self, editor: Editor, count: int) -> VideoBatchState:
        """Install the attention processors for `count` videos edited together (only where
        `batches_videos`); returns their states. Undone by :meth:`unpatch`."""
        raise NotImplementedError(f"method {self.name!r} does not edit several videos in one UNet call")

    def unpatch(self, unet: torch.nn.Module) -> None:
        """Restore what :meth:`patch` replaced (called even when the edit failed)."""

    def chunk_order(self) -> str:
        """How the frames are cut into chunks and visited each step (`seq`, `rand`, `mix`)."""
        return self.settings.chunk_order

    def needs_source(self, step: int) -> bool:
        """Whether `step` runs the source branch even where PnP does not inject."""
        return False

    def uncond_embedding(self, inversion: Inversion, step: int, default: Tensor) -> Tensor:
        """The unconditional branch's (1, 77, C) embedding at `step`; `default` is the negative prompt's."""
        return default

    def begin_step(self, step: int, num_frames: int, predict, generator: torch.Generator) -> None:
        """Runs before a step's chunks; `predict(frames)` is the guided UNet on any frames, (F, 4, h, w)."""

    def begin_chunk(self, frames: Tensor) -> None:
        """The video frame indices (F,) of the next UNet call."""

    # -- inversion -------------------------------------------------------------------------------

    def inversion_parts(self) -> dict:
        """Settings beyond the DDIM inversion's that change a cached inversion (part of its key)."""
        return {}

    def invert(self, editor: Editor, frames: np.ndarray, prompt: str, mask: np.ndarray | None = None) -> Inversion:
        """The inversion this method edits from: (T, H, W, 3) uint8 frames -> :class:`Inversion`.
        `mask`: (T, H, W) bool foreground for methods that `uses_mask` (None: all foreground)."""
        return editor.invert(frames, prompt)

    # -- memory profile ----------------------------------------------------------------------------

    def max_branches(self, controls: frozenset[str]) -> int:
        """The most guidance branches one UNet call runs: uncond and cond, plus the source branch
        where some step runs it (with PnP among `controls`, or where :meth:`needs_source` says so)."""
        return 3 if "pnp" in controls else 2

    def attended_share(self) -> float:
        """Tokens one query attends over, as a share of the chunk's ``F*N`` (for :meth:`chunk_bytes`)."""
        return 1.0

    def keyframes(self, num_frames: int) -> int:
        """Frames of a UNet call the chunking does not bound (TokenFlow's keyframe pass); 0: none."""
        return 0

    @classmethod
    def chunk_bytes(cls, num_frames: int, latent_hw: tuple[int, int], *, branches: int, channels: int, heads: int,
                    dtype_bytes: int, materialised_scores: bool, share: float = 1.0, keyframes: int = 0) -> int:
        """Peak bytes of one UNet call on `num_frames` frames (beyond the weights); see :mod:`memory`.

        The default: every query attends over `share` of the chunk's ``F*N`` tokens (joint attention).
        """
        tokens = latent_hw[0] * latent_hw[1]
        activations = memory.activation_bytes(num_frames * tokens, branches=branches, channels=channels,
                                              dtype_bytes=dtype_bytes)
        if not materialised_scores:
            return activations
        joint = num_frames * tokens * share
        return int(activations + branches * heads * joint * joint * dtype_bytes)

    def check_budget(self, num_frames: int, latent_hw: tuple[int, int], budget_bytes: int, *, branches: int,
                     channels: int, heads: int, dtype_bytes: int, materialised_scores: bool) -> None:
        """Warn when a part of the step the chunk size does not bound will not fit `budget_bytes`."""
