"""Timing shared by the in-process benchmarks (``serving_breakdown.py``, ``ranker_arch.py``)."""
from __future__ import annotations

import time
from typing import Callable


def median_ms(fn: Callable[[], object], rounds: int, *, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in ms over ``rounds`` calls, after ``warmup`` untimed calls
    (first-call costs: kernel selection, caches)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return samples[len(samples) // 2]
