"""Exceptions a user can cause. Each message names the cause and, where there is one, the fix."""


class VidbatchError(Exception):
    """Base class of the errors vidbatch reports to users."""


class ConfigError(VidbatchError):
    """A config key or value is invalid (exit code 2)."""


class ModelLoadError(VidbatchError):
    """The model, a LoRA or a ControlNet could not be loaded (exit code 2)."""


class SampleError(VidbatchError):
    """One input sample cannot be processed; recorded as a `failed` row, the shard goes on."""


class VideoDecodeError(SampleError):
    """A video could not be decoded (corrupt, truncated, empty, unsupported, too small or too large)."""


class OutputConfigChangedError(ConfigError):
    """A rerun's output-shaping config differs from the one the output's done shards were made with (exit 2)."""


class OutputBusyError(VidbatchError):
    """Another live run is writing the same output folder (exit 2)."""
