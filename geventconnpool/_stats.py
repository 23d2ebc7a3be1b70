"""The snapshot that :meth:`ConnectionPool.stats` returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's gauges and counters, returned by :meth:`ConnectionPool.stats`.

    While the pool is open, ``idle + in_use + connecting`` is between ``min_size`` and ``size`` (both
    ``size`` unless the pool is elastic; up to ``size + max(1, size // 4)`` while
    :meth:`ConnectionPool.drain` opens replacements); ``retiring`` counts apart.
    """

    __module__ = "geventconnpool"

    size: int
    """How many connections the pool keeps: the most it opens, if it is elastic."""
    idle: int
    """Open connections ready to be lent."""
    in_use: int
    """Connections held by callers, or by a keepalive or ``check_after`` check."""
    connecting: int
    """Connections being opened, or waiting to retry after a failed attempt; during a
    :meth:`ConnectionPool.drain`, its replacements being opened too."""
    waiting: int
    """Callers blocked in :meth:`ConnectionPool.get`."""
    checkouts: int
    """Connections lent since the pool was made."""
    opened: int
    """Connections opened since the pool was made."""
    failed_connects: int
    """Failed calls of ``_new_connection`` (errors, ``None``, ``connect_timeout``)."""
    discarded: int
    """Connections closed because they broke: in a caller's block, in a check, or by data nobody asked for
    arriving while idle."""
    recycled: int
    """Connections closed because they reached ``max_lifetime``; with ``address``, also those moved to
    another address, and those closed because their address left the resolution."""
    keepalive_failures: int
    """Checks (``keepalive`` or ``check_after``) that found a connection broken; each is also discarded."""
    timeouts: int
    """:class:`~geventconnpool.PoolTimeout` errors raised by :meth:`ConnectionPool.get` at the end of a wait
    (a :class:`~geventconnpool.PoolOverloaded` is counted in ``overloaded`` instead)."""

    # Fields added after 1.0 come last, with a default, so that code that
    # builds a PoolStats by position (tests comparing with one) keeps working.
    closed_while_idle: int = 0
    """Idle connections that ``watch_idle`` found closed by the remote end (the end of the stream, a reset
    or an error), and replaced.

    .. versionadded:: 1.1
    """
    overloaded: int = 0
    """Calls of :meth:`ConnectionPool.get` refused at once with :class:`~geventconnpool.PoolOverloaded`,
    because ``max_waiting`` callers already waited.

    .. versionadded:: 1.1
    """
    retiring: int = 0
    """Connections the pool closes for good when they come back, or as they open, after
    :meth:`ConnectionPool.resize` made it smaller or :meth:`ConnectionPool.drain` replaced them; they are
    not part of ``size``.

    .. versionadded:: 1.1
    """
    retired: int = 0
    """Connections closed for good, without a replacement: :meth:`ConnectionPool.resize` made the pool
    smaller, :meth:`ConnectionPool.drain` had already replaced them, or an elastic pool closed them
    after ``max_idle`` unused.

    .. versionadded:: 1.1
    """
    min_size: Optional[int] = None
    """How many connections the pool keeps open at least: ``size`` unless the pool is elastic.  Always
    an int in a snapshot from :meth:`ConnectionPool.stats`; one built by hand without it takes ``size``.

    .. versionadded:: 1.1
    """

    def __post_init__(self) -> None:
        if self.min_size is None:
            object.__setattr__(self, "min_size", self.size)
