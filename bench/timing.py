"""Timing shared by the benchmarks: medians of wall-clock times after a warm-up."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 3, per: int = 1) -> float:
    """Median milliseconds of `fn()` over `runs` calls after `warmup` calls, divided by `per`
    (the number of steps one call makes)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3 / per)
    return statistics.median(times)


def write_json(path: str, results) -> None:
    """`results` as JSON at `path`, written whole or not at all (a temporary file, renamed)."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(partial, path)
