"""Safe member names for output shards: any sample key -> a plain relative name stem.

Keys come from other people's tar files (`../../evil`, `/abs/path`, `a/b.c`, 10 kB long, bytes that
are not UTF-8). An output member is `{stem}.{edit}.mp4` / `{stem}.json`, so the stem must be a single
path component that `tarfile.extractall`, GNU tar and WebDataset all keep inside the extraction folder
and read back as one sample: letters, digits, `_` and `-` only (no dot: WebDataset splits the key at
the first dot; no separator; no leading `-`, which tools read as an option), at most
`MAX_STEM_CHARS` long. A key that already is such a name is its own stem; any other key is cleaned
and gets a short hash of the whole key, so two different keys never share a stem by cleaning.
The original key is kept in the sample's `{stem}.json` (`key`).
"""

from __future__ import annotations

import hashlib
import re

# USTAR stores names of up to 100 bytes without a separator; a stem of 64 leaves 35 for `.{edit}.mp4`.
MAX_STEM_CHARS = 64
_HASH_CHARS = 12
_SAFE_STEM = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_-]")


def is_safe_stem(stem: str) -> bool:
    """True when `stem` can name output members as it is (see the module docstring)."""
    return len(stem) <= MAX_STEM_CHARS and bool(_SAFE_STEM.match(stem))


def key_digest(key: str) -> str:
    """A short stable hash of a key (any string, lone surrogates from undecodable bytes included)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]


def safe_member_stem(key: str) -> str:
    """The member name stem of a sample key: the key itself when safe, else cleaned + `-` + its hash.

    `'clip_001'` -> `'clip_001'`; `'../../evil'` -> `'______evil-<12 hex>'`; `'/abs/path'` ->
    `'_abs_path-<12 hex>'`; `''` -> `'key-<12 hex>'`. Pure: the same key always gives the same stem.
    """
    if is_safe_stem(key):
        return key
    cleaned = _UNSAFE_CHAR.sub("_", key).lstrip("-")[: MAX_STEM_CHARS - _HASH_CHARS - 1]
    return f"{cleaned or 'key'}-{key_digest(key)}"


class MemberStems:
    """Stems of one shard's samples, unique within the shard.

    A stem already taken (a key repeated in the input, or a safe key that happens to equal another
    key's cleaned form) gets `-2`, `-3`, ... (shortened to stay within `MAX_STEM_CHARS`).
    """

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def assign(self, key: str) -> str:
        stem = safe_member_stem(key)
        candidate, n = stem, 1
        while candidate in self._taken:
            n += 1
            suffix = f"-{n}"
            candidate = stem[: MAX_STEM_CHARS - len(suffix)] + suffix
        self._taken.add(candidate)
        return candidate
