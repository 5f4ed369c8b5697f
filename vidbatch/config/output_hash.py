"""The hash of the config that shapes a run's output, recorded in every done marker.

A rerun into the same output must not mix shards edited with different settings: it compares this
hash with the done markers' and refuses when they differ. Keys that only say where or how fast the
work runs are left out, so a rerun on other hardware, another backend or with another cache folder
still resumes: the whole `runtime` section and the inversion cache's on/off switch, folder and size.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# section -> keys of it that do not shape the output (None: the whole section).
NOT_OUTPUT_SHAPING: dict[str, tuple[str, ...] | None] = {
    "runtime": None,
    "inversion": ("cache", "cache_dir", "cache_max_gb"),
}


def output_shaping(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The resolved config (`Config.to_dict()`) without the keys in NOT_OUTPUT_SHAPING.

    `runtime.samples_per_task` is kept when set: it decides which samples an output shard of a given name
    holds, so a rerun with another value must not resume over the old work items. Left out when null, so
    the hash of a config without it is what it always was (outputs made before it still resume).
    """
    kept = {}
    for section, value in config_dict.items():
        if section in NOT_OUTPUT_SHAPING:
            dropped = NOT_OUTPUT_SHAPING[section]
            if dropped is None:
                continue
            value = {k: v for k, v in value.items() if k not in dropped}
        kept[section] = value
    per_task = (config_dict.get("runtime") or {}).get("samples_per_task")
    if per_task is not None:
        kept["work_items"] = {"samples_per_task": per_task}
    return kept


def output_config_hash(config: Any) -> str:
    """A short hash of the output-shaping part of `config` (any object with `to_dict()`)."""
    text = json.dumps(output_shaping(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
