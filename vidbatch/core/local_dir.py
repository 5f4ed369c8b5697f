"""Node-local scratch space (`runtime.local_dir`): where per-node caches live instead of the shared filesystem.

The inversion cache (`{local_dir}/vidbatch-inversions`) and staged model weights (`{local_dir}/vidbatch-models`)
go here. It is resolved on the process that uses it (each worker, on its own node), never on the driver, so
a value read from the environment means that node's local disk.

Order, first set wins:

1. `runtime.local_dir` in the config;
2. `$VIDBATCH_LOCAL_DIR` (the SLURM scripts export it: one setting for every node of a job);
3. `$SLURM_TMPDIR` (the job's local disk on clusters that set it);
4. `$TMPDIR` (SLURM's job_container/tmpfs and many batch systems point it at a per-job local folder);
5. the system temporary folder (`tempfile.gettempdir()`, usually /tmp).

An explicit setting wins over the environment because it is what the user wrote for this run; the
environment comes before the system default because batch systems set it per job.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from vidbatch.core.errors import ConfigError
from vidbatch.core.paths import is_url

__all__ = ["LOCAL_DIR_ENV", "local_dir"]

LOCAL_DIR_ENV = "VIDBATCH_LOCAL_DIR"
_ENV_ORDER = (LOCAL_DIR_ENV, "SLURM_TMPDIR", "TMPDIR")


def local_dir(configured: str | os.PathLike[str] | None = None) -> Path:
    """This node's scratch folder: `configured`, else the first of $VIDBATCH_LOCAL_DIR, $SLURM_TMPDIR,
    $TMPDIR that is set and non-empty, else the system temporary folder. `~` is expanded; the folder is
    not created here (its users create their own subfolders).

    Raises:
        ConfigError: `configured` is an object-store URL (scratch must be a local folder).
    """
    if configured is not None and str(configured).strip():
        text = str(configured)
        if is_url(text):
            raise ConfigError(f"config key 'runtime.local_dir' must be a local folder on each node, got '{text}'")
        return Path(text).expanduser()
    for name in _ENV_ORDER:
        value = os.environ.get(name, "").strip()
        if value:
            return Path(value).expanduser()
    return Path(tempfile.gettempdir())
