"""Waits until every expected node has joined a Ray cluster, or names the ones missing.

Used by `slurm/vidbatch-ray.sbatch` after it starts one Ray node per SLURM node, so a run never starts
on part of its allocation without saying so:

    python -m vidbatch.tools.ray_nodes --address HEAD:PORT --timeout 300 node01 node02 node03

A node counts as joined when a live Ray node reports that host name (short or full) or address.
Exit 0 when all have joined (it prints one line per node), 1 with the missing nodes named otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Iterable, Sequence


def joined(expected: Sequence[str], nodes: Iterable[dict]) -> tuple[list[str], list[str]]:
    """(joined, missing) among `expected` host names or addresses, given Ray's `ray.nodes()` entries."""
    seen: set[str] = set()
    for node in nodes:
        if not node.get("Alive"):
            continue
        for key in ("NodeManagerHostname", "NodeManagerAddress", "NodeName"):
            value = str(node.get(key) or "")
            if value:
                seen.update({value, value.split(".")[0]})
    present = [name for name in expected if name in seen or name.split(".")[0] in seen]
    return present, [name for name in expected if name not in present]


def wait_for_nodes(address: str, expected: Sequence[str], timeout_s: float, poll_s: float = 2.0) -> list[str]:
    """Polls the cluster at `address` until every expected node is alive in it; returns the missing ones
    (empty when all joined within `timeout_s`)."""
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            _, missing = joined(expected, ray.nodes())
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(poll_s)
    finally:
        ray.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidbatch.tools.ray_nodes", description=__doc__.split("\n")[0])
    parser.add_argument("--address", required=True, help="the Ray head, HOST:PORT")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
    parser.add_argument("nodes", nargs="+", help="host names (or addresses) that must join")
    args = parser.parse_args(argv)
    missing = wait_for_nodes(args.address, args.nodes, args.timeout)
    if missing:
        print(f"Ray nodes missing after {args.timeout:g}s: {', '.join(missing)} (of {len(args.nodes)}); see their "
              "'ray start' output in the job log", file=sys.stderr)
        return 1
    print(f"all {len(args.nodes)} Ray node(s) joined: {', '.join(args.nodes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
