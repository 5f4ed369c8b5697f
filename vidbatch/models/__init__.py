"""Loading pipelines (hub id, folder, single file, LoRA), fingerprints, built-in random models."""
