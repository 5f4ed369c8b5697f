"""Prompt-to-prompt (Hertz et al.) as pure functions: aligning two prompts' tokens, controlling cross-attention maps.

Shared by the methods that edit with it (vid2vid-zero, VideoDirector): the edit branch's cross-attention
maps are taken from the source branch's (``replace``) or, for the words the prompts share, mapped through a
token alignment (``refine``), during the first steps of the denoising.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["controlled_steps", "refine_mapping", "replace_maps", "token_ids"]


def token_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's token ids with its start and end tokens, no padding (what `refine_mapping` aligns)."""
    return list(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids)


def controlled_steps(share: float, steps: int) -> int:
    """How many of `steps` denoising steps (the first ones) run under prompt-to-prompt control at `share`.

    Prompt-to-prompt's ``get_time_words_attention_alpha`` (which vid2vid-zero and VideoDirector call) builds an
    alpha table of ``steps + 1`` rows whose first ``int(share * (steps + 1))`` are 1: 40 of 50 steps at 0.8,
    6 of 7.
    """
    return min(int(share * (steps + 1)), steps)


def refine_mapping(source_ids: list[int], edit_ids: list[int], length: int = 77) -> tuple[Tensor, Tensor]:
    """Which source token's map each edit token takes: prompt-to-prompt's global alignment of the ids.

    The alignment is prompt-to-prompt's (vid2vid-zero's ``seq_aligner.get_mapper``): Needleman-Wunsch with
    gap 0, match 1, mismatch -1, traced back from the ends of both prompts preferring, on ties, to leave
    the edit token unmatched, then to skip the source token, then to pair them. Where a token id repeats,
    this tie rule decides which occurrences pair up.

    Args:
        source_ids, edit_ids: the prompts' token ids with their start and end tokens, no padding.
        length: the text encoder's sequence length.

    Returns:
        ``mapper`` (length,) int64: for every edit position, a source position; ``alphas`` (length,)
        float32: 1 where the edit token is paired with a source token, 0 for new words, which keep their
        own maps (their ``mapper`` entry is their own position, weighted 0; the reference writes -1 there,
        the last position, also weighted 0). Positions after the edit prompt (padding) take the source's
        same position with weight 1, as in the reference.
    """
    n, m = len(source_ids), len(edit_ids)
    if n > length or m > length:
        raise ValueError(f"token sequences of {n} and {m} exceed the length {length}")
    left, up, diagonal = 1, 2, 3
    score = np.zeros((n + 1, m + 1), dtype=np.int64)          # gap 0: the first row and column stay 0
    trace = np.zeros((n + 1, m + 1), dtype=np.int64)
    trace[0, 1:], trace[1:, 0] = left, up
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            moves = (score[i, j - 1], score[i - 1, j],
                     score[i - 1, j - 1] + (1 if source_ids[i - 1] == edit_ids[j - 1] else -1))
            best = max(moves)
            score[i, j] = best
            trace[i, j] = left if moves[0] == best else up if moves[1] == best else diagonal
    mapper = torch.arange(length)
    alphas = torch.ones(length)
    i, j = n, m
    while i > 0 or j > 0:
        if trace[i, j] == diagonal:
            i, j = i - 1, j - 1
            mapper[j] = i
        elif trace[i, j] == left:
            j -= 1
            alphas[j] = 0.0                                    # an edit token without a source partner
        else:
            i -= 1
    return mapper, alphas


def replace_maps(source: Tensor, edit: Tensor, mode: str, mapper: Tensor | None = None,
                 alphas: Tensor | None = None) -> Tensor:
    """The edit branch's cross-attention maps under prompt-to-prompt control.

    source, edit: (..., N, L) attention probabilities of the source and the edit branch.
    ``replace``: the source's maps. ``refine``: ``source[..., mapper] * alphas + edit * (1 - alphas)``.
    """
    if mode == "replace":
        return source.clone()
    if mode == "refine":
        alphas = alphas.to(edit.dtype)
        return source[..., mapper] * alphas + edit * (1 - alphas)
    raise ValueError(f"unknown prompt-to-prompt mode {mode!r}")


