"""Watching idle connections: the event loop learns that the remote end closed one before anyone asks.

While a connection is idle, an io watcher of the hub waits for its socket to
become readable; the loop does the waiting.  The watcher is stopped while the
connection is lent (it would fire at every reply), and started again by the
hub itself, in :func:`start_watchers`, a callback of its next turn, which
takes effect at its next poll for I/O: a connection given back and borrowed
again before the hub runs (a greenlet making one request after another)
costs no watcher operation at all, and the checkout pays one watcher stop
only if the hub watched the connection meanwhile.  Before it starts a
watcher, the hub checks that the socket is still the one the watcher was
made for (its ``fileno()``): a socket closed during the loan is never
watched again, since its descriptor number may already belong to another
socket.  The watcher is closed before the pool closes the connection.

When an idle socket becomes readable, :func:`readable` looks at it, in the
hub, before any greenlet can take the connection (:func:`look` says what it
found):

- the end of the stream, a reset or any error: closed by the remote end;
  dropped at once, and its replacement starts opening;
- a TLS record with no application data (a TLS 1.3 session ticket, a key
  update): a non-blocking read raises :exc:`ssl.SSLWantReadError`, and the
  connection stays, watched;
- application bytes: the protocol is out of step (a reply nobody will read,
  a goodbye banner); dropped.  Bytes on a connection opened moments ago are
  a greeting that ``_new_connection`` did not read: that is a failed connect,
  whose replacement waits a backoff instead of reconnecting in a loop.

A subclass whose server writes on idle connections on purpose overrides
``_idle_readable``, which runs in a greenlet of its own, under
``connect_timeout``.  The closures of one burst (a server restart) are logged
in one line.
"""

from __future__ import annotations

import _socket
import logging
import ssl
import time
import weakref
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Set, TypeVar

from geventconnpool._lease import IN_POOL, NEVER, TO_WATCH, UNWATCHED, WATCHED, Entry

C = TypeVar("C")

logger = logging.getLogger("geventconnpool")

_now = time.monotonic

#: A connection that receives bytes nobody asked for within this many seconds
#: of being opened failed to connect (its greeting was not read): not a broken one.
FRESH = 1.0
#: The closures found within this many seconds of the first one share a log line.
REPORT_AFTER = 0.1

CLOSED, RESET, ERROR, DATA = "end of stream", "reset", "error", "unsolicited data"
# After unsolicited data, look() reads on at most this much, in chunks, for the end of the stream.
_READ_SIZE = 65536
_MORE_READS = 4


def default_socket_of(c: object) -> Any:
    """The socket to watch for connection ``c``: ``c`` itself when it is socket-like, else its ``sock``."""
    if _socket_like(c):
        return c
    sock = getattr(c, "sock", None)
    return sock if _socket_like(sock) else None


def _socket_like(obj: object) -> bool:
    return all(callable(getattr(obj, name, None)) for name in ("fileno", "recv", "gettimeout", "settimeout"))


def look(sock: Any) -> Optional[str]:
    """Read an idle socket that became readable, without blocking; None when it holds nothing for the caller.

    Otherwise return what it holds: :data:`CLOSED`, :data:`RESET`,
    :data:`ERROR` or :data:`DATA` (one byte of it was read).  A TLS socket
    that found only records without application data raises
    :exc:`ssl.SSLWantReadError`; a plain one woken for nothing raises
    :exc:`BlockingIOError`: both are None.
    """
    try:
        timeout = sock.gettimeout()
        sock.settimeout(0.0)
    except OSError:
        return ERROR  # closed under us
    try:
        found = _read_what_came(sock)
    finally:
        try:
            sock.settimeout(timeout)
        except OSError:
            pass
    return found


def _read_what_came(sock: Any) -> Optional[str]:
    """:func:`look`'s reads, on a socket already made non-blocking.

    After a first byte of data it reads on, up to a limit, to tell a goodbye
    (data, then the end of the stream: closed) from data alone (a greeting, a
    reply nobody will read).
    """
    got_data = False
    try:
        for size in (1, *[_READ_SIZE] * _MORE_READS):
            if not sock.recv(size):
                return CLOSED
            got_data = True
        return DATA
    except (ssl.SSLWantReadError, BlockingIOError):
        return DATA if got_data else None
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
        return CLOSED
    except ConnectionResetError:
        return RESET
    except OSError:
        return ERROR


