"""The engine's plug-ins as the layers above see them: methods, controls, and how they combine.

Importing this module registers every built-in method and control. What the config, the batch
module and the tools need (names for choices, settings sections, `edit.control` resolution) comes
from here, so a method or control registered later (by a test, a user module) appears everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from vidbatch.engine.control import Control
from vidbatch.engine.controls import control_choices, control_names, get_control, parse_control, register_control
from vidbatch.engine.method import Method
from vidbatch.engine.methods import get_method, method_names, register_method

__all__ = [
    "Section",
    "control_choices",
    "control_names",
    "get_control",
    "get_method",
    "method_names",
    "parse_control",
    "register_control",
    "register_method",
    "resolve_control",
    "resolve_control_name",
    "sections",
]

AUTO = "auto"


def resolve_control_name(method: str, control: str) -> str:
    """`edit.control` with `auto` replaced by the method's `default_control`.

    The one place `auto` is resolved; an explicit value (e.g. `pnp` with vid2vid-zero) is kept as given.
    """
    if control.strip() != AUTO:
        return control
    return get_method(method).default_control


def resolve_control(method: str, control: str) -> frozenset[str]:
    """The controls an edit with `method` gets from `edit.control` (`auto` resolved per method); see `parse_control`."""
    return parse_control(resolve_control_name(method, control))


@dataclass(frozen=True)
class Section:
    """A settings section a plug-in contributes to the run config."""

    name: str
    settings_type: type
    owner: type[Method] | type[Control]


def sections() -> list[Section]:
    """Every registered method's and control's settings section: methods first, then controls, each
    in registration order. Two plug-ins may share a section only with the same settings type."""
    found: dict[str, Section] = {}
    for plugin in [*map(get_method, method_names()), *map(get_control, control_names())]:
        if plugin.section is None:
            continue
        known = found.get(plugin.section)
        if known is not None and known.settings_type is not plugin.settings_type:
            raise ValueError(f"settings section {plugin.section!r} of {plugin.name!r} is already "
                             f"{known.owner.name!r}'s, with another type")
        found.setdefault(plugin.section, Section(plugin.section, plugin.settings_type, plugin))
    return list(found.values())
