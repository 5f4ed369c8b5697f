"""What a control is to the engine: the :class:`Control` base class.

A control ties the edit to the source video (`edit.control`: PnP feature injection, SDEdit's late
start, a ControlNet). One file per control (``vidbatch/engine/controls/*.py``) holds its settings
section and its Control subclass, registered with
:func:`vidbatch.engine.registry.register_control`; `edit.control` then accepts its name, alone or
joined with others by '+'.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = ["Control"]


class Control:
    """Base class of controls. Subclass it, set the class attributes, register the class.

    Class attributes:
        name: the `edit.control` value (not "none" or "auto", which are reserved).
        section: the config section of its settings (``None``: no settings).
        settings_type: the dataclass of that section, fields declared with
            :func:`vidbatch.core.settings.setting`.
        needs_model: the control runs a model of its own that the application loads (ControlNet).
    """

    name: ClassVar[str] = ""
    section: ClassVar[str | None] = None
    settings_type: ClassVar[type | None] = None
    needs_model: ClassVar[bool] = False

    @classmethod
    def check(cls, settings: Any) -> None:
        """Raise ConfigError when the control is chosen but its `settings` (its section, or None)
        cannot work; called by the config validator."""
