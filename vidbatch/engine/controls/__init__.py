"""Controls, one file each, registered by name; `edit.control` parsing.

Importing this package registers the built-in controls (here, in one place), in this order: `pnp`, `sdedit`,
`controlnet`. `edit.control` names one control or several joined by '+', e.g. `pnp+controlnet`;
`none` is no control. (`auto`, the method's own default, is resolved by
:func:`vidbatch.engine.plugins.resolve_control`, which knows the methods.)
"""

from __future__ import annotations

from vidbatch.core.errors import ConfigError
from vidbatch.engine.controls.controlnet import ControlNet
from vidbatch.engine.controls.pnp import Pnp
from vidbatch.engine.controls.sdedit import SDEdit
from vidbatch.engine.registry import control_names, get_control, register_control

__all__ = ["BUILTIN_CONTROLS", "NO_CONTROL", "control_choices", "control_names", "get_control", "parse_control", "register_control"]

NO_CONTROL = "none"
BUILTIN_CONTROLS = (Pnp, SDEdit, ControlNet)
for _builtin in BUILTIN_CONTROLS:
    register_control(_builtin)


def control_choices() -> tuple[str, ...]:
    """What `edit.control` may name: `none` and every registered control."""
    return (NO_CONTROL, *control_names())


def parse_control(text: str) -> frozenset[str]:
    """`'pnp+controlnet'` -> {'pnp', 'controlnet'}; `'none'` -> {}. ConfigError on unknown names."""
    choices = control_choices()
    parts = [p.strip() for p in text.split("+")]
    unknown = [p for p in parts if p not in choices]
    if unknown or (NO_CONTROL in parts and len(parts) > 1) or len(set(parts)) != len(parts):
        raise ConfigError(f"config key 'edit.control' must be 'auto', one of {', '.join(choices)} or several "
                          f"joined by '+' (e.g. 'pnp+controlnet'), got {text!r}")
    return frozenset(p for p in parts if p != NO_CONTROL)
