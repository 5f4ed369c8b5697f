"""Telling a local path from a Hugging Face hub id in a model name, and a local path from a URL.

Model names in a config (`model.id`, `metrics.clip_model`, a ControlNet) may be either. The question
matters when the name does not exist locally: a hub id is then downloaded (or looked up in the hub
cache), while a path is a mistake worth naming ("no such folder") instead of a confusing hub error.

Inputs, outputs and cache locations may be URLs (`s3://bucket/x`, `gs://...`, any fsspec scheme):
`is_url` is the one place that tells them from local paths, and `check_url_supported` says, before any
work, when a URL's scheme is unknown or its package (s3fs, gcsfs) is missing.
"""

from __future__ import annotations

import os
import re

from fsspec.registry import get_filesystem_class, known_implementations, registry

from vidbatch.core.errors import UsageError

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


# `scheme://...`: a URL (RFC 3986 scheme characters). Anything else (`data/x.tar`, `pipe:cmd`, `C:\x`) is not.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Schemes read through WebDataset's own opener (curl), not fsspec: they keep working as before.
WEB_SCHEMES = ("http", "https")


def url_scheme(text: str) -> str | None:
    """The lower-case scheme of `scheme://...` text; None for a plain path or a `pipe:` command."""
    match = _URL.match(str(text).strip())
    return match.group(1).lower() if match else None


def is_url(text: str) -> bool:
    """True for `scheme://...` text other than `file://` (a `file://` URL names a local path)."""
    scheme = url_scheme(text)
    return scheme is not None and scheme != "file"


def local_path(text: str) -> str:
    """A `file://` URL as the local path it names (`file:///data/x.tar` -> `/data/x.tar`); other text unchanged."""
    text = str(text)
    if url_scheme(text) == "file":
        return text[len("file://"):]
    return text


def scheme_package(scheme: str) -> str | None:
    """The package that provides fsspec's `scheme` filesystem (`s3` -> `s3fs`, `gs` -> `gcsfs`), as pip names
    it; None for a filesystem inside fsspec itself (its missing dependency is named by fsspec's error)."""
    spec = known_implementations.get(scheme, {})
    package = spec.get("class", "fsspec").split(".")[0]
    return None if package == "fsspec" else package


def check_url_supported(url: str, what: str) -> None:
    """Raises UsageError unless fsspec knows `url`'s scheme and the package behind it is importable.

    `what` names the setting in the message (`--input`, `--output`). Checked before any work starts,
    so an `s3://` URL without s3fs installed, or a misspelt scheme, is one line naming the URL, the
    scheme and the fix, not a failure in every worker.
    """
    scheme = url_scheme(url)
    if scheme is None or scheme == "file":
        return
    known = set(known_implementations) | set(registry)
    if scheme not in known:
        raise UsageError(f"{what} '{url}': unknown URL scheme '{scheme}://' (not an fsspec filesystem). Fix: use a "
                         "local path, a pipe: command, or a scheme fsspec knows (s3://, gs://, az://, ...)")
    try:
        get_filesystem_class(scheme)
    except ImportError as exc:
        package = scheme_package(scheme)
        if package is None:
            raise UsageError(f"{what} '{url}': the '{scheme}://' scheme cannot be used here ({exc})") from None
        extra = " (or pip install 'vidbatch[s3]')" if package == "s3fs" else ""
        raise UsageError(f"{what} '{url}': the '{scheme}://' scheme needs the package '{package}', which is not "
                         f"installed. Fix: pip install {package}{extra}") from None
