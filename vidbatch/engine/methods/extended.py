"""Extended attention: `edit.method: extended`. In every self-attention each frame's queries attend
over the keys and values of all ``F*N`` tokens of its chunk (per guidance branch): the frames of a
chunk see each other, at a cost quadratic in the chunk.

The processor is :class:`vidbatch.engine.methods.vidtome.FrameAttnProcessor` in its ``extended``
mode (VidToMe without merging). The memory estimate is the base class's joint attention.
"""

from __future__ import annotations

from vidbatch.engine.methods.vidtome import FrameAttentionMethod

__all__ = ["Extended"]


class Extended(FrameAttentionMethod):
    name = "extended"
    attention_mode = "extended"
