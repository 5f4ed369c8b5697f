"""Memory budgeting: how many frames one UNet call may take (`merge.chunk_size: auto`).

An analytic estimate, deliberately on the safe side: activations at the UNet's first level
dominate (they scale with tokens x channels), plus the attention score matrix where the SDPA
kernel materialises it (the CPU's math kernel; CUDA's flash / memory-efficient kernels do not).
"""

from __future__ import annotations

import os

import torch

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


def attended_share(method: str, local_ratio: float, global_ratio: float, global_merge: bool, stride: int) -> float:
    """Tokens one query attends over, as a share of the chunk's `F*N` (1 for extended attention)."""
    if method != "vidtome":
        return 1.0
    kept = 1.0 - local_ratio * (1.0 - 1.0 / stride)   # one recursion level: an upper bound
    return kept * (2.0 - global_ratio) if global_merge else kept


def estimate_chunk_bytes(num_frames: int, latent_hw: tuple[int, int], *, branches: int, channels: int, heads: int,
                         method: str, dtype_bytes: int, materialised_scores: bool, share: float = 1.0) -> int:
    """Peak bytes of one UNet call on a chunk of `num_frames` frames (beyond the weights)."""
    tokens = latent_hw[0] * latent_hw[1]
    activations = ACTIVATION_FACTOR * branches * num_frames * tokens * channels * dtype_bytes
    if not materialised_scores:
        return activations
    if method == "per-frame":
        scores = branches * num_frames * heads * tokens * tokens * dtype_bytes
    else:
        joint = num_frames * tokens * share
        scores = branches * heads * joint * joint * dtype_bytes
    return int(activations + scores)


def pick_chunk_size(num_frames: int, budget_bytes: int, **estimate_kwargs) -> int:
    """The largest chunk (1..num_frames) whose estimate fits `BUDGET_SHARE` of the budget; at least 1."""
    best = 1
    for size in range(1, num_frames + 1):
        if estimate_chunk_bytes(size, **estimate_kwargs) <= BUDGET_SHARE * budget_bytes:
            best = size
        else:
            break
    return best
