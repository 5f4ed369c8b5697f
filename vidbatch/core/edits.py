"""An edit: a name (it names the output member `{key}.{name}.mp4`) and a prompt; the run config and a
sample's own json both give them, so the type lives below both."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vidbatch.core.settings import setting

EDIT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class EditSpec:
    name: str = setting("", help="names the output member {key}.{name}.mp4: letters, digits, _ and -")
    prompt: str = setting("", help="edit prompt; '{prompt}' stands for the sample's own description")
