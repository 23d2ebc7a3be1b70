"""Maintenance: one greenlet per pool that recycles, pings, marks and watches its connections.

It runs when the pool has ``keepalive``, ``max_lifetime``, ``check_after`` or
``leak_warning``.  At each wake-up :func:`plan` decides, from the time and
the entries alone, what is due; :func:`maintain` does it without any I/O (an
idle connection to ping, or to close, goes to a greenlet of its own, started
here), so that :meth:`~geventconnpool.ConnectionPool.get`, which reads no
clock, can trust what maintenance leaves idle; then the loop sleeps until
the next thing falls due.  It holds the pool by weak reference and drops it
before each sleep, so that a pool nobody uses any more can be collected.
"""

from __future__ import annotations

import dis
import logging
import time
import traceback
import weakref
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import Any, Callable, Deque, Generic, Iterable, List, Optional, Protocol, Set, TypeVar

import gevent

from geventconnpool._lease import Entry

C = TypeVar("C")

logger = logging.getLogger("geventconnpool")

_now = time.monotonic

# Each connection's lifetime is drawn between this fraction of max_lifetime
# and all of it, so that connections opened together do not expire together.
SHORTEST_LIFETIME = 0.9


class Timed(Protocol):
    """What :func:`plan` reads of an entry: the times of its life."""

    expires_at: float
    idle_since: float
    lent_at: float
    lent_from: Optional[FrameType]


T = TypeVar("T", bound=Timed)


@dataclass
class Plan(Generic[T]):
    """What one wake-up of the maintenance greenlet does, and when it wakes next."""

    wake_at: float
    """When something else falls due, at the latest."""
    recycle: List[T] = field(default_factory=list)
    """Idle entries whose lifetime ended: closed and replaced."""
    ping: List[T] = field(default_factory=list)
    """Idle entries idle for ``keepalive``: taken out of the pool and checked."""
    stale: List[T] = field(default_factory=list)
    """Idle entries idle for ``check_after``: get() checks them before it lends them."""
    leaked: List[T] = field(default_factory=list)
    """Held entries held for ``leak_warning``, not warned about yet."""


def plan(
    now: float,
    idle: Iterable[T],
    entries: Iterable[T],
    *,
    keepalive: Optional[float],
    max_lifetime: Optional[float],
    check_after: Optional[float],
    leak_warning: Optional[float],
) -> Plan[T]:
    """Decide what is due at ``now``.

    ``idle`` is in the pool's order, the longest idle first; ``entries`` is
    every open one, idle or held.  A connection opened or given back after
    ``now`` is due no sooner than one period later, so the wake-up is at most
    the shortest period away; the entries already open may bring it closer.
    """
    shortest_lifetime = None if max_lifetime is None else max_lifetime * SHORTEST_LIFETIME
    periods = [p for p in (keepalive, shortest_lifetime, check_after, leak_warning) if p is not None]
    result: Plan[T] = Plan(wake_at=now + min(periods))
    waiting = []
    for entry in idle:
        if entry.expires_at <= now:
            result.recycle.append(entry)
        else:
            waiting.append(entry)
    if max_lifetime is not None:
        # A held connection that expires is recycled when it comes back.
        lifetimes = [e.expires_at for e in entries if e.expires_at > now]
        result.wake_at = min([result.wake_at, *lifetimes])
    if keepalive is not None:
        while waiting and now - waiting[0].idle_since >= keepalive:
            result.ping.append(waiting.pop(0))
        if waiting:
            result.wake_at = min(result.wake_at, waiting[0].idle_since + keepalive)
    if check_after is not None:
        for entry in waiting:
            if now - entry.idle_since < check_after:
                result.wake_at = min(result.wake_at, entry.idle_since + check_after)
                break
            result.stale.append(entry)
    if leak_warning is not None:
        for entry in entries:
            if entry.lent_from is None:
                continue
            if now - entry.lent_at >= leak_warning:
                result.leaked.append(entry)
            else:
                result.wake_at = min(result.wake_at, entry.lent_at + leak_warning)
    return result


