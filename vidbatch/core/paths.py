"""Telling a local path from a Hugging Face hub id in a model name the user gave.

Model names in a config (`model.id`, `metrics.clip_model`, a ControlNet) may be either. The question
matters when the name does not exist locally: a hub id is then downloaded (or looked up in the hub
cache), while a path is a mistake worth naming ("no such folder") instead of a confusing hub error.
"""

from __future__ import annotations

import os
import re

# What a hub id looks like: `name` or `org/name`, each part letters, digits, `_`, `-` and `.`.
# The hub refuses anything else (two slashes, spaces, backslashes), so such text can only be a path.
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def looks_like_path(text: str) -> bool:
    """True when `text` names a local file or folder rather than a hub id (`org/name` or `name`).

    The rule, in order:
    - empty text is neither; it is not a path;
    - it exists locally (after `~` expansion): a path, even when it also has the shape of a hub id
      (`models/sd15`), as the loaders themselves prefer a local folder of that name;
    - absolute, or starting with `.` or `~` (`./x`, `../x`, `.\\x`, `~/x`): a path; a hub id never
      starts with those characters;
    - anything a hub id cannot be (two or more slashes, a backslash, a space, `C:`): a path.
    A missing `org/name` is therefore a hub id: "contains a separator" alone would send every hub id
    down the local-path branch.
    """
    text = str(text).strip()
    if not text:
        return False
    if os.path.exists(os.path.expanduser(text)):
        return True
    if os.path.isabs(text) or text.startswith((".", "~")):
        return True
    return _HUB_ID.fullmatch(text) is None
