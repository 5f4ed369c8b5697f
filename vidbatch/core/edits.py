"""An edit: a name (it names the output member `{key}.{name}.mp4`), a prompt, and optionally its own method,
control and settings; the run config and a sample's own json both give them, so the type lives below both."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vidbatch.core.settings import setting

EDIT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class EditSpec:
    name: str = setting("", help="names the output member {key}.{name}.mp4: letters, digits, _ and -")
    prompt: str = setting("", help="edit prompt; '{prompt}' stands for the sample's own description")
    method: str | None = setting(None, help="this edit's edit.method; null: the run's")
    control: str | None = setting(None, help="this edit's edit.control; null: the run's")
    set: dict[str, Any] = setting({}, help="this edit's own settings: dotted keys of edit.*, inversion.* or a "
                                  "method's or control's section, e.g. {tokenflow.batch_size: 8}")

    @property
    def overrides(self) -> dict[str, Any]:
        """Every setting this edit changes, as dotted keys: `method`, `control`, then `set`."""
        changed = {}
        if self.method is not None:
            changed["edit.method"] = self.method
        if self.control is not None:
            changed["edit.control"] = self.control
        changed.update(self.set)
        return changed
