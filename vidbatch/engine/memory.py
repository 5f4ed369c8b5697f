"""Memory budgeting: how many frames one UNet call may take (`merge.chunk_size: auto`).

An analytic estimate, deliberately on the safe side: activations at the UNet's first level
dominate (they scale with tokens x channels), plus the attention score matrix where the SDPA
kernel materialises it (the CPU's math kernel; CUDA's flash / memory-efficient kernels do not).
What attention costs depends on the method: each :class:`vidbatch.engine.method.Method` gives its
own estimate (``Method.chunk_bytes``) from the primitives here.
"""

from __future__ import annotations

import os

import torch

from vidbatch.engine.registry import get_method

# Bytes of live activations per token and channel at the first UNet level, in units of the dtype
# size: skip connections, resnet and attention intermediates, the GEGLU feed-forward.
ACTIVATION_FACTOR = 64
# Keep this share of the budget free for the allocator's fragmentation and the VAE.
BUDGET_SHARE = 0.7


def available_memory_bytes(device: torch.device) -> int:
    """Free memory of the device: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def activation_bytes(tokens: int, *, branches: int, channels: int, dtype_bytes: int) -> int:
    """Live activations of a UNet call on `tokens` latent tokens (all its frames) per branch."""
    return ACTIVATION_FACTOR * branches * tokens * channels * dtype_bytes


def estimate_chunk_bytes(num_frames: int, latent_hw: tuple[int, int], *, branches: int, channels: int, heads: int,
                         method: str, dtype_bytes: int, materialised_scores: bool, share: float = 1.0,
                         keyframes: int = 0) -> int:
    """Peak bytes of one UNet call of `method` on a chunk of `num_frames` frames (beyond the weights).

    `branches` is the most guidance branches a call of the method runs (with the source branch);
    `share` the attended share of the chunk's tokens (``Method.attended_share``), `keyframes` the
    frames of a call the chunking does not bound (``Method.keyframes``). The method's own estimate
    (``Method.chunk_bytes``) is used; `method` must be registered.
    """
    return get_method(method).chunk_bytes(num_frames, latent_hw, branches=branches, channels=channels, heads=heads,
                                          dtype_bytes=dtype_bytes, materialised_scores=materialised_scores,
                                          share=share, keyframes=keyframes)


def pick_chunk_size(num_frames: int, budget_bytes: int, **estimate_kwargs) -> int:
    """The largest chunk (1..num_frames) whose estimate fits `BUDGET_SHARE` of the budget; at least 1."""
    best = 1
    for size in range(1, num_frames + 1):
        if estimate_chunk_bytes(size, **estimate_kwargs) <= BUDGET_SHARE * budget_bytes:
            best = size
        else:
            break
    return best
