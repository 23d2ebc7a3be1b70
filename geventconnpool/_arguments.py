"""The checks of what users pass: each raises at once, with a message that names the argument.

Shared by the pool, :func:`~geventconnpool.retry` and
:func:`~geventconnpool.enable_tcp_keepalive`, so that the same mistake reads
the same everywhere.  Booleans are not numbers here, and NaN is no number.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Type, Union

ExcClasses = Union[Type[BaseException], Tuple[Type[BaseException], ...]]


def seconds(value: object, argument: str, *, optional: bool = True, zero: bool = False) -> Optional[float]:
    """Return a duration as a float: a number > 0 (>= 0 with ``zero``), or None when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        nothing = " or None" if optional else ""
        raise TypeError(f"{argument} must be a number of seconds{nothing}, not {value!r}")
    if value < 0 or (value == 0 and not zero):
        raise ValueError(f"{argument} must be {'>= 0' if zero else '> 0'} seconds, not {value!r}")
    return float(value)


def required_seconds(value: object, argument: str) -> float:
    """Return a duration that may not be None: a number > 0, as a float."""
    duration = seconds(value, argument, optional=False)
    assert duration is not None
    return duration


def number(value: object, argument: str, *, minimum: float, maximum: float = math.inf) -> float:
    """Return a real number between ``minimum`` and ``maximum``, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"{argument} must be a number, not {value!r}")
    if not minimum <= value <= maximum:
        bound = f">= {minimum:g}" if maximum == math.inf else f"between {minimum:g} and {maximum:g}"
        raise ValueError(f"{argument} must be {bound}, not {value!r}")
    return float(value)


def whole_number(
    value: object, argument: str, *, minimum: int, maximum: Optional[int] = None, unit: str = ""
) -> int:
    """Return an int (never a bool) between ``minimum`` and ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int{' number of ' + unit if unit else ''}, not {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum} {unit}".rstrip()
        raise ValueError(f"{argument} must be {bound}, not {value!r}")
    return value


def count(value: object, argument: str) -> Optional[int]:
    """Return an int >= 1, or None (no limit)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int or None, not {value!r}")
    return whole_number(value, argument, minimum=1)


def flag(value: object, argument: str) -> bool:
    """Return a bool; anything else (1, "yes") is a mistake."""
    if not isinstance(value, bool):
        raise TypeError(f"{argument} must be a bool, not {value!r}")
    return value


def exception_classes(value: object, argument: str) -> Tuple[Type[BaseException], ...]:
    """Return ``value`` as a tuple of exception classes.

    ``value`` is one exception class, or a tuple, list or set of them.
    """
    items = tuple(value) if isinstance(value, (tuple, list, set, frozenset)) else (value,)
    classes = []
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise TypeError(f"{argument} must be an exception class or a tuple of them, not {value!r}")
        classes.append(item)
    return tuple(classes)
