"""The one timing helper the bench scripts share."""

from __future__ import annotations

import time
from typing import Callable


def best_of(repeats: int, fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    """Fewest seconds `fn` took over `repeats` calls; `sync` (e.g. torch.cuda.synchronize) fences each timing."""
    times = []
    for _ in range(repeats):
        sync()
        began = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - began)
    return min(times)