class WatchingPool(Protocol[C]):
    """What watching uses of the pool: the private contract of this module."""

    @property
    def name(self) -> str: ...
    @property
    def connect_timeout(self) -> Optional[float]: ...

    RECONNECT_MAX_DELAY: float
    _closed: bool
    _idle: Deque[Entry[C]]
    _checking: Set[Entry[C]]
    _loop: Any
    _watchers: Set[Any]
    _to_watch: List[Entry[C]]
    _closed_while_idle: int
    _discarded: int
    _failed_connects: int
    _idle_closures: Dict[str, int]
    _closure_report: Any
    _early_data_streak: int
    _early_data_at: float

    def _idle_readable(self, c: C) -> bool: ...
    def _judges_idle_readable(self) -> bool: ...
    def _bounded(self, seconds: Optional[float], what: str, hook: Callable[..., Any], *args: Any) -> Any: ...
    def _spawn(self, what: str, loop: Callable[..., None], *args: Any) -> None: ...
    def _release(self, entry: Entry[C]) -> None: ...
    def _socket_changed(self, entry: Entry[C], in_background: bool = False) -> None: ...
    def _close_and_replace(
        self, entry: Entry[C], in_background: bool = False, after_failures: int = 0
    ) -> None: ...
    def _stopping(self) -> bool: ...


def watch(entry: Entry[Any], sock: Any, loop: Any, watchers: Set[Any]) -> None:
    """Give ``entry`` a watcher on ``sock`` (stopped: the pool starts it whenever the entry goes idle).

    ``watchers`` is the pool's set of them, which :func:`stop_all` stops if
    the pool is garbage collected without being closed: an active watcher
    whose socket the collector closes would abort the event loop.
    """
    fd = sock.fileno()
    if fd < 0:
        return
    entry.sock = sock
    entry.fd = fd
    # Asked for its fileno() before each start: the C socket where gevent's
    # socket wraps one (its _sock), whose method is cheaper than the Python one around it.
    raw = getattr(sock, "_sock", None)
    entry.raw = raw if isinstance(raw, _socket.socket) else sock
    entry.watcher = loop.io(fd, 1, ref=False)  # ref=False: idle connections never keep the loop alive
    entry.watching = UNWATCHED
    # Weak: an active watcher is kept alive by the loop, and must not keep the entry (and its pool) alive.
    entry.ref = weakref.ref(entry)
    watchers.add(entry.watcher)


def unwatch(entry: Entry[Any], watchers: Set[Any]) -> None:
    """Stop and release the entry's watcher, before its socket is closed."""
    watcher = entry.watcher
    if watcher is not None:
        entry.watcher = None
        entry.watching = NEVER
        watchers.discard(watcher)
        watcher.stop()
        watcher.close()


def stop_all(watchers: Set[Any]) -> None:
    """Stop every watcher of a pool that is being collected, before the collector closes its sockets."""
    for watcher in list(watchers):
        watcher.stop()
    watchers.clear()


def start_watchers(pool_ref: weakref.ref[WatchingPool[Any]]) -> None:
    """A callback of the hub's next turn: watch the entries that went idle since the turn before."""
    pool = pool_ref()
    if pool is None:
        return
    pending, pool._to_watch = pool._to_watch, []
    try:
        for entry in pending:
            if entry.watching != TO_WATCH:
                continue  # taken out of the pool meanwhile, or watched already
            if entry.loan is not IN_POOL:
                entry.watching = UNWATCHED  # lent meanwhile: watched again when it comes back
            elif entry.raw.fileno() == entry.fd:
                entry.watcher.start(readable, entry.ref)
                entry.watching = WATCHED
            else:  # closed, or replaced, during its last loan
                pool._idle.remove(entry)
                entry.watching = UNWATCHED
                pool._socket_changed(entry, in_background=True)
    except Exception:
        logger.exception("pool %r: unexpected error while watching idle connections", pool.name)


