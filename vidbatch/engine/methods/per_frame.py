"""Per-frame editing: `edit.method: per-frame`. Every frame attends to itself only, as an image
would (the stock ``AttnProcessor2_0``); the baseline the video methods are measured against.

The processor is :class:`vidbatch.engine.methods.vidtome.FrameAttnProcessor` in its ``per-frame``
mode (it also carries PnP's query/key injection and the per-block statistics).
"""

from __future__ import annotations

from vidbatch.engine import memory
from vidbatch.engine.methods.vidtome import FrameAttentionMethod

__all__ = ["PerFrame"]


class PerFrame(FrameAttentionMethod):
    name = "per-frame"
    attention_mode = "per-frame"

    @classmethod
    def chunk_bytes(cls, num_frames: int, latent_hw: tuple[int, int], *, branches: int, channels: int, heads: int,
                    dtype_bytes: int, materialised_scores: bool, share: float = 1.0, keyframes: int = 0) -> int:
        """Activations, plus an (N, N) score matrix per frame, head and branch where SDPA materialises it."""
        tokens = latent_hw[0] * latent_hw[1]
        activations = memory.activation_bytes(num_frames * tokens, branches=branches, channels=channels,
                                              dtype_bytes=dtype_bytes)
        if not materialised_scores:
            return activations
        return int(activations + branches * num_frames * heads * tokens * tokens * dtype_bytes)
