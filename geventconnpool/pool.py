"""The :class:`ConnectionPool`: a fixed (or elastic) number of open connections, lent to greenlets.

Theory of operation
-------------------
State.  Each open connection is an :class:`~geventconnpool._lease.Entry`, in
``_entries``.  An entry is *idle* when it is in ``_idle`` too (a deque: given
back on the right, lent from the right, so the most recently used connection
is lent first; the least used ones stay idle at the left, where keepalive
pings and lifetimes find them, and a burst's extra connections are not kept
warm for nothing).  Otherwise it is *in use*: held by a caller, or by a
keepalive check (also in ``_checking``).  ``_connecting`` counts the slots
opening a connection (each runs a connect greenlet; see ``_connecting.py``).
Callers that found nothing idle wait in ``_waiters``, first come, first
served; callers of :meth:`wait` wait in ``_ready_waiters``, woken by
``_add`` (``_readiness.py``).  The invariant, while the pool is open: every
slot is exactly one of idle, in use or connecting, and there are between
``min_size`` and ``size`` of them, so ``min_size <= len(_entries) +
_connecting - _to_retire <= size`` (both ``size`` for a fixed pool, the
default: ``_min_size`` is None).  Only ``_open_slot`` (+1 connecting: at
start ``min_size`` of them, then for a caller queued in ``_acquire`` while
an elastic pool is below ``size``, see ``_lifecycle.grow``), ``_add``
(connecting -> idle or lent; or, while ``_to_retire``, connecting ->
closed, both -1), ``_close_and_replace`` (in use -> connecting; or, when an
elastic pool can do without it, ``_lifecycle.replaces``, in use -> closed),
the maintenance greenlet (``max_idle``: idle -> closed, one per
``max_idle / 4`` while above ``min_size``), :meth:`close` (everything ->
nothing), the fork hooks (everything -> ``min_size`` connecting),
:meth:`resize` (``_lifecycle.py``: +n connecting up to ``min_size``; or
idle -> closed, connecting -> ``_to_retire``, in use -> ``_retiring``, down
to the new size) and :meth:`drain`'s swap (a new connection in, an old one
idle -> closed or in use -> ``_retiring``, without a switch between), like
rebalancing's ``_take_over`` (``_addresses.py``), change those counts;
lending and giving back only move an entry in or out of ``_idle``.
``_retiring`` holds the entries a shrink or a drain took out of
``_entries`` while a caller held them: closed, not replaced, when they come
back.  Open connections number at most ``size + len(_retiring)`` plus what
``_to_retire`` and a drain's replacements in flight are opening; a drain
keeps its part of that (``_retiring`` and its replacements in flight) at
``max(1, size // 4)`` at most.  An entry is handed to a
waiter directly, never through ``_idle``: a non-empty ``_idle`` means that
nobody waits, which is what lets ``get()`` take the fast path.

Entries.  The entry is also the context manager that ``get()`` returns, so
a checkout allocates nothing.  Its ``__exit__`` is the return half of the
hot path; there is one entry class per set of options (plain,
``leak_warning`` only, timed, and resetting for a class that overrides
``_reset``), so that each pool pays only for the bookkeeping its options
need.  When a held entry must not go back to ``_idle`` as it is
(``discard()``, a shrink), its ``pool`` is swapped for a ``Diverted`` one
that every path of those exits reaches instead (see ``_lifecycle.py``): the
exits stay as they are, and cost nothing more.  Explicit leases
(``acquire()``) are entries entered on the caller's behalf, in ``_leases``
until ``release()`` exits them.

Addresses.  A pool made with ``address=`` has an
:class:`~geventconnpool._addresses.AddressBook` in ``_addresses`` (else
None): the resolved addresses, the connects in flight to each, and each
address's backoff.  Each of its entries remembers its ``address``, so the open
connections per address are counted from ``_entries`` when a connect picks an
address, and no path that drops an entry updates the book.

Background greenlets, all named ``geventconnpool <name> <what>``, tracked in
``_greenlets``, killed by :meth:`close`, and holding the pool only by weak
reference: a *connect* greenlet per slot being opened (``_connecting.py``);
one *maintenance* greenlet when a timed option (``max_idle`` too) is set, with the *keepalive*
checks and the *recycle* closes it starts (``_maintenance.py``); up to
``max(1, size // 4)`` *drain* greenlets during a :meth:`drain`
(``_lifecycle.py``); for a pool made with ``address=``, one *addresses*
greenlet that keeps the resolution fresh and the spread even, with the
*rebalance* moves it starts (``_addresses.py``).

Observers.  The metrics exporters (``otel.py``, ``prometheus.py``) read
``stats()`` and ``connections_by_address()`` when collected; in ``_observers`` they hear only durations, and
only on slow paths: a connect (``_connecting.py``) and a wait in
``_acquire``.  One that wants how long connections are held makes the pool
lend *measured* entries instead (``_observing.py``); :meth:`close` tells
them all and forgets them.

Threads.  A pool belongs to the gevent hub of the thread that made it; that
thread holds ``_owner`` (a real lock) for the pool's life, and every entry
point asks ``_owner._is_owned()``, which other threads fail.

Fork.  In a child, the at-fork hook moves every entry to the orphanage
(never reused nor closed there: the parent still uses those connections),
empties the pool and kills the greenlets it inherited; the child's first
call on the slow path restarts it.  The fast path needs no fork check: the
hook leaves ``_idle`` empty, so the child's first ``get()`` takes the slow path.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import random
import sys
import time
import weakref
from collections import deque
from types import FrameType
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ContextManager,
    Deque,
    Dict,
    Generic,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
    Type,
    TypeVar,
    Union,
)

import gevent
from gevent.event import Event
from gevent.monkey import get_original
from greenlet import GreenletExit, getcurrent

from geventconnpool import _arguments, _lifecycle
from geventconnpool._addresses import (
    Address,
    AddressBook,
    ConnectingToAddresses,
    RebalancedPool,
    address_failed,
    check_hooks,
    log_recovery,
    rebalance_loop,
    resolve,
    targets,
)
from geventconnpool._arguments import ExcClasses
from geventconnpool._backoff import backoff_delay
from geventconnpool._connecting import ConnectingPool, Slot, connect_loop, retry_after
from geventconnpool._lease import (
    IN_POOL,
    LENT,
    NEVER,
    ORPHANAGE,
    TO_WATCH,
    UNWATCHED,
    WATCHED,
    ClosingIdle,
    Entry,
    LendingPool,
    ResettingEntry,
    TimedEntry,
    TracedEntry,
    Waiter,
    wake,
)
from geventconnpool._lifecycle import LifecyclePool, retire_new
from geventconnpool._maintenance import SHORTEST_LIFETIME, MaintainedPool, close_recycled, maintenance_loop
from geventconnpool._observing import ObservedPool, Observer, tell
from geventconnpool._outage import OutageLog
from geventconnpool._readiness import ReadinessPool, ReadyWaiter, opened, wait_open, wake_all
from geventconnpool._stats import PoolStats
from geventconnpool._watching import (
    WatchingPool,
    default_socket_of,
    look,
    start_watchers,
    stop_all,
    unwatch,
    watch,
)
from geventconnpool.errors import PoolClosed, PoolOverloaded, PoolTimeout, PoolUnavailable

__all__ = ["ConnectionPool", "PoolStats"]

logger = logging.getLogger("geventconnpool")

C = TypeVar("C")

# The real thread's lock, even under gevent.monkey.patch_all() (which makes
# threading.RLock a greenlet lock).  A pool's thread holds one for the pool's
# life: its C method _is_owned() (which threading.Condition relies on too)
# then tells that thread from the others without building a thread id object,
# at a third of the cost of comparing _thread.get_ident() on every checkout.
_ThreadLock: Callable[[], Any] = get_original("_thread", "RLock")
_now = time.monotonic
_getframe = sys._getframe
_OPEN_ONE_TRIES = 8  # addresses _open_one() tries before it gives up, when each fails
_pools: weakref.WeakSet[ConnectionPool[Any]] = weakref.WeakSet()
# What interrupts a caller rather than reports a failure: the caller's own
# gevent.Timeout, a kill, Ctrl-C, sys.exit().
_STOP_NOW = (gevent.Timeout, GreenletExit, KeyboardInterrupt, SystemExit)


class ConnectionPool(Generic[C]):
    """A pool that keeps ``size`` connections open (elastic: ``min_size`` to ``size``), lent to greenlets.

    Subclass it and override :meth:`_new_connection`; the pool starts opening
    all ``size`` connections in the background as soon as it is made, and
    replaces each one that breaks.  Borrow a connection with
    ``with pool.get() as c:``.

    :param size: how many connections to keep open, an int >= 1.
    :param exc_classes: an exception class, or a tuple of them, meaning "this
        connection is broken": raised inside ``with pool.get()`` or by
        :meth:`_keepalive`, it makes the pool close the connection and open
        another.  Any other :exc:`Exception` leaves the connection in the pool.
    :param keepalive: seconds; when set, every connection idle that long is
        checked with :meth:`_keepalive`, which must then be overridden.
    :param timeout: seconds :meth:`get` waits for a free connection before it
        raises :class:`~geventconnpool.PoolTimeout`; ``None`` waits for ever.
    :param connect_timeout: seconds allowed to each call of
        :meth:`_new_connection`, :meth:`_keepalive` and :meth:`_close_connection`;
        ``None`` for no limit.
    :param max_lifetime: seconds; a connection older than a lifetime drawn
        between 90% and 100% of it is closed and replaced when idle or when it
        comes back.  ``None`` keeps connections for ever.
    :param check_after: seconds; a connection idle at least that long is
        checked with :meth:`_keepalive` inside :meth:`get` before it is lent.
    :param leak_warning: seconds; a connection held longer than that logs one
        warning with the stack of the :meth:`get` call that took it (up to a
        quarter of that later: :meth:`get` reads no clock, the maintenance
        greenlet looks at the held connections four times per period).
    :param fail_fast: when true, :meth:`get` raises
        :class:`~geventconnpool.PoolUnavailable` at once while no connection is
        open and the last attempt to open one failed.
    :param name: the name shown in logs, errors and ``repr``; by default the
        class name and a number.
    :param watch_idle: while a connection is idle, the event loop watches its
        socket (see :meth:`_socket_of`), and the pool drops it as soon as the
        remote end closes it, before anyone can borrow it.
    :param max_waiting: when that many callers already wait in :meth:`get`,
        the next one raises :class:`~geventconnpool.PoolOverloaded` at once
        instead of waiting; ``None`` lets any number wait.
    :param min_size: makes the pool *elastic*: it opens and keeps only that
        many connections (an int from 1 to ``size``), and opens one more, up
        to ``size``, for each caller that has to wait; a connection that
        breaks or expires is replaced only while fewer than ``min_size`` are
        open or opening, or callers wait.  ``None`` means ``size``: a fixed pool.
    :param max_idle: seconds; with ``min_size`` below ``size``, a connection
        no caller used for that long (keepalive pings do not count) is closed
        while more than ``min_size`` are open, one at most every ``max_idle / 4``
        seconds, so that a burst's connections are not all dropped at once.
        ``None`` keeps them open.  Without such a ``min_size`` it could close
        nothing, so it raises :exc:`ValueError`.
    :param address: the remote end as a ``(host, port)`` pair, or a list of
        them: the pool resolves each host (:meth:`_resolve`), spreads its
        connections over every address found, routes around an address that
        fails, and opens each connection with :meth:`_connect`, which must then
        be overridden instead of :meth:`_new_connection`.
    :param resolve_every: seconds; with ``address``, the pool resolves again
        when it opens a connection and its last answer is older than that.
    :param rebalance_every: seconds; with ``address``, the pool moves at most
        one idle connection per period from the address with the most
        connections to the one with the fewest, when they differ by more than one.
    :raises TypeError: an argument has the wrong type, or a hook the options
        need is not overridden.
    :raises ValueError: a number is out of range.

    ``timeout``, ``connect_timeout`` and ``fail_fast`` may be changed on a
    running pool, and take effect at once; the other options are read-only.

    .. versionchanged:: 1.0
       Added the keyword-only arguments; connections open in parallel at once.
    .. versionchanged:: 1.1
       Added ``watch_idle``, on by default, ``max_waiting``, ``min_size`` and ``max_idle``,
       and ``address`` with ``resolve_every`` and ``rebalance_every``.
    """

    #: Seconds before the first new attempt after a failed connect; each
    #: failure of the same slot multiplies it by :attr:`RECONNECT_FACTOR`, up
    #: to :attr:`RECONNECT_MAX_DELAY`.
    RECONNECT_DELAY = 0.1
    #: The longest wait between two attempts to open a connection, in seconds.
    RECONNECT_MAX_DELAY = 10.0
    #: How much longer each wait is than the one before.
    RECONNECT_FACTOR = 2.0
    #: Each wait is shortened by a random fraction of itself, up to this one,
    #: so that slots that failed together do not try again together.
    RECONNECT_JITTER = 0.5

    _counter = 0

    # The attributes that get() and the entries read on every checkout live in
    # slots: past 30 instance attributes (a subclass adds its own), CPython
    # stops sharing the keys of instance dicts and attribute loads slow down.
    __slots__ = (
        "__dict__",
        "__weakref__",
        "_check_after",
        "_checkouts",
        "_closed",
        "_exc_classes",
        "_idle",
        "_leak_warning",
        "_max_waiting",
        "_owner",
        "_plain_checkout",
        "_waiters",
    )

    def __init__(
        self,
        size: int,
        exc_classes: ExcClasses = (OSError,),
        keepalive: Optional[float] = None,
        *,
        timeout: Optional[float] = 30.0,
        connect_timeout: Optional[float] = 10.0,
        max_lifetime: Optional[float] = None,
        check_after: Optional[float] = None,
        leak_warning: Optional[float] = None,
        fail_fast: bool = False,
        name: Optional[str] = None,
        watch_idle: bool = True,
        max_waiting: Optional[int] = None,
        min_size: Optional[int] = None,
        max_idle: Optional[float] = None,
        address: Union[Tuple[str, int], Sequence[Tuple[str, int]], None] = None,
        resolve_every: float = 30.0,
        rebalance_every: float = 10.0,
    ) -> None:
        self._size = _arguments.whole_number(size, "size", minimum=1)
        self._min_size, self._max_idle = _lifecycle.elastic_options(self._size, min_size, max_idle)
        self._exc_classes = _arguments.exception_classes(exc_classes, "exc_classes")
        self._check_failures: Tuple[Type[BaseException], ...] = (*self._exc_classes, TimeoutError)
        self._keepalive_every = _arguments.seconds(keepalive, "keepalive")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._max_lifetime = _arguments.seconds(max_lifetime, "max_lifetime")
        self._check_after = _arguments.seconds(check_after, "check_after")
        self._leak_warning = _arguments.seconds(leak_warning, "leak_warning")
        self.fail_fast = fail_fast
        self._watch_idle = _arguments.flag(watch_idle, "watch_idle")
        self._max_waiting = _arguments.count(max_waiting, "max_waiting")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, not {name!r}")
        cls = type(self)
        self._resolve_every = _arguments.required_seconds(resolve_every, "resolve_every")
        self._rebalance_every = _arguments.required_seconds(rebalance_every, "rebalance_every")
        self._addresses = (
            None if address is None else AddressBook(targets(address, "address"), self._resolve_every)
        )
        check_hooks(cls, ConnectionPool, address is not None)
        needs_check = [arg for arg in ("keepalive", "check_after") if getattr(self, arg) is not None]
        if needs_check and cls._keepalive is ConnectionPool._keepalive:
            raise TypeError(f"{cls.__name__} must override _keepalive() to use {needs_check[0]}=")
        ConnectionPool._counter += 1
        self._name = name if name is not None else f"{cls.__name__}-{ConnectionPool._counter}"

        # The state (see the theory of operation at the top of this module).
        self._idle: Deque[Entry[C]] = deque()
        self._entries: Set[Entry[C]] = set()
        self._connecting = 0
        self._waiters: Deque[Waiter] = deque()  # a deque, not a heap: first come, first served
        self._ready_waiters: List[ReadyWaiter] = []  # callers of wait(), woken by _add (_readiness.py)
        self._checking: Set[Entry[C]] = set()  # in use by a background keepalive check
        self._closing: Set[Entry[C]] = set()  # recycled, waiting for a background close
        # Lifecycle control (_lifecycle.py): what resize() and drain() close for good, the explicit leases.
        self._retiring: Set[Entry[C]] = set()  # held, out of _entries, closed when they come back
        self._shrunk_at = -math.inf  # when maintenance last closed a connection idle past max_idle
        self._to_retire = 0  # of the _connecting slots, those whose connection is closed as it opens
        self._leases: Dict[int, Entry[C]] = {}  # acquire()'s, by id() of the connection
        self._drain: Optional[_lifecycle.Drain[C]] = None  # the latest drain()
        self._closed = False
        self._greenlets: Set[gevent.Greenlet[Any, Any]] = set()
        # The metrics exporters, told of durations on slow paths only (_observing.py).
        self._observers: Tuple[Observer, ...] = ()
        # Connecting: the slots, and what they report of the remote end.
        self._slots: Set[Slot] = set()
        self._last_error: Optional[BaseException] = None
        self._outage = OutageLog()
        self._reconnected = Event()  # set, and replaced, when a streak of failures ends
        # The one timer that times out waiters, armed for the soonest deadline.
        self._timeout_timer: Any = None
        self._timeout_at = math.inf
        self._time_out_waiters = functools.partial(_time_out_waiters, weakref.ref(self))
        self._loop = gevent.get_hub().loop
        self._run_callback: Callable[..., Any] = self._loop.run_callback
        self._hub = gevent.get_hub()
        # Waiters handed a result, not woken yet: the hub wakes them in one
        # callback, unless a caller about to block switches to one first.
        self._handed: Deque[Waiter] = deque()
        self._wakeup_scheduled = False
        self._wake_handed: Callable[[], None] = functools.partial(_wake_handed, weakref.ref(self))
        # Watching idle connections (_watching.py): the closures of a burst, to
        # be logged as one line, and the streak of new connections dropped for
        # data nobody asked for (a greeting that _new_connection did not read).
        self._idle_closures: Dict[str, int] = {}
        self._closure_report: Any = None
        self._early_data_streak = 0
        self._early_data_at = -math.inf
        self._custom_idle_readable = type(self)._idle_readable is not ConnectionPool._idle_readable
        self._watchers: Set[Any] = set()  # every watcher of the pool's, stopped if it is collected
        self._to_watch: List[Entry[C]] = []  # idle entries the hub starts watching at its next turn
        self._start_watchers: Callable[[], None] = functools.partial(start_watchers, weakref.ref(self))
        weakref.finalize(self, stop_all, self._watchers)
        # Threads and fork.
        self._owner = _ThreadLock()
        self._owner.acquire()  # never released: it marks the pool's thread
        self._generation = 0  # bumped in a child process after fork()
        self._forked = False  # set by the at-fork hook in a child process
        self._orphaned_watchers: List[Any] = []  # in a child: the parent's watchers, kept, stopped
        self._reset_counters()
        # What the options cost: only check_after and leak_warning do anything
        # when a connection is lent; only keepalive, max_lifetime, check_after
        # and max_idle read the clock when one comes back.
        self._maintained = self._max_idle is not None or any(
            value is not None
            for value in (self.keepalive, self.max_lifetime, self.check_after, self.leak_warning)
        )
        self._plain_checkout = self.check_after is None and self.leak_warning is None
        self._timed = any(
            value is not None
            for value in (self.keepalive, self.max_lifetime, self.check_after, self._max_idle)
        )
        if cls._reset is not ConnectionPool._reset:
            self._entry_class: Type[Entry[C]] = ResettingEntry
        elif self._timed:
            self._entry_class = TimedEntry
        elif self._leak_warning is not None:
            self._entry_class = TracedEntry
        else:
            self._entry_class = Entry
        _pools.add(self)
        self._start()

    # -- the subclass API ----------------------------------------------------

    def _new_connection(self) -> C:
        """Open, initialise and return a new connection; override it.

        It runs in a background greenlet, under ``connect_timeout``.  Whatever
        it raises (any :exc:`BaseException`), and a ``None`` result, is a
        failed attempt: the pool tries again later, with exponential backoff.
        The result is a black box to the pool: a socket, an SSL socket, an
        IMAP client, a table...

        .. versionchanged:: 1.1
           A :exc:`BaseException` that is no :exc:`Exception` is a failed
           attempt too.
        """
        raise NotImplementedError

    def _connect(self, address: Address) -> C:
        """Open, initialise and return a new connection to ``address``; override it
        instead of :meth:`_new_connection` in a pool made with ``address``.

        ``address`` is an :class:`~geventconnpool.Address`: connect to
        ``address.ip`` and ``address.port``, and use ``address.host`` where the
        protocol names the server (TLS ``server_hostname``, an HTTP ``Host``).
        It runs like :meth:`_new_connection`; a failure puts that address, not
        the pool, in backoff, and the next attempt goes to another address.

        .. versionadded:: 1.1
        """
        raise NotImplementedError

    def _resolve(self, host: str, port: int) -> List[str]:
        """Return the IP addresses of ``host`` for a pool made with ``address``, as strings.

        The default asks gevent's resolver (``getaddrinfo``) for TCP, IPv4 and
        IPv6, and drops repeats.  The pool calls it at most every
        ``resolve_every`` seconds, under ``connect_timeout``; an exception, or
        no address, keeps the last good answer.

        .. versionadded:: 1.1
        """
        return resolve(host, port)

    def _keepalive(self, c: C) -> None:
        """Check that the idle connection ``c`` still works; override it to use
        ``keepalive`` or ``check_after``.

        Raise one of the pool's ``exc_classes`` when ``c`` is broken: the pool
        then discards it and opens another.  It runs under ``connect_timeout``.
        """
        raise NotImplementedError

    def _reset(self, c: C) -> None:
        """Undo the session state that a borrower may have left on ``c``; override it to use it.

        The pool calls it when a connection comes back from a ``with
        pool.get()`` block to stay in the pool (the block raised nothing, or an
        exception that does not break the connection), in the returning
        caller's greenlet, under ``connect_timeout``, before anyone else can
        have the connection: IMAP's ``UNSELECT``, SMTP's ``RSET``, Redis's
        ``RESET``, a line protocol's mode.  Whatever it raises discards the
        connection (one WARNING line) and opens a replacement; the caller's
        own timeout or kill then propagates.  Not overridden, it costs nothing.

        .. versionadded:: 1.1
        """

    def _close_connection(self, c: C) -> None:
        """Close the connection ``c``, which the pool is dropping.

        The default calls ``c.close()`` when ``c`` has one.  It runs under
        ``connect_timeout``; errors raised here, and the timeout, are logged at
        DEBUG and otherwise ignored.
        """
        close = getattr(c, "close", None)
        if close is not None:
            close()

    def _socket_of(self, c: C) -> Any:
        """Return the socket of connection ``c`` to watch while it is idle, or None not to watch it.

        With ``watch_idle``, the pool watches that socket while ``c`` is idle
        and drops ``c`` as soon as the remote end closes it.  The default
        returns ``c`` when it is socket-like (a socket or an SSL socket: it has
        ``fileno``, ``recv``, ``gettimeout`` and ``settimeout``), else ``c.sock``
        when that is (:class:`http.client.HTTPConnection`,
        :class:`imaplib.IMAP4`, ``smtplib``, ``poplib`` and ``ftplib``
        keep it there), else None.  Override it for a client that keeps its
        socket elsewhere (redis-py's ``Connection`` has ``_sock``).

        .. versionadded:: 1.1
        """
        return default_socket_of(c)

    def _idle_readable(self, c: C) -> bool:
        """Judge the idle connection ``c``, whose socket became readable; return true to keep it.

        The default reads one byte without blocking: the end of the stream, a
        reset, an error, or a byte of application data (a reply nobody will
        read, a goodbye) drop ``c``; a TLS record without application data (a
        TLS 1.3 session ticket, a key update) keeps it.  The pool runs the
        default in the event loop itself; an override, for a server that
        writes on idle connections on purpose (heartbeats, notifications),
        runs in a greenlet, under ``connect_timeout``, and may read what came:
        it must consume it, or it is called again at once.

        .. versionadded:: 1.1
        """
        sock = self._socket_of(c)
        return sock is not None and look(sock) is None

    # -- the public API -------------------------------------------------------

    def get(self, timeout: Optional[float] = None) -> ContextManager[C]:
        """Borrow a connection: ``with pool.get() as c:``.

        The connection is yours alone until the block ends.  If the block
        raises one of ``exc_classes`` (or a :exc:`BaseException` that is not an
        :exc:`Exception`, such as :class:`gevent.Timeout`), the connection is
        closed and replaced in the background; otherwise, and for a
        :class:`~geventconnpool.PoolError` from another pool, it goes back to
        the pool.  The exception propagates unchanged either way.

        The connection is taken when ``get()`` is called, so call it in the
        ``with`` statement itself; what it returns serves one ``with``
        statement, and entering it again raises :exc:`RuntimeError`.

        :param timeout: seconds to wait for a free connection; ``None`` uses the
            pool's ``timeout``, ``0`` takes only a connection that is idle now.
        :raises PoolTimeout: no connection became free in time.
        :raises PoolClosed: the pool is closed.
        :raises PoolUnavailable: ``fail_fast`` is on and the remote is down.
        :raises RuntimeError: called from a thread other than the pool's.

        .. versionchanged:: 1.0
           Added ``timeout``; waiters are served first come, first served.
        """
        if timeout is not None:
            _arguments.seconds(timeout, "timeout", zero=True)
        idle = self._idle
        entry = None
        # No clock is read here: the maintenance greenlet recycles idle
        # connections when their lifetime ends, and marks as stale those idle
        # past check_after.  What _acquire() does at its end is inlined, to save a call.
        if idle and self._owner._is_owned():  # an idle entry means nobody waits
            entry = idle.pop()
            entry.loan = True  # LENT
            if entry.watching == 2:  # WATCHED: for watch_idle, not while it is lent
                entry.watcher.stop()
                entry.watching = UNWATCHED
            if self._plain_checkout:
                self._checkouts += 1.0
                return entry
            if not entry.stale:
                self._checkouts += 1.0
                if self._leak_warning is not None:
                    entry.lent_at = 0.0  # no clock read: maintenance notes when it first sees the loan
                    entry.lent_from = caller = _getframe(1)
                    entry.lent_lasti = caller.f_lasti
                return entry
        # The general path: a stale entry to check, or none idle.  Only
        # leak_warning needs the caller's frame, which costs to get.
        return self._acquire(timeout, _getframe(1) if self._leak_warning is not None else None, entry)

    def wait(self, timeout: Optional[float] = None, *, min_open: Optional[int] = None) -> None:
        """Block until at least ``min_open`` connections are open (``min_size`` by default).

        It wakes when the connection that completes the count opens, not by
        polling.  A readiness check, or a worker's start-up, calls it with a
        ``timeout``.  A fixed pool's ``min_size`` is its ``size``: all its
        connections; an elastic pool opens only ``min_size`` until callers
        have to wait, so more would be reached only under load.

        :param timeout: seconds to wait at most; ``None`` waits for ever.
        :param min_open: how many open connections are enough, from 1 to ``size``;
            ``None`` means ``min_size``.
        :raises PoolTimeout: too few opened in time; the message names the last
            connect error, which is also its ``__cause__``.
        :raises PoolClosed: the pool is closed, or closes while it waits.

        .. versionadded:: 1.0
        .. versionchanged:: 1.1
           Added ``min_open``; woken by the connect itself instead of polling every 10 ms;
           waits for ``min_size`` by default.
        """
        wait_open(self, timeout, min_open)  # switches

    def acquire(self, timeout: Optional[float] = None) -> C:
        """Borrow a connection until :meth:`release`, for a loan that no ``with`` block can span.

        Waiting, fairness, timeouts, ``leak_warning`` and fork follow the
        rules of :meth:`get`; a connection never released is never lent
        again, so pair each call with :meth:`release` in a ``finally``.

        :param timeout: seconds to wait for a free connection, as for :meth:`get`.
        :returns: the connection.
        :raises PoolTimeout: no connection became free in time.
        :raises PoolClosed: the pool is closed.
        :raises PoolUnavailable: ``fail_fast`` is on and the remote is down.
        :raises RuntimeError: called from a thread other than the pool's.

        .. versionadded:: 1.1
        """
        if timeout is not None:
            _arguments.seconds(timeout, "timeout", zero=True)
        entry = self._acquire(timeout, _getframe(1) if self._leak_warning is not None else None)
        return _lifecycle.lend(self, entry)

    def release(self, c: C, discard: bool = False) -> None:
        """Give back a connection that :meth:`acquire` lent.

        :param c: the connection.
        :param discard: true when ``c`` is broken: it is closed and replaced,
            as after one of ``exc_classes`` in a ``with`` block.
        :raises RuntimeError: ``c`` was released already, or this pool's
            :meth:`acquire` did not lend it (one from :meth:`get` included);
            nothing changes.

        .. versionadded:: 1.1
        """
        self._check_thread_and_fork()
        _lifecycle.release(self, c, _arguments.flag(discard, "discard"))  # switches

    def discard(self, c: C) -> None:
        """Mark the connection ``c``, which the caller holds, as broken, without raising anything.

        The caller keeps using ``c`` until its ``with`` block ends (or until
        :meth:`release`); then the pool closes it and opens a replacement.  For
        a reply that said ``Connection: close``, or a protocol error the
        caller recovered from.  Calling it again, or on a closed pool (which
        closes every connection anyway), does nothing more.  It costs
        nothing on the checkout path: it looks ``c`` up among the ``size``
        connections.

        :raises ValueError: no caller holds ``c`` from this open pool (it is
            idle, was given back, or is another pool's); nothing changes.

        .. versionadded:: 1.1
        """
        _lifecycle.discard(self, c)

    def resize(self, size: int) -> None:
        """Change how many connections the pool keeps; :attr:`size` and ``stats().size`` change at once.

        Growing opens the new connections in the background.  Shrinking
        closes idle connections first, then cancels connections still being
        opened, and closes held ones, for good, when they come back (counted
        in ``stats().retiring`` meanwhile).

        An elastic pool (``min_size`` below ``size``) keeps its ``min_size``:
        growing opens nothing, it only lets the pool grow further under load,
        and shrinking closes only what the pool has above the new size.  A
        fixed pool's ``min_size`` follows its size.

        :param size: the new size, an int >= 1, and >= ``min_size`` for an elastic pool.
        :raises TypeError: ``size`` is not an int.
        :raises ValueError: ``size`` is below 1, or below an elastic pool's ``min_size``;
            nothing changes.
        :raises PoolClosed: the pool is closed.

        .. versionadded:: 1.1
        """
        size = _arguments.whole_number(size, "size", minimum=1)
        self._check_thread_and_fork()
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        _lifecycle.resize(self, size)

    def drain(self, wait: bool = False) -> None:
        """Replace every connection open now, while the pool keeps serving (rotated credentials, a failover).

        It first opens one connection with :meth:`_new_connection` (the
        canary), in the caller's greenlet.  If that fails, ``drain()`` raises
        its error, within ``connect_timeout``, and changes nothing.  Then the
        canary takes the place of an old idle connection, and background
        greenlets replace the others make-before-break: an old connection is
        closed only once its replacement is open, at most ``max(1, size //
        4)`` replacements are opened at once, and the pool never holds more
        than ``size + max(1, size // 4)`` open connections.  An old
        connection that a caller holds is closed when it comes back.  Calling
        it again during a drain starts over from the connections open then.

        :param wait: return only once no old connection is left open; by
            default it returns once the canary is in service.
        :raises PoolClosed: the pool is closed.
        :raises Exception: what the canary's :meth:`_new_connection` raised
            (:exc:`TimeoutError` past ``connect_timeout``).

        .. versionadded:: 1.1
        """
        _arguments.flag(wait, "wait")
        self._check_thread_and_fork()
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        _lifecycle.drain(self)  # switches
        while wait and _lifecycle.draining(self) and not self._closed:
            gevent.sleep(0.01)  # switches

    def close(self, timeout: Optional[float] = None) -> None:
        """Close the pool.

        It stops the pool's background greenlets, closes the idle connections,
        wakes every waiter with :class:`~geventconnpool.PoolClosed`, and closes
        each connection still held when it comes back.  With ``timeout``, it
        then waits up to that long for the held ones to come back, closes
        those that did not under their holders, and returns once every
        connection is closed (a worker's graceful shutdown).  Calling it again
        closes nothing more, but waits the same way when given ``timeout``.

        :param timeout: seconds to wait for held connections; ``None`` does
            not wait for them, ``0`` closes them at once.

        .. versionadded:: 1.0
        .. versionchanged:: 1.1
           Added ``timeout``.
        """
        limit = _arguments.seconds(timeout, "timeout", zero=True)
        if not self._closed:
            self._close_now()  # switches
        if limit is not None:
            _lifecycle.close_held(self, limit)  # switches

    def _close_now(self) -> None:
        """The first :meth:`close`: decide everything, then close what is idle."""
        self._closed = True
        wake_all(self._ready_waiters)
        closed_error = PoolClosed(f"pool {self.name!r} is closed")
        while self._waiters:
            self._hand_over(closed_error)
        if self._timeout_timer is not None:
            self._timeout_timer.close()
            self._timeout_timer, self._timeout_at = None, math.inf
        idle = list(self._idle)
        self._idle = ClosingIdle(self._release)  # the held ones: closed when they come back
        for entry in idle:
            self._entries.discard(entry)
        self._slots.clear()
        observers, self._observers = self._observers, ()
        for observer in observers:
            observer.closed()
        background = [g for g in self._greenlets if g is not gevent.getcurrent()]
        # Everything is decided; what follows switches greenlets, and may be
        # interrupted (gunicorn's second signal lands here): close regardless.
        try:
            # Each background greenlet stops at its next switch; one stuck in
            # a hook that swallows the kill still ends with connect_timeout.
            # (killall's own timeout would raise gevent.Timeout; joinall's returns.)
            gevent.killall(background, block=False)
            gevent.joinall(background, timeout=self._kill_timeout())  # switches
            stuck = [g for g in background if not g.dead]
            if stuck:
                logger.warning(
                    "pool %r: closed, but %d background greenlets did not stop", self.name, len(stuck)
                )
        finally:
            self._connecting = self._to_retire = 0
            # A keepalive check or a background close killed before it started
            # never gave its connection back, nor closed it.
            unfinished = list(self._checking) + list(self._closing)
            self._checking.clear()
            self._closing.clear()
            for entry in unfinished:
                self._entries.discard(entry)
            if self._closure_report is not None:
                self._closure_report.close()
                self._closure_report = None
            self._to_watch.clear()
            for entry in idle + unfinished:
                unwatch(entry, self._watchers)
                self._close_quietly(entry.conn)  # switches

    def connections_by_address(self) -> Dict[Address, int]:
        """Return the number of open connections to each address, for a pool made with ``address``.

        Every address of the last resolution is there, with 0 when nothing is
        open to it; so is an address that left it while connections to it are
        still open.  A pool without ``address`` returns an empty dict.

        .. versionadded:: 1.1
        """
        if self._addresses is None:
            return {}
        # A copy first (one C call, atomic under the GIL): a metrics exporter may call this from a
        # thread of its own (a periodic reader, an HTTP server), while the pool's thread changes the set.
        return self._addresses.by_address(e.address for e in list(self._entries))

    def stats(self) -> PoolStats:
        """Return a :class:`PoolStats` snapshot of the gauges and counters.

        .. versionadded:: 1.0
        """
        return PoolStats(
            size=self._size,
            idle=len(self._idle),
            in_use=len(self._entries) - len(self._idle),
            connecting=self._connecting - self._to_retire + (self._drain.in_flight if self._drain else 0),
            waiting=len(self._waiters),
            checkouts=int(self._checkouts),
            opened=self._opened,
            failed_connects=self._failed_connects,
            discarded=self._discarded,
            recycled=self._recycled,
            keepalive_failures=self._keepalive_failures,
            closed_while_idle=self._closed_while_idle,
            timeouts=self._timeouts,
            overloaded=self._overloaded,
            retiring=len(self._retiring) + self._to_retire,
            retired=self._retired,
            min_size=self.min_size,
        )

    # -- options: read-only, or live ------------------------------------------

    @property
    def size(self) -> int:
        """How many connections the pool keeps open; read-only."""
        return self._size

    @property
    def name(self) -> str:
        """The pool's name in logs, errors and ``repr``; read-only."""
        return self._name

    @property
    def exc_classes(self) -> Tuple[Type[BaseException], ...]:
        """The exception classes that mark a connection as broken, as a tuple; read-only."""
        return self._exc_classes

    @property
    def keepalive(self) -> Optional[float]:
        """Seconds of idleness after which a connection is pinged, or None; read-only."""
        return self._keepalive_every

    @property
    def max_lifetime(self) -> Optional[float]:
        """The longest lifetime of a connection in seconds, or None; read-only."""
        return self._max_lifetime

    @property
    def check_after(self) -> Optional[float]:
        """Seconds of idleness after which get() checks a connection before lending it, or None; read-only."""
        return self._check_after

    @property
    def leak_warning(self) -> Optional[float]:
        """Seconds a connection may be held before a leak warning, or None; read-only."""
        return self._leak_warning

    @property
    def watch_idle(self) -> bool:
        """Whether the event loop watches idle connections for the remote end closing them; read-only.

        .. versionadded:: 1.1
        """
        return self._watch_idle

    @property
    def max_waiting(self) -> Optional[int]:
        """How many callers may wait in :meth:`get` before the next one is refused, or None; read-only.

        .. versionadded:: 1.1
        """
        return self._max_waiting

    @property
    def min_size(self) -> int:
        """How many connections the pool keeps open at least (``size`` unless the pool is elastic); read-only.

        .. versionadded:: 1.1
        """
        return self._size if self._min_size is None else self._min_size

    @property
    def max_idle(self) -> Optional[float]:
        """Seconds after which an idle connection above ``min_size`` is closed, or None; read-only.

        .. versionadded:: 1.1
        """
        return self._max_idle

    @property
    def last_connect_error(self) -> Optional[BaseException]:
        """The error of the latest failed attempt to open a connection, while none succeeded since, else None.

        What a readiness endpoint reports while the pool cannot connect.

        .. versionadded:: 1.1
        """
        return self._last_error

    def resolve_every(self) -> float:
        """Seconds before the pool resolves its ``address`` again, when it needs an address; read-only.

        .. versionadded:: 1.1
        """
        return self._resolve_every

    @property
    def rebalance_every(self) -> float:
        """Seconds between two moves of a connection to even out the addresses, at least; read-only.

        .. versionadded:: 1.1
        """
        return self._rebalance_every

    @property
    def timeout(self) -> Optional[float]:
        """Seconds :meth:`get` waits by default, or None for ever; a new value applies to the next call.

        .. versionchanged:: 1.1
           Checked when set, like the constructor's argument.
        """
        return self._timeout

    @timeout.setter
    def timeout(self, value: Optional[float]) -> None:
        self._timeout = _arguments.seconds(value, "timeout")

    @property
    def connect_timeout(self) -> Optional[float]:
        """Seconds allowed to each hook call, or None; a new value applies to the next call.

        .. versionchanged:: 1.1
           Checked when set, like the constructor's argument.
        """
        return self._connect_timeout

    @connect_timeout.setter
    def connect_timeout(self, value: Optional[float]) -> None:
        self._connect_timeout = _arguments.seconds(value, "connect_timeout")

    @property
    def fail_fast(self) -> bool:
        """Whether :meth:`get` raises at once while the remote end is down; a new value applies at once.

        .. versionchanged:: 1.1
           Checked when set, like the constructor's argument.
        """
        return self._fail_fast

    @fail_fast.setter
    def fail_fast(self, value: bool) -> None:
        self._fail_fast = _arguments.flag(value, "fail_fast")

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called.

        .. versionadded:: 1.0
        """
        return self._closed

    def __enter__(self: _P) -> _P:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<{type(self).__name__} {self.name!r} {'closed' if self._closed else 'open'} size={s.size}"
            f" idle={s.idle} in_use={s.in_use} connecting={s.connecting} waiting={s.waiting}>"
        )

    # -- lending: the general path ------------------------------------------------

    def _check_thread_and_fork(self) -> None:
        """Raise if called from another thread than the pool's; in a forked child, start the pool anew."""
        if not self._owner._is_owned():
            raise RuntimeError(
                f"pool {self.name!r} belongs to the gevent hub of the thread that made it; "
                "use it from that thread only"
            )
        if self._forked:
            self._start_in_child()

    def _acquire(
        self, timeout: Optional[float], caller: Optional[FrameType], entry: Optional[Entry[C]] = None
    ) -> Entry[C]:
        """Lend a connection, checked if need be: the general path of :meth:`get`.

        ``entry`` is an idle entry that :meth:`get` already took, if any.
        Every caller that waits under load comes through here, so the wait
        itself is inlined: a waiter, a deadline, no timer of its own (see
        :meth:`_watch_deadline`).
        """
        if entry is None and (not self._owner._is_owned() or self._forked):
            self._check_thread_and_fork()
        limit = self._timeout if timeout is None else timeout
        deadline = None if limit is None else _now() + limit
        waited_since = None  # for the observers' wait_time, when there are any
        while True:
            if entry is None:
                if self._closed:
                    raise PoolClosed(f"pool {self.name!r} is closed")
                if self._idle and not self._waiters:
                    entry = self._idle.pop()
                    if entry.watching == WATCHED:
                        entry.watcher.stop()
                        entry.watching = UNWATCHED
                elif self._fail_fast and self._unavailable():
                    raise self._unavailable_error()
                elif self._max_waiting is not None and len(self._waiters) >= self._max_waiting:
                    self._overloaded += 1
                    raise self._timeout_error(
                        f"is overloaded: max_waiting={self._max_waiting} callers wait already", PoolOverloaded
                    )
                else:
                    waiter = Waiter(deadline)
                    if waited_since is None and self._observers:
                        waited_since = _now()
                    self._waiters.append(waiter)
                    if len(self._entries) + self._connecting < self._size + self._to_retire:
                        _lifecycle.grow(self)  # an elastic pool below size: one more for this caller
                    if deadline is not None and deadline < self._timeout_at:
                        self._watch_deadline(deadline)
                    waiter.greenlet = getcurrent()
                    try:
                        if self._handed:
                            # Block by waking the oldest waiter handed a connection: a switch
                            # straight to it, instead of one to the hub and one from it.
                            wake(self._handed.popleft())  # switches
                        else:
                            self._hub.switch()  # switches
                    except BaseException:
                        self._abandon(waiter)
                        raise
                    result = waiter.result
                    if result is None:  # the pool's timer woke it
                        self._waiters.remove(waiter)
                        self._timeouts += 1
                        raise self._timeout_error(f"no connection became free within {limit} s")
                    if isinstance(result, BaseException):
                        # Every waiter served one error object raises a copy of its own:
                        # raising the shared one would chain each waiter's traceback onto it.
                        raise copy.copy(result) from result.__cause__
                    entry = result
                    if self._closed:  # handed a connection just before close()
                        self._release(entry)  # switches
                        entry = None
                        continue
            if not self._timed:  # the entry never expires, nor needs a check
                break
            now = _now()
            if now >= entry.expires_at:  # the maintenance greenlet has not recycled it yet
                self._recycle(entry)  # switches
                entry = None
                continue
            quiet = now - max(entry.idle_since, entry.checked_at)  # since its last use or check
            if self._check_after is not None and quiet >= self._check_after:
                # The check may not outlast the caller's deadline, nor may a
                # run of failed checks (a black-holed remote) go on past it.
                budget = math.inf if deadline is None else deadline - now
                if self.connect_timeout is not None:
                    budget = min(budget, self.connect_timeout)
                if not self._check(entry, None if budget == math.inf else budget):  # switches
                    entry = None
                    if deadline is not None and _now() >= deadline:
                        self._timeouts += 1
                        raise self._timeout_error(f"found no healthy connection within {limit} s")
                    continue
                if self._closed:
                    self._release(entry)  # switches
                    entry = None
                    continue
            break
        entry.loan = LENT
        self._checkouts += 1.0
        if caller is not None:
            entry.lent_at = 0.0  # maintenance notes when it first sees the loan
            entry.lent_from = caller
            entry.lent_lasti = caller.f_lasti
        if waited_since is not None:
            tell(self, "waited", _now() - waited_since)
        return entry

    def _watch_deadline(self, deadline: float) -> None:
        """Arm the pool's timeout timer for ``deadline``, sooner than it was (see :func:`_time_out_waiters`).

        One timer serves every waiter: a caller that waits with the pool's
        timeout has a later deadline than those before it, so under load the
        timer is armed once per timeout period, not once per wait.
        """
        timer = self._timeout_timer
        if timer is not None:
            timer.close()
        timer = self._loop.timer(max(deadline - _now(), 0.0))
        timer.start(self._time_out_waiters)
        self._timeout_timer, self._timeout_at = timer, deadline

    def _abandon(self, waiter: Waiter) -> None:
        """A waiter was interrupted: give back what it was handed, or leave the queue."""
        waiter.greenlet = None
        if waiter.result is None:
            self._waiters.remove(waiter)
            return
        if waiter in self._handed:
            self._handed.remove(waiter)
        if isinstance(waiter.result, Entry):
            self._release(waiter.result)

    def _hand_over(self, result: Union[Entry[C], BaseException]) -> None:
        """Give ``result`` to the first waiter; the hub wakes it soon, unless a caller does first."""
        waiter = self._waiters.popleft()
        if isinstance(result, Entry):
            result.loan = LENT  # the waiter's already: the hub must not start watching it
        waiter.result = result
        if not self._wakeup_scheduled:
            self._wakeup_scheduled = True
            self._run_callback(self._wake_handed)
        self._handed.append(waiter)

    def _timeout_error(self, what: str, error_class: Type[PoolTimeout] = PoolTimeout) -> PoolTimeout:
        s = self.stats()
        message = (
            f"pool {self.name!r} {what} (size={s.size}, idle={s.idle}, in_use={s.in_use},"
            f" connecting={s.connecting}, waiting={s.waiting})"
        )
        cause = self._last_error
        if cause is not None:
            message += f"; last connect error: {cause!r}"
        error = error_class(message)
        if cause is not None:
            error.retry_after = self._retry_after()
        error.__cause__ = cause
        error.__suppress_context__ = True
        return error

    def _retry_after(self) -> float:
        """Seconds until the pool's next attempt to open a connection (see ``_connecting.retry_after``)."""
        return retry_after(self._slots, self._loop.now())

    def _unavailable(self) -> bool:
        """Whether no connection is open and the latest attempt to open one failed."""
        return self._last_error is not None and not self._entries

    def _unavailable_error(self) -> PoolUnavailable:
        retry_after = self._retry_after()
        error = PoolUnavailable(
            f"pool {self.name!r} cannot reach its remote end: {self._last_error!r};"
            f" it tries again in {retry_after:.3g} s"
        )
        error.retry_after = retry_after
        error.__cause__ = self._last_error
        error.__suppress_context__ = True
        return error

    def _check(self, entry: Entry[C], seconds: Optional[float], in_background: bool = False) -> bool:
        """Run :meth:`_keepalive` on a held entry; discard it and return False if it fails.

        In a caller's :meth:`get` (the ``check_after`` check), a
        :exc:`BaseException` that is no :exc:`Exception` may be the caller's own
        timeout or kill: it discards the connection and propagates.  In the
        background (the ``keepalive`` check) anything the hook raises is a
        failed check, except the pool's own stop.  ``seconds`` bounds it.
        """
        found_by = "the keepalive check" if in_background else "the check_after check"
        try:
            self._bounded(seconds, "_keepalive()", self._keepalive, entry.conn)  # switches
        except self._check_failures as error:
            self._check_failed(entry, error, found_by)
            return False
        except Exception as error:
            self._check_failed(entry, error, found_by, unexpected=True)
            return False
        except BaseException as error:
            if in_background and not self._stopping():
                self._check_failed(entry, error, found_by, unexpected=True)
                return False
            self._discard(entry, error, found_by)
            raise
        entry.checked_at = _now()  # not idle_since: a check is no use, for max_idle
        entry.stale = False
        return True

    def _reset_and_release(self, entry: Entry[C]) -> None:
        """A held entry comes back from its block: undo its session state with :meth:`_reset`, release it.

        Like the ``check_after`` check, it runs in the caller's greenlet: a
        :exc:`BaseException` that is no :exc:`Exception` discards the
        connection and propagates.
        """
        if entry.pool is self and not self._closed:
            try:
                self._bounded(self.connect_timeout, "_reset()", self._reset, entry.conn)  # switches
            except self._check_failures as error:
                self._discard(entry, error, "_reset()")  # switches
                return
            except Exception as error:
                self._discard(entry, error, "_reset()", unexpected=True)  # switches
                return
            except BaseException as error:
                self._discard(entry, error, "_reset()")  # switches
                raise
        self._release(entry)  # switches when the pool closed meanwhile

    def _bounded(self, seconds: Optional[float], what: str, hook: Callable[..., Any], *args: Any) -> Any:
        """Call a subclass hook for at most ``seconds``, after which it raises :exc:`TimeoutError`.

        The timer is a :class:`gevent.Timeout`, a :exc:`BaseException`, so an
        ``except Exception`` inside the hook cannot swallow it.
        """
        timer = gevent.Timeout(seconds)
        timer.start()
        try:
            return hook(*args)  # switches
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            if seconds == self.connect_timeout:
                raise TimeoutError(f"{what} exceeded connect_timeout={seconds}") from None
            raise TimeoutError(f"{what} outlasted the caller's get() timeout") from None
        finally:
            timer.close()

    def _check_failed(
        self, entry: Entry[C], error: BaseException, found_by: str, unexpected: bool = False
    ) -> None:
        self._keepalive_failures += 1
        self._discard(entry, error, found_by, unexpected)

    # -- moving slots between idle, in use and connecting ---------------------

    def _release(self, entry: Entry[C]) -> None:
        """A held entry comes back: lend it to the first waiter, keep it idle, or drop it."""
        if entry.pool is not self:
            # Orphaned by fork() (the orphanage forgets it), or diverted (see _lifecycle.py).
            entry.pool._release(entry)
            return
        if self._closed:
            self._close_and_replace(entry)
            return
        if self._timed:
            now = _now()
            if now >= entry.expires_at:
                self._recycle(entry)
                return
            entry.idle_since = now
        if self._waiters:
            self._hand_over(entry)
        else:
            self._go_idle(entry)

    def _go_idle(self, entry: Entry[C]) -> None:
        """Put an entry nobody waits for in ``_idle``, to be watched (as the entries' exits do)."""
        entry.loan = IN_POOL
        self._idle.append(entry)
        if entry.watching == UNWATCHED:
            self._watch_soon(entry)

    def _watch_soon(self, entry: Entry[C]) -> None:
        """Have the hub watch an idle entry's socket from its next turn on (see ``start_watchers``)."""
        entry.watching = TO_WATCH
        if not self._to_watch:
            self._loop.run_callback(self._start_watchers)
        self._to_watch.append(entry)

    def _socket_changed(self, entry: Entry[C], in_background: bool = False) -> None:
        """The watched socket of an entry coming back was closed or replaced while it was held.

        A client that reconnects by itself (``http.client`` does) has a new
        socket: watch that one.  A closed one, the pool discards.  Either way
        the old watcher goes first: its descriptor may belong to another socket now.
        """
        if entry.pool is not self:
            return
        unwatch(entry, self._watchers)
        sock = self._watchable_socket(entry.conn)
        if sock is None:
            self._discard(entry, None, "its socket was closed while it was lent", in_background=in_background)
            return
        watch(entry, sock, self._loop, self._watchers)
        self._go_idle(entry)

    def _leave_idle(self, entry: Entry[C]) -> None:
        """Take an entry out of ``_idle`` (for maintenance), and stop watching its socket."""
        self._idle.remove(entry)
        if entry.watching == WATCHED:
            entry.watcher.stop()
        if entry.watching != NEVER:
            entry.watching = UNWATCHED

    def _discard(
        self,
        entry: Entry[C],
        error: Optional[BaseException],
        found_by: str = "its block",
        unexpected: bool = False,
        in_background: bool = False,
    ) -> None:
        """A held entry is broken: log it (one line), close it and open a replacement.

        ``found_by`` says what found it broken (and, with no ``error``, how);
        ``unexpected`` adds the traceback of an error not in ``exc_classes``;
        ``in_background`` closes it in a greenlet of its own.
        """
        if entry.pool is not self:
            entry.pool._discard(entry, error)  # orphaned, or diverted: as _release() does
            return
        if not self._closed:
            self._discarded += 1
            if unexpected:
                logger.warning(
                    "pool %r: discarding a connection: %s raised %r, which is not in exc_classes",
                    self.name,
                    found_by,
                    error,
                    exc_info=error,
                )
            elif error is None:
                logger.warning("pool %r: discarding a connection: %s", self.name, found_by)
            else:
                logger.warning("pool %r: discarding a connection: %s raised %r", self.name, found_by, error)
        self._close_and_replace(entry, in_background)

    def _recycle(
        self, entry: Entry[C], in_background: bool = False, why: str = "it reached max_lifetime"
    ) -> None:
        """A held entry must not be kept (its lifetime ended): count it, close it and open its replacement."""
        if not self._closed:
            self._recycled += 1
            logger.debug("pool %r: recycling a connection: %s", self.name, why)
        self._close_and_replace(entry, in_background)

    def _close_and_replace(
        self, entry: Entry[C], in_background: bool = False, after_failures: int = 0
    ) -> None:
        """Close a held entry and, unless the pool is closed or can do without it, open a replacement.

        An elastic pool does without it while it keeps ``min_size`` open or
        opening, and as many being opened as callers wait (``_lifecycle.replaces``).

        ``in_background`` closes it in a greenlet of its own, for the
        maintenance greenlet and the hub, which must not wait for a slow close.
        ``after_failures`` makes the replacement wait the backoff of that many
        failed connects before its first attempt.
        """
        self._entries.discard(entry)
        unwatch(entry, self._watchers)  # before the socket is closed: its number may be reused at once
        if not self._closed and _lifecycle.replaces(self):
            self._open_slot(after_failures)
        if in_background:
            self._closing.add(entry)
            self._spawn("recycle", close_recycled, entry)
        else:
            self._close_quietly(entry.conn)  # switches

    def _close_quietly(self, conn: C, in_background: bool = False) -> None:
        """Call :meth:`_close_connection` under ``connect_timeout``; log its errors at DEBUG.

        In a caller's greenlet, a :exc:`BaseException` that says "stop now" (the
        caller's timeout, a kill, Ctrl-C) propagates; in the background only the
        pool's own stop does.
        """
        try:
            self._bounded(
                self.connect_timeout, "_close_connection()", self._close_connection, conn
            )  # switches
        except BaseException as error:
            if isinstance(error, _STOP_NOW) and (not in_background or self._stopping()):
                raise
            logger.debug("pool %r: _close_connection() failed", self.name, exc_info=True)

    def _stopping(self) -> bool:
        """Whether the current background greenlet is being stopped by the pool itself.

        :meth:`close` closes the pool before it kills them, and a forked child
        forgets the greenlets it inherited before it kills them; anything else
        that interrupts a background greenlet is a failure of the work it does.
        """
        return self._closed or gevent.getcurrent() not in self._greenlets

    def _add(self, conn: C, address: Optional[Address] = None) -> None:
        """A slot finished connecting (to ``address``, with ``address=``): lend the new connection to the
        first waiter, or keep it idle."""
        if self._to_retire and retire_new(self, conn):  # switches
            return
        lifetime = (
            math.inf
            if self.max_lifetime is None
            else self.max_lifetime * random.uniform(SHORTEST_LIFETIME, 1.0)
        )
        entry = self._entry_class(conn, self, _now() + lifetime)
        entry.address = address
        if self._watch_idle:
            sock = self._watchable_socket(conn)
            if sock is not None:
                watch(entry, sock, self._loop, self._watchers)
        self._connecting -= 1
        self._opened += 1
        self._entries.add(entry)
        if self._waiters:
            self._hand_over(entry)
        else:
            self._go_idle(entry)
        if self._ready_waiters:
            opened(self._ready_waiters, len(self._entries))

    def _open_one(self) -> Tuple[C, Optional[Address]]:
        """Open one connection in this greenlet, as a connect greenlet would, and the address it went to
        (``None`` without ``address=``); raise what failed (switches).  For :meth:`drain`.

        With ``address=``, a failed connect backs that address off and the
        next one is tried at once: it raises only when every address failed.
        """
        book = self._addresses
        if book is None:
            conn = self._bounded(self.connect_timeout, "_new_connection()", self._new_connection)  # switches
            if conn is None:
                raise TypeError("_new_connection() returned None")
            return conn, None
        for tries_left in reversed(range(_OPEN_ONE_TRIES)):
            tried_at = self._loop.now()
            book.refresh(self, tried_at)  # switches, when a resolution is due
            address = book.choose([e.address for e in self._entries], tried_at)
            try:
                conn = self._bounded(self.connect_timeout, "_connect()", self._connect, address)  # switches
                if conn is None:
                    raise TypeError("_connect() returned None")
            except Exception as error:
                if address_failed(self, book, address, error, tried_at) or not tries_left:
                    raise  # every address is in backoff now
                continue
            finally:
                book.attempt_ended(address)
            log_recovery(self, book, address)
            return conn, address
        raise AssertionError("unreachable: the last try returns or raises")

    def _take_over(self, entry: Entry[C], conn: C, address: Address) -> None:
        """Rebalancing opened ``conn`` to replace the held ``entry``: it takes the entry's slot at once,
        and the entry is closed."""
        self._recycled += 1
        self._entries.discard(entry)
        unwatch(entry, self._watchers)
        self._connecting += 1  # the slot the entry leaves, filled by _add at once
        self._add(conn, address)
        self._close_quietly(entry.conn, in_background=True)  # switches

    def _watchable_socket(self, conn: C) -> Any:
        """The socket of ``conn`` to watch while it is idle (see :meth:`_socket_of`), or None."""
        try:
            sock = self._socket_of(conn)
            if sock is not None and sock.fileno() >= 0:
                return sock
        except Exception:
            logger.debug(
                "pool %r: _socket_of() failed: the connection is not watched", self.name, exc_info=True
            )
        return None

    def _judges_idle_readable(self) -> bool:
        """Whether a subclass overrides :meth:`_idle_readable` (which then runs in a greenlet)."""
        return self._custom_idle_readable

    def _open_slot(self, after_failures: int = 0) -> None:
        self._connecting += 1
        self._spawn("connect", connect_loop, self._generation, after_failures)

    # -- background work ------------------------------------------------------

    def _start(self) -> None:
        for _ in range(self.min_size):
            self._open_slot()
        if self._maintained:
            self._spawn("maintenance", maintenance_loop, self._generation)
        if self._addresses is not None:
            self._spawn("addresses", rebalance_loop, self._generation)

    def _spawn(self, what: str, loop: Callable[..., None], *args: Any) -> None:
        greenlet = gevent.spawn(loop, weakref.ref(self), *args)
        greenlet.name = f"geventconnpool {self.name} {what}"
        self._greenlets.add(greenlet)
        greenlet.rawlink(self._greenlets.discard)  # called by the hub itself: no greenlet per callback

    def _reconnect_wait(self, attempt: int) -> float:
        """The seconds a slot waits after its ``attempt``-th failed connect in a row."""
        return backoff_delay(
            attempt,
            initial=self.RECONNECT_DELAY,
            factor=self.RECONNECT_FACTOR,
            cap=self.RECONNECT_MAX_DELAY,
            jitter=self.RECONNECT_JITTER,
        )

    def _kill_timeout(self) -> Optional[float]:
        """How long close() waits for background greenlets to end: a hook swallowing the kill
        still ends with connect_timeout."""
        return None if self.connect_timeout is None else self.connect_timeout + 1.0

    def _reset_counters(self) -> None:
        self._checkouts = 0.0  # a float: adding to one costs less than to an int past 256
        self._opened = self._failed_connects = self._discarded = 0
        self._recycled = self._keepalive_failures = self._timeouts = self._closed_while_idle = 0
        self._overloaded = 0
        self._retired = 0

    def _drop_after_fork(self) -> None:
        """In a child process: forget the parent's connections, without closing them.

        A pool of another thread is forgotten too, without touching its event
        loop or its greenlets: that thread, and its hub, did not survive the fork.
        """
        ours = self._owner._is_owned()
        self._generation += 1
        for entry in (*self._entries, *self._retiring):
            entry.pool = ORPHANAGE
            if entry.watcher is not None:
                self._orphaned_watchers.append(entry.watcher)
                entry.watcher = None
                entry.watching = NEVER  # their callbacks do nothing now
        self._to_watch.clear()
        self._watchers.clear()
        # Not now: until gevent reinitialises the loop of this child, its
        # backend is the parent's, and libuv removes a stopped watcher's
        # descriptor from it at once (a subprocess's fork would take the
        # parent's idle connections out of the parent's loop).  The child's
        # hub runs this callback after the reinitialisation.  They are never
        # closed: the numbers may belong to other sockets by then.
        if ours:
            self._loop.run_callback(_stop_all_of, self._orphaned_watchers)
        self._idle.clear()
        self._entries.clear()
        self._ready_waiters.clear()  # the parent's callers: never woken here
        self._retiring.clear()
        self._to_retire = 0
        self._checking.clear()
        self._closing.clear()  # the parent closes those
        self._slots.clear()
        if self._addresses is not None:
            self._addresses.after_fork()
        self._connecting = self.min_size  # reopened by the child's first call
        self._idle_closures = {}
        self._closure_report = None
        self._forked = True
        # The parent's greenlets were copied into this process: one may be in
        # the middle of an exchange on the parent's socket.  Kill them before
        # the child's hub runs them again (killing only schedules the kill).
        inherited = list(self._greenlets)
        self._greenlets.clear()
        if ours:
            gevent.killall(inherited, block=False)

    def _start_in_child(self) -> None:
        """In a child process: stop the parent's greenlets and open connections of our own."""
        self._forked = False
        self._reset_counters()
        self._last_error = None
        self._outage = OutageLog()
        self._reconnected = Event()
        self._connecting = 0
        if not self._closed:
            self._start()


_P = TypeVar("_P", bound=ConnectionPool[Any])


def _wake_handed(pool_ref: weakref.ref[ConnectionPool[Any]]) -> None:
    """A hub callback: wake the waiters handed a result, oldest first (those no caller woke already)."""
    pool = pool_ref()
    if pool is None:
        return
    pool._wakeup_scheduled = False
    handed = pool._handed
    for _ in range(len(handed)):  # those handed since are woken by the next run
        if not handed:
            break
        wake(handed.popleft())  # switches


def _time_out_waiters(pool_ref: weakref.ref[ConnectionPool[Any]]) -> None:
    """The pool's timeout timer fired: wake the waiters whose deadline has passed, and watch the next one.

    A waiter woken with no result raises :class:`PoolTimeout`; one served in
    the meantime keeps its connection.
    """
    pool = pool_ref()
    if pool is None:
        return
    timer, pool._timeout_timer, pool._timeout_at = pool._timeout_timer, None, math.inf
    if timer is not None:
        timer.close()
    now = _now()
    soonest = math.inf
    for waiter in pool._waiters:
        deadline = waiter.deadline
        if deadline is None:
            continue
        if deadline <= now:
            if waiter.result is None:
                pool._run_callback(wake, waiter)
        else:
            soonest = min(soonest, deadline)
    if soonest != math.inf:
        pool._watch_deadline(soonest)


def _stop_all_of(watchers: List[Any]) -> None:
    for watcher in watchers:
        watcher.stop()


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        try:
            pool._drop_after_fork()
        except Exception:  # one pool must not keep the others on their parent's connections
            logger.exception("pool %r: could not forget the parent's connections after fork()", pool.name)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


if TYPE_CHECKING:

    def _keeps_its_contracts(
        pool: ConnectionPool[Any],
    ) -> Tuple[
        LendingPool[Any],
        ConnectingPool[Any],
        MaintainedPool[Any],
        WatchingPool[Any],
        ReadinessPool[Any],
        ObservedPool[Any],
        LifecyclePool[Any],
        ConnectingToAddresses,
        RebalancedPool[Any],
    ]:
        """Never called: the type checker proves that the pool is what each private module expects."""
        return pool, pool, pool, pool, pool, pool, pool, pool, pool