class MaintainedPool(Protocol[C]):
    """What maintenance uses of the pool: the private contract of this module."""

    @property
    def name(self) -> str: ...
    @property
    def connect_timeout(self) -> Optional[float]: ...
    @property
    def keepalive(self) -> Optional[float]: ...
    @property
    def max_lifetime(self) -> Optional[float]: ...
    @property
    def check_after(self) -> Optional[float]: ...
    @property
    def leak_warning(self) -> Optional[float]: ...

    _generation: int
    _closed: bool
    _idle: Deque[Entry[C]]
    _entries: Set[Entry[C]]
    _checking: Set[Entry[C]]
    _closing: Set[Entry[C]]
    _retiring: Set[Entry[C]]  # held, out of _entries (see _lifecycle.py)

    def _recycle(self, entry: Entry[C], in_background: bool = False) -> None: ...
    def _leave_idle(self, entry: Entry[C]) -> None: ...
    def _spawn(self, what: str, loop: Callable[..., None], *args: Any) -> None: ...
    def _check(self, entry: Entry[C], seconds: Optional[float], in_background: bool = False) -> bool: ...
    def _release(self, entry: Entry[C]) -> None: ...
    def _close_quietly(self, conn: C, in_background: bool = False) -> None: ...


def maintenance_loop(pool_ref: weakref.ref[MaintainedPool[Any]], generation: int) -> None:
    """Maintain the pool, for as long as it is open."""
    while True:
        pool = pool_ref()
        if pool is None or pool._generation != generation or pool._closed:
            return
        try:
            wait = maintain(pool)
        except Exception:
            logger.exception("pool %r: unexpected error in maintenance", pool.name)
            wait = 1.0
        del pool
        gevent.sleep(wait)  # switches


def maintain(pool: MaintainedPool[C]) -> float:
    """Do what is due; return the seconds until something else is."""
    now = _now()
    # A held connection that a shrink or a drain retires may leak too.
    entries = pool._entries | pool._retiring if pool._retiring else pool._entries
    due = plan(
        now,
        pool._idle,
        entries,
        keepalive=pool.keepalive,
        max_lifetime=pool.max_lifetime,
        check_after=pool.check_after,
        leak_warning=pool.leak_warning,
    )
    for entry in due.recycle:
        pool._leave_idle(entry)
        pool._recycle(entry, in_background=True)
    for entry in due.ping:
        pool._leave_idle(entry)
        pool._checking.add(entry)
        pool._spawn("keepalive", keepalive_check, entry)
    for entry in due.stale:
        entry.stale = True
    for entry in due.leaked:
        warn_leak(pool, entry, now)
    return max(due.wake_at - _now(), 0.001)


def keepalive_check(pool_ref: weakref.ref[MaintainedPool[Any]], entry: Entry[Any]) -> None:
    """Ping one idle connection that maintenance took out of the pool; give it back if it works."""
    pool = pool_ref()
    if pool is None:
        return
    try:
        if pool._check(entry, pool.connect_timeout, in_background=True):  # switches
            pool._release(entry)
    finally:
        pool._checking.discard(entry)


def close_recycled(pool_ref: weakref.ref[MaintainedPool[Any]], entry: Entry[Any]) -> None:
    """Close a connection that maintenance recycled, so that a slow close never delays maintenance."""
    pool = pool_ref()
    if pool is None or entry not in pool._closing:
        return  # close() took it over
    pool._closing.discard(entry)
    pool._close_quietly(entry.conn, in_background=True)  # switches


def warn_leak(pool: MaintainedPool[Any], entry: Entry[Any], now: float) -> None:
    """Log, once per loan, that a connection is held too long, with the stack of its get() call."""
    frame = entry.lent_from
    assert frame is not None
    entry.lent_from = None  # one warning per loan
    stack = traceback.StackSummary.extract(traceback.walk_stack(frame))
    stack.reverse()
    if stack:  # the caller has moved on since: show the line of its get() call
        last = stack[-1]
        line = line_at(frame.f_code, entry.lent_lasti)
        stack[-1] = traceback.FrameSummary(last.filename, line, last.name)
    logger.warning(
        "pool %r: a connection has been held for %.1f s (leak_warning=%s); it was taken at:\n%s",
        pool.name,
        now - entry.lent_at,
        pool.leak_warning,
        "".join(stack.format()).rstrip(),
    )


def line_at(code: CodeType, lasti: int) -> int:
    """The source line of the instruction at offset ``lasti`` of ``code``.

    get() saves ``f_lasti`` rather than ``f_lineno``, which decodes the line
    table on every call and would cost more than the whole checkout.
    """
    line = code.co_firstlineno
    for offset, start in dis.findlinestarts(code):
        if offset > lasti:
            break
        if start is not None:
            line = start
    return line
