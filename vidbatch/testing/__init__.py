"""Fixtures for tests, the demo and the benchmarks: synthetic clips, exported checkpoints, LoRA files.

The library (core, io, models, engine, metrics, config, batch) never imports this package.
"""
