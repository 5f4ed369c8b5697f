"""SDEdit (Meng et al.) as a control: `edit.control: sdedit`.

Denoising starts from the inverted latent part-way (`edit.strength` of the steps are re-done), not
from the noisiest step. Its one setting is the edit's own `edit.strength`, so it has no section.
"""

from __future__ import annotations

from vidbatch.engine.control import Control

__all__ = ["SDEdit", "first_step"]


def first_step(steps: int, strength: float) -> int:
    """Index into the edit's `steps` timesteps where denoising starts: the last `strength` of them re-done."""
    return min(steps - int(round(steps * strength)), steps - 1)


class SDEdit(Control):
    name = "sdedit"
