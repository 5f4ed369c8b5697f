"""CPU tensors whose memory is a file on local disk, for data that grows with a clip's length.

An inversion trajectory holds one latent per frame and step: for SD 1.5 at 512 px and 50 steps in
float16, 1.6 GB per 1,000 frames. Kept in anonymous memory it must fit in RAM; memory-mapped from a
file (a shared mapping), the kernel writes it out and drops its pages whenever memory is short and
reads them back when a step needs them, so a clip of any length fits. Reading and writing it is
ordinary tensor indexing: nothing else changes for the code that uses it.

The file lives in the folder given (the system's temporary folder, `TMPDIR`, by default) and is
unlinked at once: the mapping keeps it alive, and the space is freed when the tensor is, or when the
process ends however it ends.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["disk_tensor", "is_disk_tensor", "on_disk"]


def disk_tensor(shape: tuple[int, ...], dtype: torch.dtype, directory: str | Path | None = None) -> torch.Tensor:
    """An uninitialised CPU tensor of `shape` and `dtype` memory-mapped from a new file in `directory`."""
    numel = math.prod(shape)
    fd, path = tempfile.mkstemp(prefix="vidbatch-latents-", suffix=".bin", dir=directory)
    try:
        os.ftruncate(fd, max(1, numel) * torch.empty((), dtype=dtype).element_size())
        flat = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(fd)
        os.unlink(path)
    return flat.view(shape)


def on_disk(tensor: torch.Tensor, directory: str | Path | None = None) -> torch.Tensor:
    """A `disk_tensor` copy of `tensor` (any device), with its shape and dtype."""
    out = disk_tensor(tuple(tensor.shape), tensor.dtype, directory)
    out.copy_(tensor)
    return out


def is_disk_tensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s memory is a file mapping (made by `disk_tensor` or `torch.from_file`)."""
    return tensor.device.type == "cpu" and tensor.untyped_storage().filename is not None
