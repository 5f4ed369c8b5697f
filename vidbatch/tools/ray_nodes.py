"""Waits until every expected node has joined a Ray cluster, or names the ones missing.

Used by `slurm/vidbatch-ray.sbatch` after it starts one Ray node per SLURM node, so a run never starts
on part of its allocation without saying so:

    python -m vidbatch.tools.ray_nodes --address HEAD:PORT --timeout 300 node01 node02 node03

A node counts as joined when a live Ray node reports that name as its node name (`ray start
--node-name`, which the SLURM script sets to the SLURM node name), its host name (short or full) or its
address. Each live Ray node stands for one expected name only, so a name given twice (two Ray nodes on
one host, as `slurmd -N` or a test runs them) needs two live nodes. Exit 0 when all have joined, 1 with
the missing nodes named otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Iterable, Sequence


def _names(node: dict) -> set[str]:
    """What a Ray node answers to: its node name, host name and address, each also cut at the first dot."""
    names: set[str] = set()
    for key in ("NodeName", "NodeManagerHostname", "NodeManagerAddress"):
        value = str(node.get(key) or "")
        if value:
            names.update({value, value.split(".")[0]})
    return names


def joined(expected: Sequence[str], nodes: Iterable[dict]) -> tuple[list[str], list[str]]:
    """(joined, missing) among `expected` names (node names, host names or addresses), given Ray's
    `ray.nodes()` entries; every live node is matched to at most one expected entry (a bipartite matching,
    so a node that answers to two expected names never hides a missing one)."""
    live = [_names(node) for node in nodes if node.get("Alive")]
    owner: dict[int, int] = {}   # live node index -> expected index it stands for

    def fits(name: str, names: set[str]) -> bool:
        return name in names or name.split(".")[0] in names

    def place(i: int, tried: set[int]) -> bool:
        """Finds a live node for expected entry `i`, moving earlier entries to other nodes if need be."""
        for n, names in enumerate(live):
            if n in tried or not fits(expected[i], names):
                continue
            tried.add(n)
            if n not in owner or place(owner[n], tried):
                owner[n] = i
                return True
        return False

    placed = {i for i in range(len(expected)) if place(i, set())}
    return ([name for i, name in enumerate(expected) if i in placed],
            [name for i, name in enumerate(expected) if i not in placed])


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
