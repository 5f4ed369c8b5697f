"""`vidbatch compact OUT`: the done work items' output shards merged into fewer, larger ones.

Work items (`runtime.samples_per_task`) keep the unit of work small; their outputs are many small
shards. Compacting writes, beside them,

    OUT/compacted/part-000000.tar     stock WebDataset shards: the work items' samples, in plan order
    OUT/compacted/part-000000.jsonl   the stats rows of those samples, each with its `work_item`
    OUT/compacted/manifest.json       which work items each part holds, its samples and bytes

A part is whole work items, in plan order, closed once it holds `target_samples` samples or
`target_mb` MB (so it overshoots by at most one item): an item's rows and samples stay together, and a
part never splits what one commit wrote. Every member of a part is renamed `{work item}/{member}`, so the
WebDataset key of a sample is `{work item}/{name}`: unique in the part even where two input shards used
the same key (the sample's json keeps its original key).

The work items' own files are never touched (they stay the output's done work: a rerun of `vidbatch run`
resumes from them). The new folder is written whole under a temporary name and swapped in at the end
(`report.media.atomic_directory`): readers see the old `compacted/` or the new one, never half of one.
Rerunnable: each run rebuilds `compacted/` from the work items done now. An output with a work item in
progress (a live lease) is refused.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from vidbatch.core.errors import VidbatchError
from vidbatch.dispatch.leases import live_lease
from vidbatch.dispatch.plan import read_plan_file
from vidbatch.io.output_shards import rows_path, shard_path
from vidbatch.io.shard_check import intact_marker
from vidbatch.report.media import atomic_directory

COMPACTED_DIR = "compacted"
DEFAULT_TARGET_MB = 1000.0


class CompactError(VidbatchError):
    """The output cannot be compacted now (in progress, not a vidbatch output, a bad target)."""


@dataclass
class Part:
    """One compacted shard being filled."""

    name: str
    items: list[str] = field(default_factory=list)
    samples: int = 0
    bytes: int = 0


@dataclass
class CompactResult:
    """What `compact_output` wrote: the parts, and the work items of the plan it left out (not done)."""

    folder: Path
    parts: list[Part]
    left_out: list[str]


def compact_output(out_dir: Path, *, target_samples: int | None = None, target_mb: float | None = None
                   ) -> CompactResult:
    """Merges the done work items of `out_dir` into `OUT/compacted/` (see the module docstring).

    At most one target: parts close at `target_samples` samples or `target_mb` MB (default
    DEFAULT_TARGET_MB). Raises CompactError when a work item is in progress (a live lease), the folder
    has no `plan.json`, or a target is not positive.
    """
    out_dir = Path(out_dir)
    if target_samples is not None and target_mb is not None:
        raise CompactError("give --target-samples or --target-mb, not both")
    if target_samples is not None and target_samples < 1:
        raise CompactError(f"--target-samples must be at least 1, got {target_samples}")
    if target_mb is not None and not target_mb > 0:
        raise CompactError(f"--target-mb must be above 0, got {target_mb}")
    if target_samples is None and target_mb is None:
        target_mb = DEFAULT_TARGET_MB
    _, stems = read_plan_file(out_dir)
    busy = [(stem, lease) for stem in stems if (lease := live_lease(out_dir, stem)) is not None]
    if busy:
        stem, lease = busy[0]
        more = f" (and {len(busy) - 1} more)" if len(busy) > 1 else ""
        raise CompactError(f"{out_dir} is still being written: work item {stem}{more} is held by driver "
                           f"{lease.owner}; compact it once its run has ended")
    done = [stem for stem in stems if intact_marker(out_dir, stem) is not None]
    left_out = [stem for stem in stems if stem not in set(done)]
    final = out_dir / COMPACTED_DIR
    with atomic_directory(final) as tmp:
        parts = _write_parts(out_dir, done, tmp, target_samples, target_mb)
        manifest = {"parts": [{"name": p.name, "tar": f"{p.name}.tar", "stats": f"{p.name}.jsonl",
                               "work_items": p.items, "samples": p.samples, "bytes": p.bytes} for p in parts],
                    "left_out": left_out}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return CompactResult(folder=final, parts=parts, left_out=left_out)


def _write_parts(out_dir: Path, stems: list[str], folder: Path, target_samples: int | None,
                 target_mb: float | None) -> list[Part]:
    """Writes the parts into `folder`, work item after work item; returns them."""
    parts: list[Part] = []
    tar: tarfile.TarFile | None = None
    rows = None
    try:
        for stem in stems:
            part = parts[-1] if parts else None
            if part is None or _full(part, target_samples, target_mb):
                if tar is not None:
                    tar.close()
                    rows.close()
                part = Part(name=f"part-{len(parts):06d}")
                parts.append(part)
                tar = tarfile.open(folder / f"{part.name}.tar", "w", format=tarfile.PAX_FORMAT)
                rows = open(folder / f"{part.name}.jsonl", "w", encoding="utf-8")
            part.items.append(stem)
            part.samples += _copy_members(shard_path(out_dir, stem), stem, tar)
            _copy_rows(rows_path(out_dir, stem), stem, rows)
            part.bytes = tar.fileobj.tell()
    finally:
        if tar is not None:
            tar.close()
            rows.close()
    for part in parts:   # the closed files: with the tar's end-of-archive blocks
        part.bytes = (folder / f"{part.name}.tar").stat().st_size
    return parts


def _full(part: Part, target_samples: int | None, target_mb: float | None) -> bool:
    if target_samples is not None:
        return part.samples >= target_samples
    return part.bytes >= (target_mb or DEFAULT_TARGET_MB) * 2**20


def _copy_members(source: Path, stem: str, tar: tarfile.TarFile) -> int:
    """Appends the members of the work item's tar to `tar` as `{stem}/{name}`; returns its samples (keys)."""
    keys: set[str] = set()
    with tarfile.open(source, "r|") as src:   # streamed: one member in memory at a time
        for member in src:
            if not member.isfile():
                continue
            data = src.extractfile(member)
            info = tarfile.TarInfo(f"{stem}/{member.name}")
            info.size, info.mtime, info.mode = member.size, member.mtime, member.mode
            tar.addfile(info, data)
            keys.add(member.name.split(".", 1)[0])
    return len(keys)


def _copy_rows(source: Path, stem: str, out) -> None:
    """Appends the work item's stats rows, each with `work_item` set to its stem."""
    if not source.is_file():
        return
    with open(source, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.write(json.dumps({"work_item": stem, **json.loads(line)}) + "\n")
