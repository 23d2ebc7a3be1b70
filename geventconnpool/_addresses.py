"""Many servers behind one name: the addresses of a pool made with ``address=``.

Such a pool opens each connection with ``_connect(address)`` rather than
``_new_connection()``.  :class:`AddressBook` holds what it knows of its
remote end's addresses:

- the last good answer of ``_resolve(host, port)`` for each ``(host, port)``
  the user gave, asked again when a connect finds it older than
  ``resolve_every``; a failed resolution keeps the last good answer, and is
  logged once per streak;
- the connections being opened to each address (the open ones are counted
  from the pool's entries, each of which remembers its address, so that no
  path that drops an entry has anything to update here);
- each address's own backoff after a failed connect, with its own
  :class:`~geventconnpool._outage.OutageLog`.

:meth:`AddressBook.choose` picks the address of each new connection: the one
with the fewest open and opening connections among those not in backoff,
ties at random.  A failed connect puts only that address in backoff; the
connect loop (``_connecting.py``) then tries another one at once, and the
pool is down only when every address is in backoff.

The pool's *addresses* greenlet (:func:`rebalance_loop`) wakes every
``rebalance_every`` seconds: it resolves if the answer is due, closes the
idle connections to addresses that left the answer (a held one is closed
when it comes back), and, when
:func:`plan_move` says the spread is off by more than one, moves one idle
connection: :func:`move_connection` opens the new connection first, while
the old one stays in the pool, then swaps them (make before break).

Nothing here runs for a pool without ``address``.
"""

from __future__ import annotations

import logging
import random
import weakref
from collections import Counter
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Set,
    Tuple,
    TypeVar,
)

import gevent
from gevent import socket
from gevent.event import Event

from geventconnpool import _arguments
from geventconnpool._lease import Entry
from geventconnpool._lifecycle import LifecyclePool, recycle_when_back
from geventconnpool._outage import OutageLog

C = TypeVar("C")

logger = logging.getLogger("geventconnpool")

Target = Tuple[str, int]
"""A ``(host, port)`` pair as the user gave it."""


class Address(NamedTuple):
    """One address of a pool's remote end, handed to :meth:`~geventconnpool.ConnectionPool._connect`.

    ``host`` is the name the pool was given (for TLS ``server_hostname``, an
    HTTP ``Host`` header), ``ip`` one address that name resolved to (to
    connect to), and ``port`` the port of both.

    .. versionadded:: 1.1
    """

    host: str
    """The host name given to the pool's ``address``."""
    port: int
    """The TCP port."""
    ip: str
    """One IP address (v4 or v6) that ``host`` resolved to: connect to this one."""


Address.__module__ = "geventconnpool"


def targets(value: object, argument: str) -> Tuple[Target, ...]:
    """Return the ``(host, port)`` pairs of ``address=``: one pair, or a non-empty list of pairs."""
    if _is_pair_shaped(value):
        pairs: Sequence[object] = [value]
    elif isinstance(value, (list, tuple)) and value:
        pairs = value
    else:
        raise TypeError(f"{argument} must be a (host, port) pair or a list of them, not {value!r}")
    found: List[Target] = []
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or not _is_pair_shaped(pair):
            raise TypeError(f"{argument} must be a (host, port) pair or a list of them, not {value!r}")
        host: object = pair[0]
        if not isinstance(host, str) or not host:
            raise TypeError(f"{argument}: the host must be a non-empty str, not {host!r}")
        port = _arguments.whole_number(pair[1], f"{argument}: the port", minimum=1, maximum=65535)
        if (host, port) not in found:
            found.append((host, port))
    return tuple(found)


def _is_pair_shaped(value: object) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and not isinstance(value[0], (tuple, list))


