"""FLOP counting of the UNet's forward calls, the host-synchronising operators in them, and UNet
sample counting during a timed run."""

from __future__ import annotations

import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from vidbatch.engine.editor import VideoEditor
from vidbatch.tools.bench.spec import EDIT_PROMPT, SOURCE_PROMPT


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter():
    """A `FlopCounterMode` that also counts the CPU's fused SDPA kernel.

    torch's registry knows the CUDA flash / memory-efficient / cuDNN attention kernels but not
    ``_scaled_dot_product_flash_attention_for_cpu``, so on a CPU attention would count as zero.
    """
    custom = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        custom[cpu_sdpa] = _sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=custom)


def _sync_ops() -> frozenset:
    """Operators whose result the host must wait for on an accelerator: a tensor read back as a Python
    number (`.item()`, `int(t)`, `bool(t)`) or an output whose size depends on the data."""
    aten = torch.ops.aten
    names = ("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive")
    return frozenset(getattr(aten, n) for n in names if hasattr(aten, n))



def frame_rows(sample: torch.Tensor) -> int:
    """Rows of a UNet call, one frame of one branch each: (N, C, h, w) -> N; a video UNet's (B, C, F, h, w) -> B*F."""
    return int(sample.shape[0]) * (int(sample.shape[2]) if sample.ndim == 5 else 1)

class SyncOpCounter(TorchDispatchMode):
    """Counts the operators that make the host wait for the device (see `_sync_ops`). On a CPU nothing
    waits, but the count is the same as on a GPU, so it shows where a GPU run would stall."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self._ops = _sync_ops()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self._ops:
            self.count += 1
        return func(*args, **(kwargs or {}))


class UnetFlops:
    """Counts the FLOPs of the UNet's forward calls, their samples (batch rows: one frame of one guidance
    branch) and their host-synchronising operators while installed; wraps `unet.forward` on the
    instance, so any caller is seen."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.flops = self.samples = self.calls = self.syncs = 0
        self._original = unet.forward
        unet.forward = self._forward

    def _forward(self, *args, **kwargs):
        sample = args[0] if args else kwargs["sample"]
        with flop_counter() as counter, SyncOpCounter() as syncs:
            out = self._original(*args, **kwargs)
        self.flops += counter.get_total_flops()
        self.samples += frame_rows(sample)
        self.calls += 1
        self.syncs += syncs.count
        return out

    def take(self) -> dict[str, int]:
        """{"flops", "samples", "calls", "syncs"} since the last take."""
        out = {"flops": self.flops, "samples": self.samples, "calls": self.calls, "syncs": self.syncs}
        self.flops = self.samples = self.calls = self.syncs = 0
        return out

    def remove(self) -> None:
        if self.unet.__dict__.get("forward") == self._forward:
            del self.unet.forward


def probe_unet_flops(editor, frames, seed: int = 0) -> dict[str, float]:
    """UNet forward FLOPs per sample (one frame of one branch at one step), for inversion and for the edit.

    Measured on a one-step edit of all `frames` with the editor's settings (method, chunking, control),
    so whatever a method does inside its UNet calls counts (merging and matching, keyframe passes), and
    partial chunks weigh as often as they occur. The probe also warms the device up. A sample's FLOPs do
    not depend on the step or on how many guidance branches share the call (up to VidToMe's matching,
    which the branches share), so the timed run's FLOPs are these times its samples.

    Returns:
        {"invert": FLOPs per inversion sample, "edit": FLOPs per edit sample, "invert_syncs" and
        "edit_syncs": host-synchronising operators per UNet call (see `SyncOpCounter`)}.
    """
    probe = VideoEditor(editor.pipe, dataclasses.replace(editor.settings, steps=1, inversion_steps=None))
    counter = UnetFlops(editor.unet)
    try:
        inversion, _ = probe.cached_invert(frames, SOURCE_PROMPT)
        inv = counter.take()
        probe.denoise(inversion, EDIT_PROMPT, seed, SOURCE_PROMPT)
        edit = counter.take()
    finally:
        counter.remove()
    return {"invert": inv["flops"] / max(inv["samples"], 1), "edit": edit["flops"] / max(edit["samples"], 1),
            "invert_syncs": inv["syncs"] / max(inv["calls"], 1), "edit_syncs": edit["syncs"] / max(edit["calls"], 1)}


class UnetSampleCounter:
    """Counts UNet samples (batch rows: one frame of one branch) while active, via a forward pre-hook."""

    def __init__(self, unet: torch.nn.Module):
        self.samples = 0
        self.calls = 0
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs.get("sample")
        if sample is not None:
            self.samples += frame_rows(sample)
            self.calls += 1

    def take(self) -> tuple[int, int]:
        """(samples, calls) since the last take."""
        out = (self.samples, self.calls)
        self.samples = self.calls = 0
        return out

    def remove(self) -> None:
        self._handle.remove()
