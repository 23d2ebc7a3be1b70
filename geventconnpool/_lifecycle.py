"""Lifecycle control: a holder's discard, explicit leases, closing with a grace period, resizing, draining,
and how an elastic pool (``min_size`` < ``size``) grows and replaces.

Private.  None of it runs on the checkout path.  What the pool must do with
a held connection when it comes back (close it and open another, or close it
for good) is decided by swapping the entry's ``pool`` for a :class:`Diverted`
one, which every way out of the entries' exits reads instead of the pool:
the exits stay as they are, and a ``with`` block entered before the swap is
diverted too (its ``__exit__`` was looked up when the block began, but reads
``self.pool`` only when it runs).  What this module may use of its pool is
:class:`LifecyclePool`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Deque,
    Dict,
    Generic,
    Optional,
    Protocol,
    Set,
    Tuple,
    Type,
    TypeVar,
)

import gevent

from geventconnpool import _arguments
from geventconnpool._lease import ENTERED, ORPHANAGE, ClosingIdle, Entry, StandIn, Waiter
from geventconnpool._maintenance import retire_now
from geventconnpool._watching import unwatch

if TYPE_CHECKING:
    from geventconnpool._addresses import Address

C = TypeVar("C")

logger = logging.getLogger("geventconnpool")

_now = time.monotonic


class LifecyclePool(Protocol[C]):
    """What lifecycle control uses of the pool: the private contract of this module."""

    @property
    def name(self) -> str: ...

    @property
    def min_size(self) -> int: ...

    _size: int
    _exc_classes: Tuple[Type[BaseException], ...]
    _min_size: Optional[int]  # None: the same as _size
    _max_idle: Optional[float]
    _waiters: Deque[Waiter]
    _closed: bool
    _entries: Set[Entry[C]]
    _idle: Deque[Entry[C]]
    _connecting: int
    _closing: Set[Entry[C]]
    _watchers: Set[Any]
    _leases: Dict[int, Entry[C]]  # by id() of the connection: a connection need not be hashable
    _retiring: Set[Entry[C]]  # held, closed for good when they come back (a shrink)
    _to_retire: int  # connecting slots whose connection is closed for good as it opens (a shrink)
    _retired: int
    _opened: int
    _drain: Optional[Drain[C]]  # the latest drain()
    _generation: int
    _greenlets: Set[gevent.Greenlet[Any, Any]]

    @property
    def connect_timeout(self) -> Optional[float]: ...

    def _discard(
        self,
        entry: Entry[C],
        error: Optional[BaseException],
        found_by: str = ...,
        unexpected: bool = ...,
        in_background: bool = ...,
    ) -> None: ...
    def _recycle(self, entry: Entry[C], in_background: bool = False, why: str = ...) -> None: ...
    def _check_thread_and_fork(self) -> None: ...
    def _close_quietly(self, conn: C, in_background: bool = False) -> None: ...
    def _leave_idle(self, entry: Entry[C]) -> None: ...
    def _open_slot(self, after_failures: int = 0) -> None: ...
    def _spawn(self, what: str, loop: Callable[..., None], *args: Any) -> None: ...
    def _new_connection(self) -> C: ...
    def _bounded(self, seconds: Optional[float], what: str, hook: Callable[..., Any], *args: Any) -> Any: ...
    def _add(self, conn: C, address: Optional[Address] = None) -> None: ...
    def _open_one(self) -> Tuple[C, Optional[Address]]: ...
    def _reconnect_wait(self, attempt: int) -> float: ...
    def _stopping(self) -> bool: ...


class Diverted(StandIn, Generic[C]):
    """What a held entry's ``pool`` becomes when it must not go back to the idle ones as it is.

    However its block ends (normally, with an error that breaks the
    connection or with one that does not, a waiter queued or not), the
    entry's exit reaches :meth:`_release`, :meth:`_discard` or ``_idle.append``
    here, which give the entry back to its pool and call ``back`` with it.
    The pool's own ``_release`` and ``_discard`` forward here too, for an
    entry that comes back from a check or an interrupted waiter.
    """

    def __init__(self, pool: LifecyclePool[C], back: Callable[[Entry[C]], None]) -> None:
        self.pool = pool
        self.back = back
        self._idle: Deque[Entry[C]] = ClosingIdle(self._release)

    def _release(self, entry: Entry[C]) -> None:
        entry.pool = self.pool  # type: ignore[assignment]
        self.back(entry)

    def _discard(self, entry: Entry[C], error: Optional[BaseException]) -> None:
        self._release(entry)

    def _reset_and_release(self, entry: Entry[C]) -> None:
        self._release(entry)  # no reset: the connection is not kept as it is


class Recycling(Diverted[C]):
    """What a held entry's ``pool`` becomes when the pool must not keep it (its address left the answer).

    It comes back to be closed and replaced, counted in ``recycled``; but
    one that broke in its block, or that its holder discards, is a broken
    connection like any other: counted and logged as discarded.
    """

    def __init__(self, pool: LifecyclePool[C], why: str) -> None:
        super().__init__(pool, functools.partial(_recycle_returned, pool, why))
        self._exc_classes = pool._exc_classes  # the exits tell a broken connection from one given back

    def _discard(self, entry: Entry[C], error: Optional[BaseException]) -> None:
        entry.pool = self.pool  # type: ignore[assignment]
        self.pool._discard(entry, error)  # switches


def at_home(entry: Entry[C], pool: LifecyclePool[C]) -> bool:
    """Whether ``entry`` goes back to ``pool`` as usual: not diverted, nor orphaned by fork()."""
    return entry.pool is pool  # type: ignore[comparison-overlap]


def in_its_slot(entry: Entry[C], pool: LifecyclePool[C]) -> bool:
    """Whether ``entry``, or its replacement, keeps its place in ``pool``'s size when it comes back.

    True at home, and for one to be recycled (its replacement takes the
    place); false for one already bound to be discarded, retired or orphaned.
    A holder's discard() and a shrink may still change what happens to it.
    """
    return at_home(entry, pool) or isinstance(entry.pool, Recycling)


# -- discard ----------------------------------------------------------------------------------


def held_entry(pool: LifecyclePool[C], conn: C) -> Optional[Entry[C]]:
    """The entry of ``conn`` if a caller holds it, inside its block or as an explicit lease; else None.

    A scan of the pool's entries: one call of discard() costs ``size`` steps,
    so that the checkout path need not keep any index.
    """
    for entry in itertools.chain(pool._entries, pool._retiring):
        if entry.conn is conn and entry.loan is ENTERED:
            return entry
    return None


def discard(pool: LifecyclePool[C], conn: C) -> None:
    """Mark the held ``conn`` broken: it is closed and replaced when its holder gives it back."""
    pool._check_thread_and_fork()
    if pool._closed:
        return  # every connection is closed when it comes back, or was closed under its holder already
    entry = held_entry(pool, conn)
    if entry is None:
        raise ValueError(
            f"pool {pool.name!r}: discard() of a connection that no caller holds from this pool: {conn!r}"
        )
    mark_broken(pool, entry)


def mark_broken(pool: LifecyclePool[C], entry: Entry[C]) -> None:
    """Have a held entry closed and replaced as a broken one when it comes back.

    Nothing changes for one closed when it comes back already (discarded
    before, retired by a shrink or a drain); a connection to be recycled that
    its holder finds broken is a broken one.
    """
    if in_its_slot(entry, pool):
        entry.pool = Diverted(pool, functools.partial(_discarded, pool))


def _discarded(pool: LifecyclePool[C], entry: Entry[C]) -> None:
    pool._discard(entry, None, "pool.discard() by its holder")  # switches


# -- explicit leases ------------------------------------------------------------------------------


def lend(pool: LifecyclePool[C], entry: Entry[C]) -> C:
    """Enter the lease ``entry`` for a caller of acquire(), and remember it until release()."""
    conn = entry.__enter__()
    pool._leases[id(conn)] = entry
    return conn


def release(pool: LifecyclePool[C], conn: C, discard_it: bool) -> None:
    """End the explicit lease of ``conn``, as the end of a ``with`` block would."""
    entry = pool._leases.get(id(conn))
    if entry is None or entry.conn is not conn:
        raise RuntimeError(
            f"pool {pool.name!r}: release() of a connection that acquire() did not lend, "
            f"or that was released already: {conn!r}"
        )
    del pool._leases[id(conn)]
    if discard_it:
        mark_broken(pool, entry)
    entry.__exit__(None, None, None)  # switches


# -- closing with a grace period -----------------------------------------------------------------


def close_held(pool: LifecyclePool[C], limit: float) -> None:
    """After close(): wait up to ``limit`` seconds for held connections to come back, then close them.

    A connection closed under its holder is the holder's to lose: its exit,
    or release(), finds it orphaned and does nothing more.
    """
    deadline = _now() + limit
    while pool._entries or pool._retiring:
        remaining = deadline - _now()
        if remaining <= 0:
            break
        gevent.sleep(min(remaining, 0.01))  # switches
    held = list(pool._entries) + list(pool._retiring)
    pool._entries.clear()
    pool._retiring.clear()
    if held:
        logger.warning(
            "pool %r: closing %d connections still held %s s after close()", pool.name, len(held), limit
        )
    for entry in held:
        entry.pool = ORPHANAGE
        unwatch(entry, pool._watchers)
    for entry in held:
        pool._close_quietly(entry.conn)  # switches


# -- resizing -----------------------------------------------------------------------------------


def resize(pool: LifecyclePool[C], size: int) -> None:
    """Change the pool's size: open the new slots, or close the surplus, idle ones first.

    A fixed pool (``min_size`` None) keeps ``size`` open; an elastic one
    keeps what it has, between ``min_size`` and the new size.
    """
    if pool._min_size is not None and size < pool._min_size:
        raise ValueError(f"pool {pool.name!r}: size must be >= min_size={pool._min_size}, not {size!r}")
    slots = _slots(pool)
    pool._size = size
    wanted = min(max(slots, pool.min_size), size)
    for _ in range(wanted - slots):
        pool._open_slot()
    surplus = slots - wanted
    if surplus <= 0:
        return
    # Idle connections first, the least recently used ones (on the left).
    while surplus and pool._idle:
        entry = pool._idle[0]
        pool._leave_idle(entry)
        retire_now(pool, entry)
        surplus -= 1
    # Then slots still opening: their connection is closed as it opens.
    cancelled = min(surplus, pool._connecting - pool._to_retire)
    pool._to_retire += cancelled
    surplus -= cancelled
    # Then held ones (by a caller, or by a check): closed when they come back.
    for entry in [e for e in pool._entries if in_its_slot(e, pool)][:surplus]:
        _retire_later(pool, entry)
        surplus -= 1
    # A held entry already discarded by its holder is replaced when it comes back: one slot more to cancel.
    pool._to_retire += surplus


def _retire_later(pool: LifecyclePool[C], entry: Entry[C]) -> None:
    """Take a held entry out of the pool's size: it is closed for good when it comes back."""
    pool._entries.discard(entry)
    pool._retiring.add(entry)
    entry.pool = Diverted(pool, functools.partial(_retire_returned, pool))


