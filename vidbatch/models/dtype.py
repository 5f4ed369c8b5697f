"""The floating-point type a model runs in when the config says `model.dtype: auto`.

On CUDA: float16. On a CPU with native bfloat16 matrix multiplication (Intel AMX or AVX512-BF16, as
oneDNN uses them): bfloat16, measured faster there than float32 (BENCHMARKS.md). On other CPUs:
float32, where bfloat16 is emulated and slower.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["BF16_CPU_FLAGS", "auto_dtype", "cpu_flags", "native_bf16"]

# /proc/cpuinfo flags of the instructions that multiply bfloat16 natively.
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from `/proc/cpuinfo` text (read from the system when None; empty elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(flags: frozenset[str]) -> bool:
    """Whether a CPU with `flags` multiplies bfloat16 natively."""
    return bool(flags & BF16_CPU_FLAGS)


def auto_dtype(device: torch.device, flags: frozenset[str] | None = None) -> torch.dtype:
    """`model.dtype: auto` on `device` (see the module docstring); `flags` default to this CPU's."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and native_bf16(cpu_flags() if flags is None else flags):
        return torch.bfloat16
    return torch.float32
