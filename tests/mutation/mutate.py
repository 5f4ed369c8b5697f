"""`make mutate`: mutation testing of the engine's core with mutmut, one module at a time.

Usage: python tests/mutation/mutate.py [--report FILE] [--children N] MODULE [MODULE ...]

Each module of ``[tool.vidbatch.mutate]`` in pyproject.toml gets a mutmut project of its own in
``build/mutate/MODULE`` (links to the package, the tests and the configs, and a pyproject.toml holding
the shared ``[tool.mutmut]`` settings plus the module's files and tests), so every module has its own
test selection, its own stats run and its own results, kept between runs. The module's mutants are
tested at nice 10, each child process with one torch thread, by ``--children`` processes at once
(default 1: the machine is shared; give it the number of idle cores otherwise). Then the report
(FILE, default mutation-report.txt) is rewritten with the score of every module tested so far and the
diff of every mutant that was not killed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "build" / "mutate"
MUTMUT = Path(sys.executable).with_name("mutmut")
# Statuses mutmut reports; a mutant counts as killed when a test failed or it ran out of time.
KILLED = ("killed", "timeout")


def settings() -> tuple[dict, dict[str, dict]]:
    """The shared ``[tool.mutmut]`` table and the modules of ``[tool.vidbatch.mutate]``."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]
    return tool["mutmut"], tool["vidbatch"]["mutate"]


def toml_value(value) -> str:
    """A TOML literal for the value types the mutmut table holds (strings, numbers, booleans, lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def prepare(module: str, shared: dict, own: dict) -> Path:
    """``build/mutate/MODULE``: links to the package, tests and configs, and the module's mutmut table."""
    missing = [t for t in own["tests"] if not t.startswith("-") and "::" not in t and not (REPO / t).is_file()]
    if missing:
        raise SystemExit(f"mutate: module {module!r} lists test files that do not exist: {', '.join(missing)}")
    folder = WORK / module
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vidbatch", "tests", "configs"):
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(REPO / name, folder))
    table = {**shared, "only_mutate": own["only_mutate"], "pytest_add_cli_args_test_selection": own["tests"]}
    text = "[tool.mutmut]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in table.items())
    if not (folder / "pyproject.toml").is_file() or (folder / "pyproject.toml").read_text() != text:
        (folder / "pyproject.toml").write_text(text)
    return folder


def mutmut(folder: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": ""}
    return subprocess.run([str(MUTMUT), *args], cwd=folder, env=env, **kwargs)


def run(module: str, folder: Path, children: int) -> float:
    """Tests the module's mutants; returns the wall time in seconds.

    mutmut tests the mutants it has no result for (all of them the first time, new or changed ones
    later). On a later run the mutants not killed before are tested again too: tests may have been
    added since (a killed mutant stays killed: its code and the tests that failed on it are unchanged,
    or mutmut would have reset it)."""
    start = time.monotonic()
    again = [name for name, status in results(folder).items() if status not in (*KILLED, "not checked")] if (folder / "last-run.json").is_file() else []
    for names in ([], again) if again else ([],):
        done = mutmut(folder, "run", "--max-children", str(children), *names, preexec_fn=lambda: os.nice(10))
        if done.returncode != 0:
            raise SystemExit(f"mutate: mutmut failed on module {module!r} (exit {done.returncode}); see its output above")
    seconds = time.monotonic() - start
    (folder / "last-run.json").write_text(json.dumps({"seconds": round(seconds), "finished": time.strftime("%FT%TZ", time.gmtime())}))
    return seconds


def results(folder: Path) -> dict[str, str]:
    """mutant name -> status, for every mutant of the module."""
    out = mutmut(folder, "results", "--all", "true", capture_output=True, text=True, check=True).stdout
    statuses = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep:
            statuses[name] = status
    return statuses


def report(path: Path, modules: dict[str, dict]) -> str:
    """Rewrites the report from every module tested so far; returns its summary lines."""
    summary, details = [], []
    for module in modules:
        folder = WORK / module
        if not (folder / "last-run.json").is_file():
            continue
        last = json.loads((folder / "last-run.json").read_text())
        statuses = results(folder)
        counts = Counter(statuses.values())
        killed = sum(counts[s] for s in KILLED)
        others = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if s not in KILLED)
        score = 100 * killed / max(len(statuses), 1)
        summary.append(f"{module:10} {len(statuses):5} mutants, {killed} killed ({score:.1f}%); {others or 'none left'}"
                       f"  [last run {last['seconds']} s, {last['finished']}]")
        for name, status in sorted(statuses.items()):
            if status not in KILLED:
                diff = mutmut(folder, "show", name, capture_output=True, text=True).stdout
                details.append(f"== {module}: {name} ({status})\n{diff.strip()}\n")
    head = ["mutmut per module (make mutate); killed = a test failed or the mutant timed out", ""]
    path.write_text("\n".join(head + summary + ["", "Mutants not killed:", ""] + details) + "\n")
    return "\n".join(summary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+", metavar="MODULE")
    parser.add_argument("--report", type=Path, default=REPO / "mutation-report.txt")
    parser.add_argument("--children", type=int, default=1, help="mutants tested at once (default 1)")
    args = parser.parse_args(argv)
    shared, modules = settings()
    unknown = [m for m in args.modules if m not in modules]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; the modules are: {' '.join(modules)}")
    for module in args.modules:
        seconds = run(module, prepare(module, shared, modules[module]), args.children)
        print(f"mutate: {module} took {seconds / 60:.1f} min", flush=True)
    print(report(args.report, modules))
    print(f"(mutants not killed, with their diffs: {args.report})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