def _retire_returned(pool: LifecyclePool[C], entry: Entry[C]) -> None:
    pool._retiring.discard(entry)
    retire_now(pool, entry)


def recycle_when_back(pool: LifecyclePool[C], entry: Entry[C], why: str) -> None:
    """Have a held entry closed and replaced when it comes back, rather than kept; ``why`` goes to the log."""
    if at_home(entry, pool):  # else it is closed when it comes back already (discarded, retired, drained)
        entry.pool = Recycling(pool, why)


def _recycle_returned(pool: LifecyclePool[C], why: str, entry: Entry[C]) -> None:
    pool._recycle(entry, why=why)  # switches


def retire_new(pool: LifecyclePool[C], conn: C) -> bool:
    """Whether a connection that just opened is closed at once, for a shrink; if so, close it."""
    if not pool._to_retire:
        return False
    pool._to_retire -= 1
    pool._connecting -= 1
    _unneeded(pool, conn, in_background=True)  # switches
    return True


# -- elastic size -----------------------------------------------------------------------------------


def elastic_options(
    size: int, min_size: Optional[int], max_idle: Optional[float]
) -> Tuple[Optional[int], Optional[float]]:
    """Check the constructor's ``min_size`` and ``max_idle`` against ``size``; return them.

    ``max_idle`` closes only connections above ``min_size``: without a
    ``min_size`` below ``size`` it could never close any, which is a mistake.
    """
    if min_size is not None:
        min_size = _arguments.whole_number(min_size, "min_size", minimum=1, maximum=size)
    seconds = _arguments.seconds(max_idle, "max_idle")
    if seconds is not None and (min_size is None or min_size == size):
        raise ValueError(
            f"max_idle closes idle connections above min_size: it needs min_size below size={size},"
            f" not min_size={min_size!r}"
        )
    return min_size, seconds


