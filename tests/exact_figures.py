"""The summary's figures computed the plain way, from every value sorted: what the mergeable
aggregates (`vidbatch.core.aggregates.Dist`) must give while they still hold their values exactly."""

from __future__ import annotations

from collections.abc import Sequence


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The `q` quantile of the values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    """Mean, median, p90 and maximum; None when empty (the summary's time and memory figures)."""
    if not values:
        return None
    return {"mean": sum(sorted(values)) / len(values), "p50": nearest_rank(values, 0.5),
            "p90": nearest_rank(values, 0.9), "max": max(values)}


def distribution(values: Sequence[float]) -> dict[str, float] | None:
    """Count, mean, min, p10, p50, p90 and max; None when empty (the summary's metric statistics)."""
    if not values:
        return None
    return {"n": len(values), "mean": sum(sorted(values)) / len(values), "min": min(values),
            "p10": nearest_rank(values, 0.1), "p50": nearest_rank(values, 0.5), "p90": nearest_rank(values, 0.9),
            "max": max(values)}
