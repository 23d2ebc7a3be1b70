"""Lending: each open connection with the context manager that lends it, and the callers waiting for one.

Private: the hot path of :meth:`ConnectionPool.get` lives here, in the
``__exit__`` methods, one per set of features, so that each pool pays only
for the bookkeeping its options need.  They repeat a few lines on purpose:
a shared helper would cost a function call on every checkout.  What they may
use of their pool is :class:`LendingPool`.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import deque
from types import FrameType, TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Deque,
    Generic,
    List,
    Optional,
    Protocol,
    Tuple,
    Type,
    TypeVar,
    Union,
)

from greenlet import greenlet as RawGreenlet

if TYPE_CHECKING:
    from geventconnpool._addresses import Address

from geventconnpool.errors import PoolError

C = TypeVar("C")

_now = time.monotonic

# Where an entry is in its loan (Entry.loan).  A lease enters once and exits
# once: each step checks the one before, so that a second exit, which would
# put the connection in the pool twice, raises instead.  The hot paths write
# these values literally, with the name in a comment: a global would cost a
# lookup, and ``is`` on these constants is the cheapest test Python has.
IN_POOL = False  # idle, connecting or being checked: no caller has it
LENT = True  # returned by get(), not entered yet
ENTERED = None  # inside its with block

# Whether the hub watches an entry's socket (Entry.watching; see _watching.py).
# The hot paths write them literally too.
NEVER = -1  # no socket to watch (watch_idle off, or none found)
UNWATCHED = 0  # lent, or taken out of the pool
TO_WATCH = 1  # idle: the hub starts watching it before it next polls
WATCHED = 2  # idle, and its watcher is active


def breaks(exc_type: Type[BaseException], exc_classes: Tuple[Type[BaseException], ...]) -> bool:
    """Whether an exception leaving a ``with pool.get()`` block means the connection is broken.

    A :exc:`BaseException` that is no :exc:`Exception` (a :class:`gevent.Timeout`,
    a kill, Ctrl-C) may have cut an exchange in half.  A :class:`PoolError` is
    about some pool, perhaps another one used inside the block, never about
    this connection, even though :class:`PoolTimeout` is an :exc:`OSError`.
    """
    if not issubclass(exc_type, Exception):
        return True
    return issubclass(exc_type, exc_classes) and not issubclass(exc_type, PoolError)


def _nothing() -> None:
    pass


def _forget(entry: Entry[Any]) -> None:
    pass


def exited_twice() -> RuntimeError:
    """The error of a lease exited when it was not inside its ``with`` block."""
    return RuntimeError(
        "the context manager returned by pool.get() gives its connection back once, at the end of its "
        "with statement: it was not entered, or it already exited"
    )


class LendingPool(Protocol[C]):
    """What an entry and its waiters use of their pool: the private contract of this module.

    :class:`~geventconnpool.ConnectionPool` keeps it, and so does the
    :class:`Orphanage` that takes a parent's entries in a forked child.
    """

    _exc_classes: Tuple[Type[BaseException], ...]
    _waiters: Deque[Waiter]  # first come, first served
    _idle: Deque[Entry[C]]  # most recently returned on the right
    _closed: bool
    _run_callback: Callable[..., Any]  # the hub loop's run_callback
    _handed: Deque[Waiter]  # waiters handed a result, to wake, oldest first
    _wakeup_scheduled: bool  # whether _wake_handed is due to run in the hub
    _wake_handed: Callable[[], None]

    def _release(self, entry: Entry[C]) -> None:
        """Take back a held entry: lend it to the first waiter, keep it idle, or close it."""

    def _discard(self, entry: Entry[C], error: Optional[BaseException]) -> None:
        """Take back a held entry that broke: close it and open a replacement."""

    def _reset_and_release(self, entry: Entry[C]) -> None:
        """Take back a held entry whose session state ``_reset`` must undo first (it switches)."""

    _to_watch: List[Entry[C]]  # idle entries the hub starts watching at its next turn
    _start_watchers: Callable[[], None]


class Entry(Generic[C]):
    """One open connection and what the pool knows of it.

    It is also the context manager that :meth:`ConnectionPool.get` returns
    (so a checkout allocates nothing): ``__enter__`` gives the connection,
    ``__exit__`` gives it back.  This class is the fast path, for pools that
    need no bookkeeping when a connection comes back.
    """

    __slots__ = (
        "__weakref__",
        "address",
        "checked_at",
        "conn",
        "expires_at",
        "fd",
        "idle_since",
        "lent_at",
        "lent_from",
        "lent_lasti",
        "loan",
        "opened_at",
        "pool",
        "raw",
        "ref",
        "sock",
        "stale",
        "watcher",
        "watching",
    )

    def __init__(self, conn: C, pool: LendingPool[C], expires_at: float) -> None:
        self.conn = conn
        self.pool = pool
        self.address: Optional[Address] = None  # where it is connected, in a pool made with address=
        self.expires_at = expires_at
        self.opened_at = self.idle_since = _now()
        self.checked_at = -math.inf  # when a check last found it working (keepalive, check_after)
        self.lent_at = 0.0
        self.lent_from: Optional[FrameType] = None
        self.lent_lasti = 0  # the offset of the get() call in lent_from's code
        self.stale = False  # idle past check_after: get() checks it before lending it
        self.loan: Optional[bool] = IN_POOL
        # watch_idle (see _watching.py): the hub's watcher on the socket, active
        # while the entry is idle; the socket and descriptor it was made for,
        # and what tells whether the socket still has that descriptor; the
        # entry's weak reference, for the watcher's callback.  No watcher for
        # a connection without a socket.
        self.watcher: Any = None
        self.watching = NEVER
        self.sock: Any = None
        self.fd = -1
        self.raw: Any = None
        self.ref: Optional[weakref.ref[Entry[C]]] = None

    def __enter__(self) -> C:
        if self.loan is not True:  # LENT
            raise RuntimeError(
                "the context manager returned by pool.get() serves one with statement only, entered once: "
                "call pool.get() again"
            )
        self.loan = None  # ENTERED
        return self.conn

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self.loan is not None:  # ENTERED
            raise exited_twice()
        self.loan = False  # IN_POOL
        pool = self.pool
        if exc_type is not None and breaks(exc_type, pool._exc_classes):
            pool._discard(self, exc)
        elif pool._waiters:  # only an open pool has waiters; this entry never expires
            waiter = pool._waiters.popleft()  # ConnectionPool._hand_over(), inlined: a call less
            self.loan = True  # LENT to the waiter already: the hub must not start watching it
            waiter.result = self
            if not pool._wakeup_scheduled:
                pool._wakeup_scheduled = True
                pool._run_callback(pool._wake_handed)
            pool._handed.append(waiter)
        else:  # a closed pool's _idle is a ClosingIdle, that closes it: no test of it here
            pool._idle.append(self)
            if self.watching == 0:  # UNWATCHED: for watch_idle, the hub watches it from its next turn
                self.watching = 1  # TO_WATCH: ConnectionPool._watch_soon(), inlined
                if not pool._to_watch:
                    pool._run_callback(pool._start_watchers)
                pool._to_watch.append(self)


class TracedEntry(Entry[C]):
    """The entry of a pool with ``leak_warning`` only: it forgets who took it when it comes back."""

    __slots__ = ()

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self.loan is not None:  # ENTERED
            raise exited_twice()
        self.loan = False  # IN_POOL
        self.lent_from = None  # do not keep the borrower's frame, and its locals, alive
        pool = self.pool
        if exc_type is not None and breaks(exc_type, pool._exc_classes):
            pool._discard(self, exc)
        elif pool._waiters:
            pool._release(self)
        else:
            pool._idle.append(self)
            if self.watching == 0:  # UNWATCHED
                self.watching = 1  # TO_WATCH
                if not pool._to_watch:
                    pool._run_callback(pool._start_watchers)
                pool._to_watch.append(self)


class TimedEntry(Entry[C]):
    """The entry of a pool with ``keepalive``, ``max_lifetime``, ``check_after`` or
    ``leak_warning``: it notes when it comes back, and expires."""

    __slots__ = ()

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self.loan is not None:  # ENTERED
            raise exited_twice()
        self.loan = False  # IN_POOL
        pool = self.pool
        self.lent_from = None
        if exc_type is not None and breaks(exc_type, pool._exc_classes):
            pool._discard(self, exc)
            return
        now = _now()
        if pool._waiters or now >= self.expires_at:
            pool._release(self)
        else:
            self.idle_since = now
            pool._idle.append(self)
            if self.watching == 0:  # UNWATCHED
                self.watching = 1  # TO_WATCH
                if not pool._to_watch:
                    pool._run_callback(pool._start_watchers)
                pool._to_watch.append(self)


class ResettingEntry(Entry[C]):
    """The entry of a pool whose class overrides ``_reset``: every connection the pool keeps is reset first.

    Any set of options: the pool's ``_release`` does what the other exits
    inline (timed, traced).  The reset does I/O, so it runs before the entry
    goes anywhere another caller could take it: neither idle nor handed to a
    waiter, it counts as in use meanwhile.
    """

    __slots__ = ()

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self.loan is not None:  # ENTERED
            raise exited_twice()
        self.loan = False  # IN_POOL
        self.lent_from = None
        pool = self.pool
        if exc_type is not None and breaks(exc_type, pool._exc_classes):
            pool._discard(self, exc)
        else:
            pool._reset_and_release(self)  # switches


class ClosingIdle(Deque[Entry[Any]]):
    """What ``_idle`` becomes when its pool closes, and the orphanage's ``_idle``.

    The entries' exits give a connection back by appending it to ``_idle``
    without asking whether the pool is still open: once it is not, this
    "deque" stays empty (so ``get()`` takes its slow path, which raises) and
    hands each connection that comes back to ``release`` instead.  A test of
    ``_closed`` in every exit would cost each checkout; this costs nothing.
    (Swapping the entry's class would not do: a ``with`` statement has looked
    up ``__exit__`` before its block runs.)
    """

    def __init__(self, release: Callable[[Entry[Any]], None]) -> None:
        super().__init__()
        self.release = release

    def append(self, entry: Entry[Any]) -> None:
        """Give back ``entry``: release it, and never watch it again."""
        self.release(entry)
        entry.watching = NEVER


class Waiter:
    """A caller blocked in :meth:`ConnectionPool.get`, in the pool's first-come, first-served queue.

    The pool hands it a connection or an error in ``result``, then wakes it:
    :func:`wake` switches to ``greenlet``, the blocked caller, and forgets it,
    so that a second wake-up (the pool's timeout timer firing just as the
    connection arrives) does nothing.  It has no timer of its own:
    ``deadline`` (``time.monotonic()``, or None) is watched by one timer for
    the whole pool.  A plain object, not a gevent Waiter: a caller about to
    block may switch straight to a waiter it is waking (see
    ``ConnectionPool._acquire``), which gevent's Waiter forbids.
    """

    __slots__ = ("deadline", "greenlet", "result")

    def __init__(self, deadline: Optional[float]) -> None:
        self.deadline = deadline
        self.greenlet: Optional[RawGreenlet] = None  # set while the caller is blocked
        self.result: Union[Entry[Any], BaseException, None] = None


def wake(waiter: Waiter) -> None:
    """Resume a blocked waiter, once; it finds what it was handed in ``result``."""
    greenlet = waiter.greenlet
    if greenlet is not None:
        waiter.greenlet = None
        greenlet.switch()  # switches


class StandIn:
    """What stands in for a held entry's pool when the entry must not go back to its idle ones as it is.

    A :class:`LendingPool` whose exits all lead to its ``_release``: every
    error counts as one that breaks the connection, nobody ever waits, and
    nothing is watched.  Its subclasses say what happens to an entry that
    comes back (``_release``, ``_discard``, ``_reset_and_release``, and
    ``_idle``, a :class:`ClosingIdle`).
    """

    _exc_classes: Tuple[Type[BaseException], ...] = (BaseException,)  # every error: the same way back
    _waiters: Deque[Waiter] = deque()  # always empty: the exits never hand the entry to a waiter
    _closed = True
    _run_callback: Callable[..., Any] = print  # never called: nobody waits here
    _handed: Deque[Waiter] = deque()
    _wakeup_scheduled = True
    _wake_handed: Callable[[], None] = print
    _to_watch: List[Entry[Any]] = []  # never has any: nothing here is watched
    _start_watchers: Callable[[], None] = staticmethod(_nothing)


class Orphanage(StandIn):
    """Where the entries of a parent process go in a child after fork().

    A connection the parent opened may still be held by a greenlet that the
    child inherited; when it comes back it lands here, and is neither reused
    nor closed (closing could send a goodbye on the parent's connection).
    """

    _idle: Deque[Entry[Any]] = ClosingIdle(_forget)  # never has any: an orphan is never lent again

    def _release(self, entry: Entry[Any]) -> None:
        pass

    def _discard(self, entry: Entry[Any], error: Optional[BaseException]) -> None:
        pass

    def _reset_and_release(self, entry: Entry[Any]) -> None:
        pass


ORPHANAGE: LendingPool[Any] = Orphanage()
