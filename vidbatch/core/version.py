"""The package version (kept equal to pyproject.toml's); here so any layer can name it without importing
the top-level package, whose `run`/`load_config` belong to the API layer."""

__version__ = "0.1.0"
