"""Connecting: a greenlet per connection being opened, which tries until it has one.

Each such greenlet is a *slot*.  An attempt calls ``_new_connection`` under
``connect_timeout``; whatever does not return a connection is a failed
attempt: counted, logged through the pool's :class:`~geventconnpool._outage.OutageLog`,
and followed by a wait that grows by ``RECONNECT_FACTOR`` up to
``RECONNECT_MAX_DELAY``, with jitter, and that ends early when another slot
connects again (the remote end is back: no need to wait out the backoff).
Only the pool's own stop ends a slot sooner: :meth:`close`, a fork, or the
pool being garbage collected, which is why the loop holds the pool by weak
reference and drops it before each wait.

In a pool made with ``address=`` an attempt resolves the name when the last
answer is too old, picks an address (see ``_addresses.py``) and calls
``_connect(address)``.  A failure backs off that address only, and the slot
tries another address at once; only when every address is backing off is it
a failed attempt of the pool, as above.

Each slot's :class:`Slot` says when it tries next; :func:`retry_after` turns
that into the ``retry_after`` of the errors a caller meets during an outage.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from typing import Any, Callable, Collection, Deque, List, Optional, Protocol, Set, Tuple, TypeVar

import gevent
from gevent.event import Event

from geventconnpool._addresses import Address, AddressBook, address_failed, log_recovery
from geventconnpool._lease import Entry, Waiter
from geventconnpool._observing import Observer, tell
from geventconnpool._outage import OutageLog
from geventconnpool.errors import PoolUnavailable

C = TypeVar("C")

logger = logging.getLogger("geventconnpool")

# How long after a slot's next attempt begins a caller given retry_after wakes:
# a few loop turns, for the caller to find the attempt under way, not due.
_AFTER_THE_SLOT = 0.005


class Slot:
    """One connection being opened: how often it failed, and when it tries next."""

    __slots__ = ("attempt", "next_wait", "sleeps_until")

    def __init__(self) -> None:
        self.attempt = 0
        """The attempts so far."""
        self.sleeps_until: Optional[float] = None
        """When the next attempt begins (the event loop's clock) while it waits after a failure, else None."""
        self.next_wait: Optional[float] = None
        """The wait that follows the next failure, drawn one attempt ahead so that it is known meanwhile."""


class ConnectingPool(Protocol[C]):
    """What connecting uses of the pool: the private contract of this module."""

    @property
    def name(self) -> str: ...
    @property
    def fail_fast(self) -> bool: ...
    @property
    def connect_timeout(self) -> Optional[float]: ...

    RECONNECT_MAX_DELAY: float
    _generation: int
    _closed: bool
    _slots: Set[Slot]
    _outage: OutageLog
    _last_error: Optional[BaseException]
    _reconnected: Event
    _failed_connects: int
    _waiters: Deque[Waiter]
    _loop: Any  # the hub's event loop
    _observers: Tuple[Observer, ...]
    _addresses: Optional[AddressBook]  # for a pool made with address=, else None
    _entries: Set[Entry[C]]

    def _new_connection(self) -> C: ...
    def _connect(self, address: Address) -> C: ...
    def _resolve(self, host: str, port: int) -> List[str]: ...
    def _reconnect_wait(self, attempt: int) -> float: ...
    def _bounded(self, seconds: Optional[float], what: str, hook: Callable[..., Any], *args: Any) -> Any: ...
    def _stopping(self) -> bool: ...
    def _close_quietly(self, conn: C, in_background: bool = False) -> None: ...
    def _add(self, conn: C, address: Optional[Address] = None) -> None: ...
    def _unavailable(self) -> bool: ...
    def _unavailable_error(self) -> PoolUnavailable: ...
    def _hand_over(self, result: Any) -> None: ...


def connect_loop(
    pool_ref: weakref.ref[ConnectingPool[Any]], generation: int, after_failures: int = 0
) -> None:
    """Open one connection for a slot, retrying with backoff until it is open.

    Any failure, of the hook or of the pool's own code, is a failed attempt;
    only the pool's own stop ends it sooner (close() and fork forget the
    slots).  A slot that replaces a connection that counts as a failed
    connect starts with the wait that follows ``after_failures`` failures.
    """
    pool = pool_ref()
    if pool is None:
        return
    slot = Slot()
    pool._slots.add(slot)
    if after_failures:
        slot.attempt = after_failures
        first_wait = pool._reconnect_wait(after_failures)
        slot.sleeps_until = pool._loop.now() + first_wait
        del pool
        gevent.sleep(first_wait)  # switches
    else:
        del pool
    while True:
        pool = pool_ref()
        if pool is None or pool._generation != generation or pool._closed:
            return
        try:
            wait = connect_once(pool, slot, generation)  # switches
        except BaseException:
            if pool._stopping():
                return
            logger.exception("pool %r: unexpected error while connecting", pool.name)
            wait = pool.RECONNECT_MAX_DELAY
        if wait is None:
            pool._slots.discard(slot)
            return
        reconnected = pool._reconnected
        del pool
        if not wait:
            continue  # a connect failed, and another address is tried at once
        try:
            reconnected.wait(wait)  # switches; another slot connecting again ends the backoff
        except BaseException:
            pool = pool_ref()
            if pool is None or pool._stopping():
                return
            del pool


def connect_once(pool: ConnectingPool[C], slot: Slot, generation: int) -> Optional[float]:
    """Try once to open a connection for ``slot``.

    Return the seconds to wait before the next try, or None when the slot is done.
    """
    slot.attempt += 1
    next_wait = slot.next_wait if slot.next_wait is not None else pool._reconnect_wait(slot.attempt)
    slot.next_wait, slot.sleeps_until = next_wait, None
    error: BaseException = TypeError("_new_connection() returned None")
    book, address, tried_at = pool._addresses, None, 0.0
    started = time.monotonic()  # for the observers' create_time
    try:
        if book is None:
            conn = pool._bounded(pool.connect_timeout, "_new_connection()", pool._new_connection)  # switches
        else:
            error, tried_at = TypeError("_connect() returned None"), pool._loop.now()
            book.refresh(pool, tried_at)  # switches, when a resolution is due
            address = book.choose([e.address for e in pool._entries], pool._loop.now())
            try:
                conn = pool._bounded(pool.connect_timeout, "_connect()", pool._connect, address)  # switches
            finally:
                book.attempt_ended(address)
    except BaseException as exc:  # whatever it is, the attempt failed, unless the pool stops us
        if pool._stopping():
            raise
        conn, error = None, exc
    if generation != pool._generation:
        return None  # the process forked meanwhile: the connection is the parent's
    if pool._closed:  # close() was called from _new_connection() itself
        if conn is not None:
            pool._close_quietly(conn)  # switches
        return None
    if conn is not None:
        pool._add(conn, address)
        if pool._observers:
            tell(pool, "connected", time.monotonic() - started)
        if book is not None and address is not None:
            log_recovery(pool, book, address)
        recovered = pool._outage.succeeded(pool._loop.now())
        if recovered is not None:
            logger.info("pool %r: %s", pool.name, recovered)
            pool._last_error = None
            pool._reconnected.set()
            pool._reconnected = Event()
        return None
    pool._failed_connects += 1
    if book is not None and address is not None and not address_failed(pool, book, address, error, tried_at):
        slot.attempt -= 1  # another address is tried at once: no failure of the slot's
        return 0.0
    pool._last_error = error
    # The slot sleeps next_wait on the loop's clock, from this very tick.
    slot.sleeps_until = pool._loop.now() + next_wait
    slot.next_wait = pool._reconnect_wait(slot.attempt + 1)
    warning = pool._outage.failed(error, pool._loop.now())
    if warning is not None:
        logger.warning("pool %r: %s", pool.name, warning)
    else:
        logger.debug("pool %r: failed to open a connection, retrying: %r", pool.name, error)
    if pool.fail_fast and pool._unavailable():
        unavailable = pool._unavailable_error()
        while pool._waiters:
            pool._hand_over(unavailable)
    return next_wait


def retry_after(slots: Collection[Slot], now: float) -> float:
    """Seconds from ``now`` until the pool's next attempt to open a connection, at the soonest.

    A slot waiting after a failure tries again when its wait ends; a slot
    trying now, or due to (a caller woken by the same tick may run first),
    tries again, if this attempt fails, no sooner than its next wait (a caller
    told 0 here would spin until the attempt fails).  The caller is told a few
    milliseconds more, so that it wakes once that attempt is under way and
    calls once per attempt.  ``now`` is the event loop's clock, which the
    slots' waits and the caller's ``gevent.sleep`` also use.
    """
    soonest = math.inf
    for slot in slots:
        if slot.sleeps_until is not None and slot.sleeps_until > now:
            soonest = min(soonest, slot.sleeps_until - now + _AFTER_THE_SLOT)
        elif slot.next_wait is not None:
            soonest = min(soonest, slot.next_wait + _AFTER_THE_SLOT)
    return soonest if soonest != math.inf else 0.0
