"""`python -m vidbatch.tools.bench.matching`: VidToMe's matching in float32 against a half precision.

The matching (:func:`vidbatch.engine.methods.merge.bipartite_match`) runs in the dtype of the block's
input, so in the model's dtype: float16 on a GPU, bfloat16 on CPUs with native bfloat16 (`model.dtype:
auto`). This times it in float32 and in the half dtype on the tokens of the benchmark clip's first UNet
level, and compares the decisions: which sources merge, and into which destination. A decision may
differ only at a tie, i.e. where the float32 scores that decide it are closer than the half precision's
rounding (`agree_except_ties`, :func:`differences_are_ties`).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import Tensor

from vidbatch.engine.methods.merge import bipartite_match

__all__ = ["compare_matching", "differences_are_ties", "main"]


def _scores(src: Tensor, dst: Tensor) -> Tensor:
    """(B, S, D) float64 cosine similarities."""
    a = torch.nn.functional.normalize(src.double(), dim=-1)
    b = torch.nn.functional.normalize(dst.double(), dim=-1)
    return a @ b.transpose(1, 2)


def differences_are_ties(src: Tensor, dst: Tensor, r: int, low: torch.dtype) -> dict:
    """Matches `src` into `dst` in float32 and in `low`; every decision that differs must be a tie within
    `low`'s precision. Returns counts: sources whose merged/unmerged status differs, merged sources whose
    destination differs, and how many of those differences are not ties (0 when the claim holds)."""
    s32, d32, _ = bipartite_match(src.float(), dst.float(), r)
    s16, d16, _ = bipartite_match(src.to(low), dst.to(low), r)
    scores = _scores(src, dst).max(dim=0).values              # align_batch: best over the batch, (S, D)
    best = scores.max(dim=-1).values                          # (S,) each source's score
    tolerance = 4 * torch.finfo(low).eps                      # cosines near 1: a few units of rounding
    threshold = best[s32[0]].min() if r else torch.tensor(1.0, dtype=torch.float64)
    merged32, merged16 = set(s32[0].tolist()), set(s16[0].tolist())
    status_diff = merged32 ^ merged16
    status_not_tie = [i for i in status_diff if abs(float(best[i] - threshold)) > tolerance]
    dest32 = dict(zip(s32[0].tolist(), d32[0].tolist()))
    dest16 = dict(zip(s16[0].tolist(), d16[0].tolist()))
    dest_diff = [i for i in merged32 & merged16 if dest32[i] != dest16[i]]
    dest_not_tie = [i for i in dest_diff if float(scores[i, dest32[i]] - scores[i, dest16[i]]) > tolerance]
    return {"sources": src.shape[1], "merged": r, "status_differs": len(status_diff),
            "destination_differs": len(dest_diff), "not_ties": len(status_not_tie) + len(dest_not_tie)}


def _time(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def compare_matching(tokens_per_frame: int, frames: int, channels: int, branches: int, ratio: float,
                     low: torch.dtype, seed: int = 0, repeat: int = 3) -> dict:
    """One chunk's first local level at SD-like sizes: `frames - 1` source frames into one destination
    frame, `branches` guidance branches, tokens with a shared low-rank structure (as image features have)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, channels, generator=g)
    def tokens(n: int) -> Tensor:
        return torch.randn(branches, n, 16, generator=g) @ basis + 0.3 * torch.randn(branches, n, channels, generator=g)
    src, dst = tokens((frames - 1) * tokens_per_frame), tokens(tokens_per_frame)
    r = int(src.shape[1] * ratio)
    row = differences_are_ties(src, dst, r, low)
    row["float32_s"] = _time(lambda: bipartite_match(src.float(), dst.float(), r), repeat)
    row[f"{str(low).removeprefix('torch.')}_s"] = _time(lambda: bipartite_match(src.to(low), dst.to(low), r), repeat)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidbatch.tools.bench.matching", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per frame (SD 1.5 at 512 px: 4096)")
    parser.add_argument("--frames", type=int, default=4, help="frames of the chunk")
    parser.add_argument("--channels", type=int, default=320, help="token channels (SD 1.5's first level: 320)")
    parser.add_argument("--branches", type=int, default=3, help="guidance branches")
    parser.add_argument("--ratio", type=float, default=0.9, help="local merge ratio (VidToMe's default 0.9)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    row = compare_matching(args.tokens, args.frames, args.channels, args.branches, args.ratio, getattr(torch, args.dtype))
    print(json.dumps(row))
    return 0 if row["not_ties"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
