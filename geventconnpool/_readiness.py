"""Readiness: the callers of :meth:`ConnectionPool.wait`, each woken by the connection that makes it ready.

Private.  A caller that needs more open connections than the pool has puts a
:class:`ReadyWaiter` in the pool's ``_ready_waiters`` and blocks on its
event.  The pool's ``_add`` calls :func:`opened` when a connection opens
while that list is not empty (with nobody waiting, a connect pays one test of
an empty list, and a checkout nothing), and ``close()`` calls
:func:`wake_all`.  No polling: the hub wakes a caller at its next turn after
the connect that completes it.  What this module uses of its pool is
:class:`ReadinessPool`.
"""

from __future__ import annotations

from typing import Any, List, Optional, Protocol, Set, TypeVar

from gevent.event import Event

from geventconnpool import _arguments
from geventconnpool._lease import Entry
from geventconnpool.errors import PoolClosed, PoolTimeout

C = TypeVar("C")


class ReadyWaiter:
    """A caller blocked in :meth:`ConnectionPool.wait` until ``min_open`` connections are open."""

    __slots__ = ("event", "min_open")

    def __init__(self, min_open: int) -> None:
        self.min_open = min_open
        self.event = Event()


class ReadinessPool(Protocol[C]):
    """What readiness uses of the pool: the private contract of this module."""

    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def min_size(self) -> int: ...

    _closed: bool
    _entries: Set[Entry[C]]  # the open connections, idle or in use
    _ready_waiters: List[ReadyWaiter]

    def _check_thread_and_fork(self) -> None: ...
    def _timeout_error(self, what: str) -> PoolTimeout: ...


def wait_open(pool: ReadinessPool[Any], timeout: Optional[float], min_open: Optional[int]) -> None:
    """Block until at least ``min_open`` (default: ``min_size``, all of a fixed pool's) connections are open.

    :raises PoolTimeout: not enough opened within ``timeout`` seconds; it names the last connect error.
    :raises PoolClosed: the pool is closed, or closes meanwhile.
    """
    limit = _arguments.seconds(timeout, "timeout", zero=True)
    size = pool.size
    wanted = pool.min_size
    if min_open is not None:
        wanted = _arguments.whole_number(min_open, "min_open", minimum=1, maximum=size)
    pool._check_thread_and_fork()
    if not pool._closed and len(pool._entries) < wanted:
        waiter = ReadyWaiter(wanted)
        pool._ready_waiters.append(waiter)
        try:
            waiter.event.wait(limit)  # switches
        finally:
            if waiter in pool._ready_waiters:
                pool._ready_waiters.remove(waiter)
        if not pool._closed and not waiter.event.is_set():
            many = f"all {size}" if wanted == size else f"{wanted} of its {size}"
            raise pool._timeout_error(f"did not open {many} connections within {limit} s")
    if pool._closed:
        raise PoolClosed(f"pool {pool.name!r} is closed")


def opened(waiters: List[ReadyWaiter], open_now: int) -> None:
    """A connection opened, and ``open_now`` are: wake the waiters for whom that is enough."""
    for waiter in [waiter for waiter in waiters if waiter.min_open <= open_now]:
        waiters.remove(waiter)
        waiter.event.set()


def wake_all(waiters: List[ReadyWaiter]) -> None:
    """The pool closed: wake every waiter (each then raises :class:`PoolClosed`)."""
    for waiter in waiters:
        waiter.event.set()
    waiters.clear()