def resolve(host: str, port: int) -> List[str]:
    """The IP addresses of ``host`` for TCP, IPv4 and IPv6, in the resolver's order, without repeats."""
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    ips = [str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
    return list(dict.fromkeys(ips))


class AddressedPool(Protocol):
    """What the address book uses of the pool: the private contract of this module."""

    @property
    def name(self) -> str: ...
    @property
    def connect_timeout(self) -> Optional[float]: ...

    def _resolve(self, host: str, port: int) -> List[str]: ...
    def _bounded(self, seconds: Optional[float], what: str, hook: Callable[..., Any], *args: Any) -> Any: ...
    def _reconnect_wait(self, attempt: int) -> float: ...


class _Backoff:
    """An address that failed: how often in a row, since when, until when it is skipped, and its log."""

    __slots__ = ("failed_at", "failures", "outage", "until")

    def __init__(self) -> None:
        self.failures = 0
        self.failed_at = -1e300
        self.until = 0.0
        self.outage = OutageLog()


class AddressBook:
    """The addresses of one pool, their resolution, their connects in flight and their backoffs.

    Methods that take ``now`` read no clock: it is the event loop's clock,
    which the connect loop's waits use too.
    """

    def __init__(self, targets: Tuple[Target, ...], resolve_every: float) -> None:
        self.targets = targets
        self.resolve_every = resolve_every
        self.opening: Counter[Address] = Counter()
        """Connects in flight, by address."""
        self._answers: Dict[Target, Tuple[Address, ...]] = {}  # the last good answer of each target
        self._asked_at: Dict[Target, float] = {}  # when each target was last resolved, or tried
        self._resolving: Dict[Target, Event] = {}  # set when the resolution under way ends
        self._failing: Set[Target] = set()  # targets whose last resolution failed
        self._errors: Dict[Target, BaseException] = {}  # the last error of each target's resolution
        self._backoffs: Dict[Address, _Backoff] = {}

    def current(self) -> List[Address]:
        """Every address of the last good answers, in the order of the targets and of the resolver."""
        return [address for target in self.targets for address in self._answers.get(target, ())]

    def due(self, now: float) -> List[Target]:
        """The targets to resolve at ``now``: never resolved, or asked ``resolve_every`` ago."""
        return [
            target
            for target in self.targets
            if target not in self._answers or now - self._asked_at.get(target, -1e300) >= self.resolve_every
        ]

    def refresh(self, pool: AddressedPool, now: float) -> None:
        """Resolve the targets that are due (switches); raise when a target has no answer at all.

        A target being resolved by another greenlet is waited for only when
        there is no earlier answer to use meanwhile.
        """
        for target in self.due(now):
            running = self._resolving.get(target)
            if running is not None:
                if target not in self._answers:
                    running.wait()  # switches
                continue
            self._asked_at[target] = now
            done = self._resolving[target] = Event()
            try:
                self._resolve_one(pool, target)  # switches
            finally:
                del self._resolving[target]
                done.set()
        if not self.current():
            error = self._errors.get(self.targets[0])
            if error is None:
                host, port = self.targets[0]
                error = OSError(f"{host}:{port} resolved to no address yet")
            raise error.with_traceback(None)  # raised at each attempt: do not pile up tracebacks

    def _resolve_one(self, pool: AddressedPool, target: Target) -> None:
        host, port = target
        try:
            ips = pool._bounded(pool.connect_timeout, "_resolve()", pool._resolve, host, port)  # switches
            if not ips:
                raise OSError(f"_resolve({host!r}, {port}) returned no address")
            answer = tuple(Address(host, port, str(ip)) for ip in dict.fromkeys(ips))
        except Exception as error:
            self._errors[target] = error
            if target not in self._failing:
                self._failing.add(target)
                kept = ", ".join(a.ip for a in self._answers.get(target, ())) or "none yet"
                logger.warning(
                    "pool %r: could not resolve %s:%s, keeping the last answer (%s): %r",
                    pool.name,
                    host,
                    port,
                    kept,
                    error,
                )
            else:
                logger.debug("pool %r: could not resolve %s:%s again: %r", pool.name, host, port, error)
            return
        if target in self._failing:
            self._failing.discard(target)
            logger.info("pool %r: resolved %s:%s again", pool.name, host, port)
        if answer != self._answers.get(target):
            logger.debug("pool %r: %s:%s resolves to %s", pool.name, host, port, [a.ip for a in answer])
        self._answers[target] = answer
        for address in list(self._backoffs):
            if address not in answer and (address.host, address.port) == target:
                del self._backoffs[address]  # gone: if it comes back, it starts afresh

    def choose(self, open_ones: Iterable[Optional[Address]], now: float) -> Address:
        """Pick the address of a new connection and count it as opening.

        The one with the fewest open and opening connections among those not
        in backoff, ties at random; when every address is in backoff (the
        pool is down), the one whose backoff ends first.  ``open_ones`` is the
        address of each open connection.
        """
        candidates = self.current()
        ready = [a for a in candidates if not self.backing_off(a, now)]
        if not ready:
            ready = [min(candidates, key=lambda a: self._backoffs[a].until)]
        load: Counter[Optional[Address]] = Counter(open_ones)
        load.update(self.opening)
        least = min(load[a] for a in ready)
        address = random.choice([a for a in ready if load[a] == least])
        self.opening[address] += 1
        return address

    def attempt_ended(self, address: Address) -> None:
        """A connect to ``address`` ended, however it ended."""
        self.opening[address] -= 1
        if self.opening[address] <= 0:
            del self.opening[address]

    def succeeded(self, address: Address, now: float) -> Optional[str]:
        """A connect to ``address`` succeeded: end its backoff; return the INFO line it deserves, if any."""
        backoff = self._backoffs.pop(address, None)
        if backoff is None:
            return None
        recovered = backoff.outage.succeeded(now)
        return None if recovered is None else f"{_named(address)}: {recovered}"

    def failed(
        self, pool: AddressedPool, address: Address, error: BaseException, started: float, now: float
    ) -> Optional[str]:
        """A connect to ``address`` that began at ``started`` failed: back it off.

        Only a failure of an attempt begun after the address's last failure
        lengthens its backoff: the connects that were in flight together fail
        together, and count once.  Return the WARNING line it deserves, if any.
        """
        backoff = self._backoffs.get(address)
        if backoff is None:
            backoff = self._backoffs[address] = _Backoff()
        if started >= backoff.failed_at:
            backoff.failures += 1
            backoff.failed_at = now
            backoff.until = now + pool._reconnect_wait(backoff.failures)
        warning = backoff.outage.failed(error, now)
        return None if warning is None else f"{_named(address)}: {warning}"

    def backing_off(self, address: Address, now: float) -> bool:
        """Whether ``address`` is in backoff at ``now``."""
        return address in self._backoffs and self._backoffs[address].until > now

    def all_backing_off(self, now: float) -> bool:
        """Whether every address is in backoff: the pool is down."""
        return all(self.backing_off(a, now) for a in self.current())

    def after_fork(self) -> None:
        """In a child process: forget the connects and resolutions of the parent's greenlets."""
        self.opening.clear()
        self._resolving.clear()

    def by_address(self, open_ones: Iterable[Optional[Address]]) -> Dict[Address, int]:
        """The number of open connections of every current address, and of those that left the answer."""
        counts = dict.fromkeys(self.current(), 0)
        counts.update(Counter(a for a in open_ones if a is not None))
        return counts


def _named(address: Address) -> str:
    ip = f"[{address.ip}]" if ":" in address.ip else address.ip
    return f"{address.host} at {ip}:{address.port}"


class ConnectingToAddresses(AddressedPool, Protocol):
    """What the connect loop's address steps use of the pool, on top of :class:`AddressedPool`."""

    _loop: Any  # the hub's event loop


def address_failed(
    pool: ConnectingToAddresses, book: AddressBook, address: Address, error: BaseException, started: float
) -> bool:
    """A connect to ``address`` begun at ``started`` failed: back the address off, log it.

    Return whether every address is in backoff now, which makes the pool down.
    """
    now = pool._loop.now()
    warning = book.failed(pool, address, error, started, now)
    if warning is not None:
        logger.warning("pool %r: %s", pool.name, warning)
    else:
        logger.debug("pool %r: %s: failed to open a connection: %r", pool.name, _named(address), error)
    return book.all_backing_off(now)


def log_recovery(pool: ConnectingToAddresses, book: AddressBook, address: Address) -> None:
    """A connect to ``address`` succeeded: end its backoff, and say so if it had failed."""
    recovered = book.succeeded(address, pool._loop.now())
    if recovered is not None:
        logger.info("pool %r: %s", pool.name, recovered)


def check_hooks(cls: Any, base: Any, with_address: bool) -> None:
    """Refuse, at construction, a pool class whose connect hook does not match ``address``.

    A pool with ``address`` opens connections with ``_connect(address)``, one
    without it with ``_new_connection()``: exactly one of them is overridden.
    """
    new_connection = cls._new_connection is not base._new_connection
    connect = cls._connect is not base._connect
    name = cls.__name__
    if with_address and new_connection:
        raise TypeError(
            f"{name} overrides _new_connection(), which a pool made with address= never calls:"
            " override _connect(address) instead"
        )
    if with_address and not connect:
        raise TypeError(f"{name} must override _connect(address) to use address=")
    if not with_address and not new_connection:
        hint = ": its _connect(address) needs address=" if connect else ""
        raise TypeError(f"{name} must override _new_connection() to open a connection{hint}")


# -- rebalancing: the pool's "addresses" greenlet ------------------------------------------------------


def plan_move(
    load: Dict[Address, int], movable: Iterable[Address], ready: Iterable[Address]
) -> Optional[Move]:
    """Decide whether to move one connection, and from where to where.

    ``load`` is the open and opening connections of each address; ``movable``
    the addresses with an idle connection, ``ready`` those that may receive
    one (resolved, not in backoff).  A connection moves from the most loaded
    movable address to the least loaded ready one when they differ by more
    than one: a move then narrows the spread.
    """
    sources = list(movable)
    targets = list(ready)
    if not sources or not targets:
        return None
    source = max(sources, key=lambda a: load.get(a, 0))
    target = min(targets, key=lambda a: load.get(a, 0))
    if load.get(source, 0) - load.get(target, 0) <= 1:
        return None
    return Move(source, target)


class Move(NamedTuple):
    """One connection to move: from the address ``source`` to the address ``target``."""

    source: Address
    target: Address


class RebalancedPool(ConnectingToAddresses, LifecyclePool[C], Protocol[C]):
    """What rebalancing uses of the pool, besides what lifecycle control uses: its greenlets' contract."""

    @property
    def rebalance_every(self) -> float: ...

    _addresses: Optional[AddressBook]
    _recycled: int

    def _connect(self, address: Address) -> C: ...
    def _close_and_replace(
        self, entry: Entry[C], in_background: bool = False, after_failures: int = 0
    ) -> None: ...
    def _stopping(self) -> bool: ...
    def _take_over(self, entry: Entry[C], conn: C, address: Address) -> None: ...


def rebalance_loop(pool_ref: weakref.ref[RebalancedPool[Any]], generation: int) -> None:
    """Keep the answer fresh and the spread even, for as long as the pool is open.

    It wakes every ``rebalance_every`` seconds, up to a quarter more at random
    (so that the workers of a fleet do not move together): at most one move
    per period.
    """
    while True:
        pool = pool_ref()
        if pool is None or pool._generation != generation or pool._closed:
            return
        wait = pool.rebalance_every * random.uniform(1.0, 1.25)
        del pool
        gevent.sleep(wait)  # switches
        pool = pool_ref()
        if pool is None or pool._generation != generation or pool._closed:
            return
        try:
            rebalance(pool)  # switches, when a resolution is due
        except Exception:
            logger.exception("pool %r: unexpected error while rebalancing", pool.name)
        del pool


def rebalance(pool: RebalancedPool[Any]) -> None:
    """Resolve if due; retire the connections to addresses that left the answer; start one move.

    Idle ones are closed now, held ones when they come back; each is replaced
    on the addresses of the answer.
    """
    book = pool._addresses
    assert book is not None
    try:
        book.refresh(pool, pool._loop.now())  # switches
    except Exception:
        return  # no answer yet: the connects say so
    if pool._closed:
        return
    current = set(book.current())
    for entry in [e for e in pool._idle if e.address not in current]:
        logger.debug("pool %r: closing a connection to %s, which left the answer", pool.name, entry.address)
        pool._recycled += 1
        pool._leave_idle(entry)
        pool._close_and_replace(entry, in_background=True)
    for entry in [e for e in pool._entries if e.address not in current]:  # held: not idle any more
        recycle_when_back(pool, entry, f"its address {entry.address} left the answer")
    now = pool._loop.now()
    load: Counter[Address] = Counter(e.address for e in pool._entries if e.address is not None)
    load.update(book.opening)
    idle_on = {e.address for e in pool._idle}
    ready = [a for a in book.current() if not book.backing_off(a, now)]
    move = plan_move(load, (a for a in current if a in idle_on), ready)
    if move is None:
        return
    book.opening[move.target] += 1
    logger.debug(
        "pool %r: moving a connection from %s to %s", pool.name, _named(move.source), _named(move.target)
    )
    pool._spawn("rebalance", move_connection, move, pool._loop.now())


def move_connection(pool_ref: weakref.ref[RebalancedPool[Any]], move: Move, started: float) -> None:
    """Open a connection to ``move.target``, then close an idle one to ``move.source`` in its place.

    Make before break: the connection to replace stays in the pool, lent as
    usual, until the new one is open; the new one is in no count of the pool
    until then (but in the target's opening connections).  If the connect
    fails, the target backs off and the pool is as it was; if nothing to
    ``move.source`` is idle any more, the new connection is closed.
    """
    pool = pool_ref()
    if pool is None:
        return
    book = pool._addresses
    assert book is not None
    conn, error = None, None
    try:
        conn = pool._bounded(pool.connect_timeout, "_connect()", pool._connect, move.target)  # switches
    except BaseException as exc:
        if pool._stopping():
            raise
        error = exc
    finally:
        book.attempt_ended(move.target)
    if conn is None:
        address_failed(pool, book, move.target, error or TypeError("_connect() returned None"), started)
        return
    log_recovery(pool, book, move.target)
    entry = next((e for e in pool._idle if e.address == move.source), None)  # the least recently used
    if entry is None or pool._closed:
        logger.debug("pool %r: nothing idle to move from %s any more", pool.name, _named(move.source))
        pool._opened += 1  # and closed at once, on the pool's own schedule: the counters stay true
        pool._recycled += 1
        pool._close_quietly(conn, in_background=True)  # switches
        return
    pool._leave_idle(entry)
    pool._take_over(entry, conn, move.target)  # switches
