"""The typed run configuration: schema, presets, loading and validation.

`schema` holds the sections and `load_config` / `save_config`; `fields` the parsing and validation
of values against dataclass fields. The common names are re-exported here.
"""

from vidbatch.config.schema import (
    EDIT_NAME_PATTERN,
    Config,
    EditSpec,
    config_class,
    load_config,
    parse_override,
    resolve_control,
    resolve_control_name,
    save_config,
)

__all__ = ["EDIT_NAME_PATTERN", "Config", "EditSpec", "config_class", "load_config", "parse_override",
           "resolve_control", "resolve_control_name", "save_config"]
