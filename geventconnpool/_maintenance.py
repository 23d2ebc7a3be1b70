"""Maintenance: one greenlet per pool that recycles, pings, marks and watches its connections.

It runs when the pool has ``keepalive``, ``max_lifetime``, ``check_after``,
``leak_warning`` or ``max_idle``.  At each wake-up :func:`plan` decides, from the time and
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
import math
import time
import traceback
import weakref
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import Any, Callable, Deque, Generic, Iterable, List, Optional, Protocol, Set, TypeVar

import gevent

from geventconnpool._lease import IN_POOL, NEVER, Entry
from geventconnpool._watching import unwatch

C = TypeVar("C")

logger = logging.getLogger("geventconnpool")

_now = time.monotonic

# Each connection's lifetime is drawn between this fraction of max_lifetime
# and all of it, so that connections opened together do not expire together.
SHORTEST_LIFETIME = 0.9

# With leak_warning, maintenance looks at the held connections this many times
# per leak_warning: get() reads no clock, so a loan's start is known only as
# the first look that finds it, and a warning comes at most a quarter late.
LEAK_LOOKS = 4


class Timed(Protocol):
    """What :func:`plan` reads of an entry: the times of its life."""

    expires_at: float
    idle_since: float  # when a caller last gave it back (or it opened)
    checked_at: float  # when a keepalive or check_after check last found it working
    lent_at: float  # when maintenance first saw the loan (0.0 until then)
    lent_from: Optional[FrameType]  # where get() was called; None when not lent, or warned about already


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
    shrink: List[T] = field(default_factory=list)
    """At most one idle entry unused for ``max_idle``: closed for good, without a replacement."""


def quiet_since(entry: Timed) -> float:
    """Since when ``entry`` has been idle and unchecked: what ``keepalive`` and ``check_after`` count from."""
    return max(entry.idle_since, entry.checked_at)


def plan(
    now: float,
    idle: Iterable[T],
    entries: Iterable[T],
    *,
    keepalive: Optional[float],
    max_lifetime: Optional[float],
    check_after: Optional[float],
    leak_warning: Optional[float],
    max_idle: Optional[float] = None,
    surplus: int = 0,
    shrunk_at: float = -math.inf,
) -> Plan[T]:
    """Decide what is due at ``now``.

    ``idle`` is in the pool's order, the longest idle first; ``entries`` is
    every open one, idle or held.  A connection opened or given back after
    ``now`` is due no sooner than one period later, so the wake-up is at most
    the shortest period away; the entries already open may bring it closer.
    ``surplus`` is how many connections the pool has above ``min_size``, and
    ``shrunk_at`` when one was last closed for ``max_idle``: one more is
    closed no sooner than ``max_idle / 4`` after.
    """
    shortest_lifetime = None if max_lifetime is None else max_lifetime * SHORTEST_LIFETIME
    leak_looks = None if leak_warning is None else leak_warning / LEAK_LOOKS
    periods = [p for p in (keepalive, shortest_lifetime, check_after, leak_looks, max_idle) if p is not None]
    result: Plan[T] = Plan(wake_at=now + min(periods))
    waiting = []
    for entry in idle:
        if entry.expires_at <= now:
            result.recycle.append(entry)
        else:
            waiting.append(entry)
    if max_idle is not None and surplus > 0:
        # Before the pings: a connection closed for good needs none.  Pings are
        # no use, so the one unused the longest need not be the leftmost.
        allowed_at = shrunk_at + max_idle / 4
        if waiting:
            unused = min(waiting, key=lambda e: e.idle_since)
            if max(unused.idle_since + max_idle, allowed_at) <= now:
                result.shrink.append(unused)
                waiting.remove(unused)
                surplus -= 1
                allowed_at = now + max_idle / 4
        if surplus > 0 and waiting:
            unused = min(waiting, key=lambda e: e.idle_since)
            result.wake_at = min(result.wake_at, max(unused.idle_since + max_idle, allowed_at))
    if max_lifetime is not None:
        # A held connection that expires is recycled when it comes back.
        lifetimes = [e.expires_at for e in entries if e.expires_at > now]
        result.wake_at = min([result.wake_at, *lifetimes])
    if keepalive is not None:
        while waiting and now - quiet_since(waiting[0]) >= keepalive:
            result.ping.append(waiting.pop(0))
        if waiting:
            result.wake_at = min(result.wake_at, quiet_since(waiting[0]) + keepalive)
    if check_after is not None:
        for entry in waiting:
            if now - quiet_since(entry) < check_after:
                result.wake_at = min(result.wake_at, quiet_since(entry) + check_after)
                break
            result.stale.append(entry)
    if leak_warning is not None:
        for entry in entries:
            if entry.lent_from is None:
                continue
            lent_at = entry.lent_at or now  # a loan not seen before began at most one look ago
            if now - lent_at >= leak_warning:
                result.leaked.append(entry)
            else:
                result.wake_at = min(result.wake_at, lent_at + leak_warning)
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
    @property
    def max_idle(self) -> Optional[float]: ...
    @property
    def min_size(self) -> int: ...

    _generation: int
    _closed: bool
    _idle: Deque[Entry[C]]
    _entries: Set[Entry[C]]
    _checking: Set[Entry[C]]
    _closing: Set[Entry[C]]
    _retiring: Set[Entry[C]]  # held, out of _entries (see _lifecycle.py)
    _connecting: int
    _to_retire: int
    _retired: int
    _watchers: Set[Any]
    _shrunk_at: float  # when a connection was last closed for max_idle

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
        max_idle=pool.max_idle,
        surplus=len(pool._entries) + pool._connecting - pool._to_retire - pool.min_size,
        shrunk_at=pool._shrunk_at,
    )
    for entry in due.shrink:
        pool._leave_idle(entry)
        retire_now(pool, entry)
        pool._shrunk_at = now
        logger.debug("pool %r: closing a connection unused for max_idle=%s s", pool.name, pool.max_idle)
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
    if pool.leak_warning is not None:
        note_loans(entries, now)
    return max(due.wake_at - _now(), 0.001)


def note_loans(entries: Iterable[Entry[Any]], now: float) -> None:
    """Note ``now`` as the start of each loan that maintenance sees for the first time."""
    for entry in entries:
        if entry.lent_from is not None and not entry.lent_at:
            entry.lent_at = now


def keepalive_check(pool_ref: weakref.ref[MaintainedPool[Any]], entry: Entry[Any]) -> None:
    """Ping one idle connection that maintenance took out of the pool; give it back if it works."""
    pool = pool_ref()
    if pool is None:
        return
    try:
        used = entry.idle_since
        if pool._check(entry, pool.connect_timeout, in_background=True):  # switches
            pool._release(entry)
            entry.idle_since = used  # a ping is no use: max_idle counts from the last caller's
    finally:
        pool._checking.discard(entry)


def close_recycled(pool_ref: weakref.ref[MaintainedPool[Any]], entry: Entry[Any]) -> None:
    """Close a connection that maintenance recycled, so that a slow close never delays maintenance."""
    pool = pool_ref()
    if pool is None or entry not in pool._closing:
        return  # close() took it over
    pool._closing.discard(entry)
    pool._close_quietly(entry.conn, in_background=True)  # switches


class RetiringPool(Protocol[C]):
    """What :func:`retire_now` uses of the pool (lifecycle control uses it too)."""

    _entries: Set[Entry[C]]
    _watchers: Set[Any]
    _retired: int
    _closing: Set[Entry[C]]

    def _spawn(self, what: str, loop: Callable[..., None], *args: Any) -> None: ...


def retire_now(pool: RetiringPool[C], entry: Entry[C]) -> None:
    """Close an entry for good, without a replacement, in a greenlet of its own (resize, drain, max_idle)."""
    pool._entries.discard(entry)
    unwatch(entry, pool._watchers)
    entry.loan = IN_POOL
    entry.watching = NEVER
    pool._retired += 1
    pool._closing.add(entry)
    pool._spawn("recycle", close_recycled, entry)


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
        "pool %r: a connection has been held for at least %.1f s (leak_warning=%s); it was taken at:\n%s",
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
