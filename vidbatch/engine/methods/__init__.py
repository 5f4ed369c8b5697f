"""Editing methods, one file each; importing this package registers the built-ins.

The built-in methods, in this order: `per-frame`, `extended`, `vidtome`, `tokenflow`,
`vid2vid-zero`, `videodirector`. Each module holds its settings section, its attention processors and its
:class:`vidbatch.engine.method.Method` subclass; they are registered here, in one place, so the
order (of `edit.method` choices, of bench columns) is stated rather than implied by imports.
`merge` holds VidToMe's pure merging functions.
"""

from __future__ import annotations

from vidbatch.engine.methods.extended import Extended
from vidbatch.engine.methods.per_frame import PerFrame
from vidbatch.engine.methods.tokenflow import TokenFlow
from vidbatch.engine.methods.vid2vid_zero import Vid2VidZero
from vidbatch.engine.methods.videodirector import VideoDirector
from vidbatch.engine.methods.vidtome import VidToMe
from vidbatch.engine.registry import get_method, method_names, register_method

__all__ = ["BUILTIN_METHODS", "get_method", "method_names", "register_method"]

BUILTIN_METHODS = (PerFrame, Extended, VidToMe, TokenFlow, Vid2VidZero, VideoDirector)
for _builtin in BUILTIN_METHODS:
    register_method(_builtin)
