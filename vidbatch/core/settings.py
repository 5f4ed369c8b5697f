"""Declaring settings: a dataclass field with the constraints the config validator checks.

Lives in core so that every layer can declare a settings section (an engine method's, a control's,
the run config's own) without importing the config package, which sits above the engine.
"""

from __future__ import annotations

import json
from dataclasses import field
from typing import Any

__all__ = ["setting"]


def setting(default: Any, *, choices: list | None = None, minimum: float | None = None,
            maximum: float | None = None, help: str = "") -> Any:
    """A dataclass field whose metadata holds what the config validator checks.

    Args:
        default: the value when the config does not set the key. A list or dict default is
            copied for every instance (through JSON, so it must be plain data).
        choices: the only values allowed (checked after type coercion).
        minimum, maximum: inclusive bounds of a number.
        help: one line for the user; `vidbatch run --help`-style listings and error messages use it.
    """
    meta = {"choices": choices, "min": minimum, "max": maximum, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=meta)
    return field(default=default, metadata=meta)
