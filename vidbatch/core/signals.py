"""SIGINT and SIGTERM as exceptions that unwind (and so clean up) instead of being lost or swallowed.

Two handlers, for two kinds of code:
- `exit_on_signals()` (a shard's Lightning loop): SIGINT raises `SystemExit(130)`, SIGTERM
  `SystemExit(143)`, the shell's codes (128 + the signal number). Not `KeyboardInterrupt`: a Lightning
  Trainer catches that, prints its own line and calls `sys.exit(1)`; and it replaces the SIGTERM handler
  with one that only takes note, so a SLURM requeue, `scancel`, `kill` or a Ray shutdown would leave a
  shard running until SIGKILL. `SystemExit` passes through Lightning and every `except Exception`.
- `interrupt_on_signals()` (a run's driver): both raise `KeyboardInterrupt`. Ray's blocking calls turn
  a `SystemExit` raised in a handler into `SystemExit(1)`, but pass a `KeyboardInterrupt` on.
Both remember the signal, so `stop_code` gives 130 or 143 whichever exception arrives. Every `finally`
on the way runs (temporaries are removed), and the caller says what was left
(`vidbatch.dispatch.run.interruption`: one line).
"""

from __future__ import annotations

import signal
import threading
from contextlib import AbstractContextManager, contextmanager
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's exit code for a process ended by `signum`: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


class _State:
    """`received`: the last stop signal seen. While `holding`, a stop signal is remembered (`pending`)
    instead of raised."""

    received: int | None = None
    holding = False
    pending: int | None = None


def stop_code(exc: BaseException) -> int | None:
    """130 or 143 when `exc` is how a stop signal (or Ctrl-C) arrived, else None."""
    if isinstance(exc, SystemExit):
        return exc.code if exc.code in {exit_code(s) for s in STOP_SIGNALS} else None
    if isinstance(exc, KeyboardInterrupt):
        return exit_code(_State.received or signal.SIGINT)
    return None


def _raise_exit(signum: int, frame: object) -> None:
    _State.received = signum
    if _State.holding:
        _State.pending = signum
        return
    raise SystemExit(exit_code(signum))


def _raise_interrupt(signum: int, frame: object) -> None:
    _State.received = signum
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def _handling(handler: Callable[[int, object], None]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # Python runs handlers there only
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def exit_on_signals() -> AbstractContextManager[None]:
    """SIGINT/SIGTERM raise SystemExit(130 / 143) while the block runs; the old handlers come back after."""
    return _handling(_raise_exit)


def interrupt_on_signals() -> AbstractContextManager[None]:
    """SIGINT/SIGTERM raise KeyboardInterrupt while the block runs (see `stop_code` for which)."""
    return _handling(_raise_interrupt)


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
