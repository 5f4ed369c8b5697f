"""The typed run configuration: schema, presets, loading and validation."""
