"""The device a measurement runs on: synchronising it, naming it, and its peak FLOP rate."""

from __future__ import annotations

import platform
import time

import torch

# Dense fp16/bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by device-name fragment, most
# specific first. Anything else: the measured throughput of a large matmul (see `device_peak`).
_GPU_PEAKS_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),      # SXM (device name "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on a CPU), so a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 3) -> float:
    """Best-of-`repeats` throughput of an `n x n` matmul in TFLOP/s: the practical ceiling of this device."""
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    torch.mm(a, b)  # warm-up (kernel selection, thread pool)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e12


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak TFLOP/s, where the figure comes from) for `dtype` on `device`.

    Known GPUs in half precision: the data-sheet dense tensor-core peak. Otherwise (CPUs, fp32, unknown
    GPUs): the measured throughput of a large matmul, which is what the hardware achieves in practice.
    """
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in _GPU_PEAKS_TFLOPS:
            if fragment in name:
                return tflops, f"data sheet: {name}, dense {str(dtype).removeprefix('torch.')}"
    n = 8192 if device.type == "cuda" else 2048
    tflops = matmul_tflops(device, dtype, n)
    return tflops, f"measured: torch.mm {n}x{n} {str(dtype).removeprefix('torch.')}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {_cpu_name()}, {torch.get_num_threads()} threads"