def _slots(pool: LifecyclePool[Any]) -> int:
    """The connections of the pool's size: open (idle or in use) or being opened."""
    return len(pool._entries) + pool._connecting - pool._to_retire


def grow(pool: LifecyclePool[Any]) -> None:
    """A caller queued in an elastic pool below its size: open one more connection, unless those being
    opened already cover every waiter."""
    if pool._connecting - pool._to_retire < len(pool._waiters) and _slots(pool) < pool._size:
        pool._open_slot()


def replaces(pool: LifecyclePool[Any]) -> bool:
    """Whether a connection that just left the pool (broken, expired) needs a replacement.

    A fixed pool always does.  An elastic one does while it has fewer than
    ``min_size`` open or opening, or fewer being opened than callers wait.
    """
    return _slots(pool) < pool.min_size or pool._connecting - pool._to_retire < len(pool._waiters)


# -- draining ---------------------------------------------------------------------------------------


def in_flight_limit(size: int) -> int:
    """How many replacements a drain opens at once, and how many connections it may keep above ``size``."""
    return max(1, size // 4)


class Drain(Generic[C]):
    """One call of drain(): the entries it replaces, and its replacements being opened."""

    __slots__ = ("in_flight", "old")

    def __init__(self, old: Set[Entry[C]]) -> None:
        self.old = old
        self.in_flight = 0


def drain(pool: LifecyclePool[C]) -> None:
    """Replace every connection open now, make-before-break, after a canary proves the new ones open.

    The canary is opened in the caller's greenlet: if it fails, its error
    propagates and nothing changed.  Then it takes the place of an old
    connection, and background greenlets replace the others.
    """
    canary, address = pool._open_one()  # switches
    if pool._closed:
        _unneeded(pool, canary)  # switches
        return
    # Decided from here on, without a switch: a drain under way starts over from the current set.
    for greenlet in [g for g in pool._greenlets if g.name.endswith(" drain")]:
        pool._greenlets.discard(greenlet)  # so that it knows it is stopped (see _stopping())
        greenlet.kill(block=False)
    work = pool._drain = Drain({e for e in pool._entries if at_home(e, pool)})
    swapped = _swap(pool, work, canary, address)
    for _ in range(min(in_flight_limit(pool._size), len(work.old))):
        pool._spawn("drain", drain_loop, work, pool._generation)
    if not swapped:
        _unneeded(pool, canary)  # switches


def draining(pool: LifecyclePool[C]) -> bool:
    """Whether a connection that the latest drain() replaces is still open: in the pool, retiring, or not
    yet closed by the greenlet that closes it."""
    work = pool._drain
    return work is not None and bool(work.old & (pool._entries | pool._retiring | pool._closing))


def _old(pool: LifecyclePool[C], work: Drain[C]) -> Optional[Entry[C]]:
    """The old entry to replace next: an idle one (the least recently used), else a held one, else None."""
    for entry in pool._idle:
        if entry in work.old:
            return entry
    for entry in work.old:
        if entry in pool._entries and at_home(entry, pool):
            return entry
    return None


def _swap(pool: LifecyclePool[C], work: Drain[C], conn: C, address: Optional[Address]) -> bool:
    """Put the new ``conn`` in the place of an old entry (closed now if idle, when it comes back if held).

    Nothing here switches: the counts never pass through a state that breaks the invariant.
    """
    old = _old(pool, work)
    if old is None:
        return False
    if old in pool._idle:
        pool._leave_idle(old)
        retire_now(pool, old)
    else:
        _retire_later(pool, old)
    pool._connecting += 1  # _add() counts a connection that was opening
    pool._add(conn, address)
    return True


def _unneeded(pool: LifecyclePool[C], conn: C, in_background: bool = False) -> None:
    """Close a connection that a drain opened and found no use for: counted as opened and retired."""
    pool._opened += 1
    pool._retired += 1
    pool._close_quietly(conn, in_background)  # switches


def _to_replace(pool: LifecyclePool[C], work: Drain[C]) -> int:
    return len([e for e in work.old if e in pool._entries and at_home(e, pool)])


def drain_loop(pool_ref: Any, work: Drain[Any], generation: int) -> None:
    """One of the drain's workers: open a replacement, swap it in, until no old connection is left.

    Together they have at most ``in_flight_limit(size)`` replacements in
    flight or old connections retiring, so that the pool never has more than
    ``size + in_flight_limit(size)`` connections open.  A failed connect is
    retried with the pool's reconnect backoff; only the pool's own stop, or a
    new drain(), ends a worker sooner.
    """
    attempt = 0
    while True:
        pool = pool_ref()
        if pool is None or pool._closed or pool._generation != generation or pool._drain is not work:
            return
        if _to_replace(pool, work) <= work.in_flight:
            return  # the other workers are opening the last replacements
        if work.in_flight + len(pool._retiring) >= in_flight_limit(pool._size):
            del pool
            gevent.sleep(0.01)  # switches; old connections that are held are still to come back
            continue
        work.in_flight += 1
        try:
            conn, address = pool._open_one()  # switches
        except BaseException as error:
            work.in_flight -= 1
            if pool._stopping():
                raise
            attempt += 1
            logger.warning("pool %r: drain(): failed to open a replacement, retrying: %r", pool.name, error)
            wait = pool._reconnect_wait(attempt)
            del pool
            gevent.sleep(wait)  # switches
            continue
        work.in_flight -= 1
        attempt = 0
        if pool._generation != generation:
            return  # the process forked meanwhile: the connection is the parent's
        if pool._closed or not _swap(pool, work, conn, address):
            _unneeded(pool, conn, in_background=True)  # switches
            return
