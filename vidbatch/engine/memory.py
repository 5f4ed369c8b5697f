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
# TokenFlow's keyframe pass leaves, in every transformer block, its self-attention outputs (every
# branch) and the source branch's inputs: (branches + 1) x keyframes x tokens x channels of that
# block. Summed over SD's blocks (5 per level at 1, 1/2, 1/4 of the first level's tokens x
# channels, and the mid block) that is 8.8 times the first level's; rounded up.
RECORD_FACTOR = 10
# Upper bound on the attention scores (keyframe attention) or similarities (correspondence search)
# TokenFlow holds at once, in elements: 64 MB in float32, whatever the number of keyframes.
MAX_SCORES = 1 << 24


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


def estimate_keyframe_pass_bytes(keyframes: int, latent_hw: tuple[int, int], *, branches: int, channels: int,
                                 heads: int, dtype_bytes: int, materialised_scores: bool) -> int:
    """Peak bytes of TokenFlow's keyframe pass: one UNet call on all `keyframes` frames (it is never chunked).

    The edit branches attend over every keyframe's tokens (``K*N``), in query chunks of at most
    `MAX_SCORES` scores; the source branch attends within each keyframe. The records it leaves for
    the propagation (:func:`estimate_keyframe_records_bytes`) build up during the call.
    """
    tokens = latent_hw[0] * latent_hw[1]
    activations = ACTIVATION_FACTOR * branches * keyframes * tokens * channels * dtype_bytes
    records = estimate_keyframe_records_bytes(keyframes, latent_hw, branches=branches, channels=channels,
                                              dtype_bytes=dtype_bytes)
    scores = 0
    if materialised_scores:
        joint = keyframes * tokens
        edit = (branches - 1) * heads * joint * joint
        source = heads * keyframes * tokens * tokens
        # Scores and their softmax, each bounded by the query chunking.
        scores = 2 * (min(edit, MAX_SCORES) + min(source, MAX_SCORES)) * dtype_bytes
    return int(activations + records + scores)


def estimate_keyframe_records_bytes(keyframes: int, latent_hw: tuple[int, int], *, branches: int, channels: int,
                                    dtype_bytes: int) -> int:
    """Bytes TokenFlow's keyframe pass keeps for the propagation pass of the step (all blocks)."""
    tokens = latent_hw[0] * latent_hw[1]
    return RECORD_FACTOR * (branches + 1) * keyframes * tokens * channels * dtype_bytes


def estimate_chunk_bytes(num_frames: int, latent_hw: tuple[int, int], *, branches: int, channels: int, heads: int,
                         method: str, dtype_bytes: int, materialised_scores: bool, share: float = 1.0,
                         keyframes: int = 0) -> int:
    """Peak bytes of one UNet call on a chunk of `num_frames` frames (beyond the weights).

    `branches` is the most guidance branches a call of the method runs (with the source branch).
    For ``tokenflow`` (`keyframes`: ``ceil(T / tokenflow.batch_size)``) the peak of a step: the
    propagation of the chunk (no attention scores; a bounded similarity search) while the keyframe
    pass's records are held, or the keyframe pass itself, whichever is larger; the chunk size only
    changes the first.
    """
    tokens = latent_hw[0] * latent_hw[1]
    if method == "tokenflow":
        if keyframes < 1:
            raise ValueError("the tokenflow estimate needs the number of keyframes (ceil(frames / batch_size))")
        propagation = (ACTIVATION_FACTOR * branches * num_frames * tokens * channels * dtype_bytes
                       + estimate_keyframe_records_bytes(keyframes, latent_hw, branches=branches, channels=channels,
                                                         dtype_bytes=dtype_bytes)
                       + 4 * MAX_SCORES)   # float32 similarities of the correspondence search
        keyframe_pass = estimate_keyframe_pass_bytes(keyframes, latent_hw, branches=branches, channels=channels,
                                                     heads=heads, dtype_bytes=dtype_bytes,
                                                     materialised_scores=materialised_scores)
        return int(max(propagation, keyframe_pass))
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