def readable(entry_ref: weakref.ref[Entry[Any]]) -> None:
    """The hub's callback when an idle entry's socket became readable: judge it before anyone takes it."""
    entry = entry_ref()
    if entry is None or entry.watching != WATCHED:
        return
    pool: WatchingPool[Any] = entry.pool  # type: ignore[assignment]
    try:
        if pool._closed:
            entry.watcher.stop()
            entry.watching = UNWATCHED
            return
        if pool._judges_idle_readable():
            # The subclass judges: it may block, so not in the hub.
            entry.watcher.stop()
            entry.watching = UNWATCHED
            pool._idle.remove(entry)
            pool._checking.add(entry)
            pool._spawn("idle-readable", judge, entry)
            return
        found = look(entry.sock)
        if found is not None:
            entry.watcher.stop()
            entry.watching = UNWATCHED
            pool._idle.remove(entry)
            drop(pool, entry, found)
    except Exception:
        logger.exception("pool %r: unexpected error while watching an idle connection", pool.name)


def judge(pool_ref: weakref.ref[WatchingPool[Any]], entry: Entry[Any]) -> None:
    """Ask the subclass's ``_idle_readable`` about an idle connection whose socket became readable."""
    pool = pool_ref()
    if pool is None:
        return
    try:
        keep = pool._bounded(pool.connect_timeout, "_idle_readable()", pool._idle_readable, entry.conn)
    except BaseException as error:
        if pool._stopping():
            raise
        logger.debug("pool %r: _idle_readable() raised %r", pool.name, error, exc_info=error)
        keep = False
    finally:
        pool._checking.discard(entry)
    if keep or pool._closed:
        pool._release(entry)  # idle again, watched; or closed, if the pool is
    else:
        drop(pool, entry, ERROR)


def drop(pool: WatchingPool[Any], entry: Entry[Any], found: str) -> None:
    """Close an idle connection that :func:`look` found done, and open its replacement."""
    now = _now()
    if found == DATA and now - entry.opened_at < FRESH:
        # A greeting nobody read: a failed connect, retried with backoff.
        if now - pool._early_data_at > 2 * pool.RECONNECT_MAX_DELAY:
            pool._early_data_streak = 0
        pool._early_data_streak += 1
        pool._early_data_at = now
        pool._failed_connects += 1
        log = logger.warning if pool._early_data_streak == 1 else logger.debug
        log(
            "pool %r: a new connection received data nobody asked for; dropping it and retrying with backoff"
            " (read the server's greeting in _new_connection(), or override _idle_readable() if the server"
            " writes on idle connections)",
            pool.name,
        )
        pool._close_and_replace(entry, in_background=True, after_failures=pool._early_data_streak)
        return
    if found == DATA:
        pool._discarded += 1
    else:
        pool._closed_while_idle += 1
    pool._idle_closures[found] = pool._idle_closures.get(found, 0) + 1
    if pool._closure_report is None:
        pool._closure_report = pool._loop.timer(REPORT_AFTER)
        pool._closure_report.start(report_closures, weakref.ref(pool))
    pool._close_and_replace(entry, in_background=True)


def report_closures(pool_ref: weakref.ref[WatchingPool[Any]]) -> None:
    """Log, in one line, the idle connections dropped in one burst (a server restart closes them all)."""
    pool = pool_ref()
    if pool is None:
        return
    report, pool._closure_report = pool._closure_report, None
    if report is not None:
        report.close()
    counts, pool._idle_closures = pool._idle_closures, {}
    total = sum(counts.values())
    if total:
        logger.warning(
            "pool %r: dropped %d idle connection%s that the remote end closed or wrote to (%s); replacing %s",
            pool.name,
            total,
            "" if total == 1 else "s",
            ", ".join(f"{why}: {n}" for why, n in sorted(counts.items())),
            "it" if total == 1 else "them",
        )
