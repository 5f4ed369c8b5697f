"""What kind of failure an exception is: the worker's (infrastructure), the sample's, or a transient one.

The dispatchers and the worker's module decide from this what to do with a failure:
- infrastructure (a CUDA or driver error, an NCCL or cuDNN failure, a lost device): the worker is
  suspect, not the data. The worker is retired and replaced; the work goes to another worker without
  counting against the shard's retries. A CUDA error also poisons the process's CUDA context, so a
  sample that hits one must not be recorded as a failed row while the shard carries on;
- out of memory: transient; the sample is tried once more with smaller chunks;
- anything else raised by one sample: the sample's fault, recorded as a failed row with its cause;
- a lost lease (`LeaseLost`): the attempt was overtaken, not broken. Another driver (or a later attempt
  of the same one) owns the shard now, so this attempt publishes nothing and is neither a failed shard
  nor a failed row.

Classification goes by the exception's type name and message, so this module needs no torch (the
exceptions come from torch, from CUDA extensions, or across Ray as a wrapped cause).
"""

from __future__ import annotations

# Fragments of the messages CUDA, its libraries and the driver put in the exceptions torch raises
# (torch.AcceleratorError, RuntimeError); lower case. "out of memory" is deliberately not here.
INFRASTRUCTURE_MESSAGES = (
    "cuda error",
    "cuda driver error",
    "cudnn_status_",
    "cublas_status_",
    "cudnn error",
    "nccl error",
    "device-side assert",
    "illegal memory access",
    "uncorrectable ecc error",
    "unspecified launch failure",
    "gpu has fallen off the bus",
    "no cuda gpus are available",
    "cuda-capable device(s) is/are busy or unavailable",
)
INFRASTRUCTURE_TYPES = ("AcceleratorError", "CudaError", "NcclError")
OUT_OF_MEMORY_TYPES = ("OutOfMemoryError",)


class InfrastructureError(RuntimeError):
    """The machine, not the input, failed (a device error, a hung or lost worker)."""


class LeaseLost(RuntimeError):
    """Raised by a commit's fence: the attempt no longer holds the shard's lease (it expired, was taken
    over by another driver, or names a later attempt), so its output must not be published."""


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc`, its `cause` (Ray's wrapper of a worker's exception) and its __cause__/__context__."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < 16:
        current = todo.pop()
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        inner = getattr(current, "cause", None)
        todo += [inner if isinstance(inner, BaseException) else None, current.__cause__, current.__context__]
    return seen


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error (torch.OutOfMemoryError or its CUDA message)."""
    for e in _chain(exc):
        if type(e).__name__ in OUT_OF_MEMORY_TYPES or "out of memory" in str(e).lower():
            return True
    return False


def is_lease_lost(exc: BaseException) -> bool:
    """True when `exc` is (or wraps, across Ray) a `LeaseLost`."""
    return any(isinstance(e, LeaseLost) or type(e).__name__ == LeaseLost.__name__ for e in _chain(exc))


def is_infrastructure_error(exc: BaseException) -> bool:
    """True when `exc` says the device or the worker failed rather than the sample (see the module doc)."""
    for e in _chain(exc):
        if isinstance(e, InfrastructureError) or type(e).__name__ in INFRASTRUCTURE_TYPES:
            return True
        if type(e).__name__ in OUT_OF_MEMORY_TYPES:
            continue
        message = str(e).lower()
        if "out of memory" not in message and any(part in message for part in INFRASTRUCTURE_MESSAGES):
            return True
    return False
