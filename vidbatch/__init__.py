"""vidbatch: batch editing and stylisation of video datasets with pretrained text-to-image diffusion models.

The Python API (see `vidbatch.api`)::

    from vidbatch import load_config, run

    exit_code = run(load_config("configs/tiny.yaml", ["edit.steps=20"]), ["data/part-{000000..000003}.tar"], "out")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vidbatch.core.version import __version__
__all__ = ["__version__", "load_config", "plan", "run"]

if TYPE_CHECKING:
    from vidbatch.api import load_config, plan, run


def __getattr__(name: str) -> Any:
    # `run`, `plan` and `load_config` load torch, diffusers and Lightning: resolved on first use, so that
    # importing a light module (`vidbatch.core.errors`, `vidbatch --version`) stays light.
    if name in ("load_config", "plan", "run"):
        import vidbatch.api

        return getattr(vidbatch.api, name)
    raise AttributeError(f"module 'vidbatch' has no attribute {name!r}")
