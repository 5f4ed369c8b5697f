"""`vidbatch demo`: generated clips -> two input shards -> the whole pipeline on the tiny model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from rich.console import Console

from vidbatch.config.schema import load_config
from vidbatch.core.errors import ConfigError
from vidbatch.api import run
from vidbatch.io.packing import pack_shards
from vidbatch.testing.clips import make_test_video

# Moving, textured content from ffmpeg's generators, with a description each.
DEMO_CLIPS = [
    ("testsrc2", "a colourful test pattern with a moving box", False),
    ("mandelbrot", "a zoom into the mandelbrot fractal", False),
    ("life", "cells of the game of life evolving", True),
    ("cellauto", "a cellular automaton scrolling down", False),
]
# `vidbatch demo --compare` without methods: the default method, the long-clip one and the baseline.
DEMO_COMPARE = ["vidtome", "tokenflow", "per-frame"]
DEMO_EDITS = [
    {"name": "watercolor", "prompt": "{prompt}, watercolor painting"},
    {"name": "neon", "prompt": "{prompt}, neon cyberpunk style"},
]


def preset_path(name: str) -> Path:
    """A preset from the repository's configs/ folder."""
    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset '{path}' not found; run the demo from a checkout of the vidbatch repository")
    return path


def make_demo_inputs(folder: Path, *, seconds: float = 2.0, fps: float = 8) -> list[Path]:
    """Writes the demo clips and their prompts, packs them into two shards; returns the shard paths."""
    clips = folder / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    rows = []
    for source, prompt, audio in DEMO_CLIPS:
        name = f"{source}.mp4"
        make_test_video(clips / name, seconds=seconds, fps=fps, size=(160, 96), source=source, audio=audio)
        rows.append({"file": name, "prompt": prompt})
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pack_shards(clips, folder / "shards", prompts_file=prompts, samples_per_shard=2, prefix="demo")


def run_demo(output: Path, overrides: list[str], console: Console) -> int:
    config = load_config(preset_path("tiny"), [f"edits={json.dumps(DEMO_EDITS)}", *overrides])
    with tempfile.TemporaryDirectory(prefix="vidbatch-demo-") as tmp:
        console.print("making demo clips and packing them into two shards ...")
        shards = make_demo_inputs(Path(tmp))
        code = run(config, [str(s) for s in shards], output, overwrite=True, console=console)
    console.print(f"\noutputs in [bold]{output}[/bold]: shards/ (edited videos), stats/ (per-sample rows), "
                  "summary.json, report.html (open it in a browser), config.yaml, run.log")
    return code
