"""Where a run's messages go: `OUT/run.log` gets everything, the console only what a user must act on.

- `vidbatch` records: INFO and up to the log file, WARNING and up also to stderr.
- Third-party libraries: their warnings (transformers' and diffusers', Ray's token notice, Python
  warnings) go to the log file only, at DEBUG, tagged with their logger's name: they say nothing a user
  of vidbatch can act on, but stay there for a bug report; their INFO lines (Lightning's GPU/TPU banners
  and tips, Ray's start-up lines, config dumps) are dropped.
- `log_to_files` writes a line to the log file alone: the CLI prints the final error or interruption
  line itself and must not print it twice.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("vidbatch")

# Loggers of the libraries under us whose INFO/WARNING lines are noise on a vidbatch console.
THIRD_PARTY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "transformers",
                       "diffusers", "huggingface_hub", "ray", "py.warnings")
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class DemoteToDebug(logging.Handler):
    """Re-logs a third-party record as a DEBUG record of the `vidbatch.lib` logger ("[name] message"), so it
    reaches the run's log file (and a Ray worker's relay) but never the console."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logging.getLogger("vidbatch.lib").debug("[%s] %s", record.name, record.getMessage())
        except Exception:  # logging must never break a run
            self.handleError(record)


_set_up = False


def logs_set_up() -> bool:
    """True once `setup_logging` ran in this process (the CLI): a library caller keeps its own logging."""
    return _set_up


def demote_third_party_logs() -> None:
    """Routes the libraries' loggers (and Python warnings) to `DemoteToDebug`. Call it after they are
    imported: Lightning, transformers and Ray install their own console handlers when imported."""
    logging.captureWarnings(True)
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.addHandler(DemoteToDebug())
        logger.setLevel(logging.WARNING)   # their INFO (banners, config dumps, tips) is dropped
        logger.propagate = False
    try:  # transformers also keeps a handler of its own on its library root, re-added unless disabled
        import transformers.utils.logging as tlog

        tlog.disable_default_handler()
    except ImportError:
        pass


def setup_logging(log_file: Path | None, console: object = None) -> None:
    """Plain timestamped lines to `log_file`; warnings and errors also to stderr; third-party lines demoted
    to the file at DEBUG (see the module docstring). Replaces what an earlier call set up."""
    logger = logging.getLogger("vidbatch")
    logger.setLevel(logging.DEBUG)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if log_file is not None:
        logger.addHandler(_file_handler(Path(log_file)))
    stream = logging.StreamHandler(sys.stderr)
    stream.setLevel(logging.WARNING)
    stream.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(stream)
    logger.propagate = False
    global _set_up
    _set_up = True
    demote_third_party_logs()


def _file_handler(path: Path) -> logging.FileHandler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FORMAT))
    return handler


@contextmanager
def run_log(log_file: Path) -> Iterator[bool]:
    """Makes sure `log_file` gets the run's `vidbatch` records while the block runs (the Python API's way to
    write `OUT/run.log` like the CLI). Yields True when it added the handler (and removes it afterwards),
    False when logging to that file was already set up (the CLI)."""
    logger = logging.getLogger("vidbatch")
    target = os.path.abspath(log_file)
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == target for h in logger.handlers):
        yield False
        return
    handler = _file_handler(Path(log_file))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield True
    finally:
        logger.removeHandler(handler)
        handler.close()


def log_to_files(level: int, message: str) -> None:
    """Writes `message` to the `vidbatch` logger's log files only (not the console)."""
    logger = logging.getLogger("vidbatch")
    record = logger.makeRecord(logger.name, level, __file__, 0, message, (), None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler) and level >= handler.level:
            handler.handle(record)
