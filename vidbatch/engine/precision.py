"""Running the UNet in float32 for a while: what optimising through a half-precision model needs.

Gradients through a float16 UNet underflow (a mean-squared loss over every latent value of a video gives
per-value gradients below float16's smallest number on the late, low-error steps), and in float16 or
bfloat16 the surviving gradients are so coarse that Adam, which normalises them entry by entry, follows
rounding noise. The methods that optimise through the UNet (vid2vid-zero's and VideoDirector's null-text
tuning, VideoDirector's STDG gradients) run it in float32, as their authors' code does or effectively does.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from vidbatch.engine.method import Editor

__all__ = ["float32_unet"]


@contextlib.contextmanager
def float32_unet(editor: Editor, prompts: tuple[str, ...] = ()) -> Iterator[None]:
    """Inside the block the editor's UNet runs in float32 (``editor.dtype`` says so, so `unet_output` casts
    its inputs to it); afterwards it is back in its own dtype, bit for bit (half-precision values are
    exactly representable in float32). Costs the float32 weights' memory meanwhile (+1.7 GB for SD 1.5).

    `prompts` are embedded before the switch: the editor's text cache must keep the model's dtype.
    """
    model_dtype = editor.dtype
    if model_dtype == torch.float32:
        yield
        return
    for prompt in prompts:
        editor.text_embedding(prompt)
    try:
        editor.unet.to(torch.float32)
        editor.dtype = torch.float32
        yield
    finally:
        editor.unet.to(model_dtype)
        editor.dtype = model_dtype
