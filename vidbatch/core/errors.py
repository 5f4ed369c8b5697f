"""Exceptions a user can cause. Each message names the cause and, where there is one, the fix."""


class VidbatchError(Exception):
    """Base class of the errors vidbatch reports to users."""


class ConfigError(VidbatchError):
    """A config key or value is invalid (exit code 2)."""


class UsageError(VidbatchError):
    """A command-line argument, input or output path that cannot work (exit code 2), found before any
    model loads."""


class ModelLoadError(VidbatchError):
    """The model, a LoRA or a ControlNet could not be loaded (exit code 2)."""


class SampleError(VidbatchError):
    """One input sample cannot be processed; recorded as a `failed` row, the shard goes on."""


class VideoDecodeError(SampleError):
    """A video could not be decoded (corrupt, truncated, empty, unsupported, too small or too large)."""


class OutputConfigChangedError(ConfigError):
    """A rerun's output-shaping config differs from the one the output's done shards were made with (exit 2)."""


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT (Ctrl-C) or SIGTERM; what was done is kept and a rerun resumes.

    A `KeyboardInterrupt`, so code that handles Ctrl-C handles it too. `exit_code` is the shell's
    convention for the signal: 130 for SIGINT, 143 for SIGTERM. The message is one line saying how
    many shards are done and how to resume.
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


def error_line(exc: VidbatchError) -> str:
    """The one line the CLI prints and OUT/run.log records for a user's mistake: its kind, then its message
    with any line breaks joined ("config error: unknown config key 'edit.stepz' ...")."""
    label = "error"
    for kind, name in ((ConfigError, "config error"), (ModelLoadError, "model error"), (UsageError, "usage error")):
        if isinstance(exc, kind):
            label = name
            break
    return f"{label}: {' '.join(str(exc).split())}"
