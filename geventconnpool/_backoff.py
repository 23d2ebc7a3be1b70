"""The wait before the next attempt, shared by the pool's reconnects and :func:`retry`."""

from __future__ import annotations

import math
import random
from typing import Callable, Optional


def backoff_delay(
    attempt: int,
    *,
    initial: float,
    factor: float,
    cap: Optional[float] = None,
    jitter: float = 0.0,
    uniform: Callable[[], float] = random.random,
) -> float:
    """Return the seconds to wait after the ``attempt``-th failure (1-based).

    The wait is ``initial * factor ** (attempt - 1)``, limited to ``cap``, then
    multiplied by ``1 - jitter * U`` where ``U`` is drawn by ``uniform`` from
    ``[0, 1)``.  A growth too large for a float becomes infinity rather than
    raising :exc:`OverflowError`, so any attempt number is safe.
    """
    if initial == 0:
        return 0.0
    try:
        wait = initial * float(factor) ** (attempt - 1)
    except OverflowError:
        wait = math.inf
    if cap is not None:
        wait = min(wait, cap)
    if jitter:
        wait *= 1.0 - jitter * uniform()
    return wait
