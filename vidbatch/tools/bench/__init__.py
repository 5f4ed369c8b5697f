"""`vidbatch bench`: time, memory and FLOPs of each editing method on a generated clip."""

from vidbatch.tools.bench.main import bench_main, run_bench

__all__ = ["bench_main", "run_bench"]
