"""SIGINT and SIGTERM as exceptions that unwind (and so clean up) instead of being lost or swallowed.

While `exit_on_signals()` is active (main thread only), SIGINT (Ctrl-C) raises `SystemExit(130)` and
SIGTERM `SystemExit(143)`: the shell's codes, 128 + the signal number. Why not the default
`KeyboardInterrupt`: a Lightning Trainer catches that one, prints its own line and calls `sys.exit(1)`,
and it replaces the SIGTERM handler with one that only takes note, so without this a SLURM requeue,
`scancel`, `kill` or a Ray shutdown would leave a shard running until SIGKILL. `SystemExit` passes
through Lightning and every `except Exception`, so each `finally` on the way runs (temporaries are
removed) and the caller can say what was left (`vidbatch.api.run`: one "interrupted" line).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's exit code for a process ended by `signum`: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


def is_stop_exit(exc: BaseException) -> bool:
    """True for the SystemExit a stop signal raised under `exit_on_signals`."""
    return isinstance(exc, SystemExit) and exc.code in {exit_code(s) for s in STOP_SIGNALS}


class _State:
    """While `holding`, a stop signal is remembered (`pending`: its number) instead of raised."""

    holding = False
    pending: int | None = None


def _raise_exit(signum: int, frame: object) -> None:
    if _State.holding:
        _State.pending = signum
        return
    raise SystemExit(exit_code(signum))


@contextmanager
def exit_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise SystemExit(130 / 143) while the block runs; the old handlers come back
    after it. Outside the main thread (where Python runs handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_exit)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def signals_held() -> Iterator[None]:
    """A section a stop signal must not cut in two (creating temporaries and the object that owns them);
    a signal that came meanwhile is raised at its end, where the owner can clean up."""
    _State.holding = True
    try:
        yield
    finally:
        _State.holding = False
        if _State.pending is not None:
            signum, _State.pending = _State.pending, None
            raise SystemExit(exit_code(signum))
