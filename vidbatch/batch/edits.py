"""Which settings each edit of a sample runs with, and the editor that runs them.

An edit may carry its own method, control and settings (`edits[i].method/control/set`, in the run
config or a sample's json) and `edit.compare` runs every edit once per method. Here each edit is
resolved to its own config (:func:`plan_edits`), and edits are handed to one
:class:`vidbatch.engine.editor.VideoEditor` per distinct engine settings (:class:`EditorPool`), all
sharing one loaded pipeline: switching methods costs nothing but the attention processors.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Sequence

from vidbatch.config.schema import Config, EditSpec, edit_config, expand_compare, resolve_control, resolve_control_name
from vidbatch.core.errors import ConfigError
from vidbatch.engine.editor import EditorSettings, VideoEditor
from vidbatch.engine.plugins import get_control, get_method

__all__ = ["EditorPool", "PlannedEdit", "editor_settings", "plan_edits", "row_settings"]


@dataclass
class PlannedEdit:
    """One edit of a sample with the config it runs under, or why it cannot run."""

    spec: EditSpec
    config: Config | None = None
    error: str | None = None

    @property
    def method(self) -> str | None:
        return None if self.config is None else self.config.edit.method


def plan_edits(config: Config, edits: Sequence[EditSpec]) -> list[PlannedEdit]:
    """`edits` (the sample's own or the run's) expanded by `edit.compare` and resolved one by one; an
    edit whose settings are invalid gets its error (naming the edit and the key) instead of a config."""
    planned = []
    for spec in expand_compare(edits, config.edit.compare):
        try:
            planned.append(PlannedEdit(spec, edit_config(config, spec)))
        except ConfigError as exc:
            planned.append(PlannedEdit(spec, error=str(exc)))
    return planned


def editor_settings(config: Config) -> EditorSettings:
    """The engine's settings from a (run or edit) config; the method gets its own section (`Method.section`)."""
    m = config.merge
    section = get_method(config.edit.method).section
    budget = config.runtime.max_memory_gb
    return EditorSettings(
        method=config.edit.method, control=resolve_control_name(config.edit.method, config.edit.control),
        steps=config.edit.steps,
        inversion_steps=config.inversion.steps, guidance=config.edit.guidance,
        negative_prompt=config.edit.negative_prompt, eta=config.edit.eta, strength=config.edit.strength,
        chunk_size=m.chunk_size, chunk_order=m.chunk_order,
        memory_budget_bytes=None if budget is None else int(budget * 2**30),
        inversion_batch=config.inversion.batch_size,
        method_settings=getattr(config, section) if section else None,
        pnp_f_t=config.pnp.f_t, pnp_attn_t=config.pnp.attn_t, controlnet_scale=config.controlnet.scale)


def row_settings(config: Config) -> dict[str, Any]:
    """What an edit ran with, as recorded in its row: `edit.*` (but `compare`), `inversion.steps` and
    `prompt`, the method's section and each active control's."""
    edit = {k: v for k, v in dataclasses.asdict(config.edit).items() if k != "compare"}
    edit["control"] = resolve_control_name(config.edit.method, config.edit.control)
    recorded: dict[str, Any] = {"edit": edit, "inversion": {"steps": config.inversion.steps,
                                                            "prompt": config.inversion.prompt}}
    sections = [get_method(config.edit.method).section]
    sections += [get_control(name).section for name in sorted(resolve_control(config.edit.method, config.edit.control))]
    for section in sections:
        if section:
            recorded[section] = dataclasses.asdict(getattr(config, section))
    return recorded


class EditorPool:
    """One VideoEditor per distinct engine settings, built on first use, all on one pipeline.

    `controlnet` is the run's ControlNet (None: no edit of the run may use the `controlnet` control).
    """

    def __init__(self, pipe, cache, model_identity: str | None, controlnet=None) -> None:
        self.pipe, self.cache, self.model_identity, self.controlnet = pipe, cache, model_identity, controlnet
        self._editors: dict[str, VideoEditor] = {}

    @staticmethod
    def key(config: Config) -> str:
        """Which editor a config's edits run on: its engine settings (edits with equal keys share one)."""
        return json.dumps(dataclasses.asdict(editor_settings(config)), sort_keys=True, default=str)

    def get(self, config: Config) -> VideoEditor:
        key = self.key(config)
        if key not in self._editors:
            settings = editor_settings(config)
            uses_controlnet = "controlnet" in resolve_control(settings.method, settings.control)
            if uses_controlnet and self.controlnet is None:
                raise ConfigError("this edit uses the controlnet control, but the run loaded no ControlNet (give "
                                  "edit.control with controlnet in the run config, or an edit of it)")
            self._editors[key] = VideoEditor(self.pipe, settings, self.cache, self.model_identity,
                                             self.controlnet if uses_controlnet else None)
        return self._editors[key]

    def any(self) -> VideoEditor | None:
        """An editor already built (for what all of them share: the model's identity, its size multiple)."""
        return next(iter(self._editors.values()), None)
