"""The rows of the benchmark: this library, the peer pools and the reference designs, behind one interface.

Every row is an :class:`Adapter`.  It opens a pool of ``size`` connections
made by ``connect`` (a callable returning a connected gevent socket) and
offers, in that pool's own idiom:

- ``checkout_loop(n)``: ``n`` checkouts with an empty body (scenario 1);
- ``ping()``: one PING/PONG round trip on a borrowed connection, discarding
  the connection the way that library wants when the round trip fails;
- ``checkout()``: a context manager lending one connection (memory scenario).

A peer that cannot be imported or does not work on this Python under gevent
raises :class:`Unavailable` from ``open()``, with the reason; the benchmark
prints it and drops the row.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Tuple, Type

import gevent
import gevent.queue
from servers import PING, PONG

Connect = Callable[[], Any]


class Unavailable(Exception):
    """This row cannot run here; the message says why."""


def not_installed(distribution: str, error: ImportError) -> Unavailable:
    """Why ``distribution`` cannot be imported: pip's reason when the venv could not install it."""
    try:
        with open(os.path.join(sys.prefix, ".peers-not-installed")) as f:
            for line in f:
                if line.lower().startswith(distribution.lower()):
                    return Unavailable(f"not installed in the benchmark's venv: {line.strip()}")
    except OSError:
        pass
    return Unavailable(f"cannot import it: {error}")


def roundtrip(c: Any) -> None:
    """Send a PING, read the +PONG; raise OSError on anything else."""
    c.sendall(PING)
    data = c.recv(64)
    while len(data) < 7:
        more = c.recv(64)
        if not more:
            raise ConnectionError("redis closed the connection")
        data += more
    if data != PONG:
        raise ConnectionError(f"unexpected reply {data!r}")


def _version(distribution: str) -> str:
    try:
        from importlib.metadata import version

        return version(distribution)
    except Exception:
        return ""


def _close(c: Any) -> None:
    try:
        c.close()
    except Exception:
        pass


class Adapter:
    name = "?"
    #: A one-line remark printed under the table (how the row was configured).
    note = ""
    kind = "peer"  # "lib", "peer" or "ref"

    def open(self, size: int, connect: Connect, **options: Any) -> None:
        raise NotImplementedError

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the pool holds its connections (for those that open them eagerly)."""

    def checkout_loop(self, n: int) -> None:
        raise NotImplementedError

    def ping(self) -> None:
        raise NotImplementedError

    def checkout(self) -> ContextManager[Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


# -- this library ---------------------------------------------------------------


class GeventConnPool(Adapter):
    kind = "lib"

    def __init__(self, label: str = "geventconnpool", **features: Any) -> None:
        self.name = label
        self.features = features

    def open(self, size: int, connect: Connect, **options: Any) -> None:
        from geventconnpool import ConnectionPool

        class Pool(ConnectionPool[Any]):
            def _new_connection(self) -> Any:
                return connect()

            def _keepalive(self, c: Any) -> None:
                roundtrip(c)

        kwargs = dict(self.features)
        kwargs.update(options)
        self.pool = Pool(size, **kwargs)

    def wait_ready(self, timeout: float = 10.0) -> None:
        self.pool.wait(timeout)

    def checkout_loop(self, n: int) -> None:
        get = self.pool.get
        for _ in range(n):
            with get() as _c:
                pass

    def ping(self) -> None:
        with self.pool.get() as c:
            roundtrip(c)

    def checkout(self) -> ContextManager[Any]:
        return self.pool.get()

    def close(self) -> None:
        self.pool.close()


# -- reference designs ------------------------------------------------------------


class BareQueue(Adapter):
    """A gevent.queue.Queue of connections: get() and put(), nothing else."""

    name = "bare Queue get+put"
    kind = "ref"
    note = "gevent.queue.Queue holding the connections; q.get() then q.put(c), no context manager"

    def open(self, size: int, connect: Connect, **options: Any) -> None:
        self.q: gevent.queue.Queue[Any] = gevent.queue.Queue()
        self.conns = [connect() for _ in range(size)]
        for c in self.conns:
            self.q.put(c)

    def checkout_loop(self, n: int) -> None:
        q = self.q
        get = q.get
        put = q.put
        for _ in range(n):
            c = get()
            put(c)

    def ping(self) -> None:
        q = self.q
        c = q.get()
        try:
            roundtrip(c)
        finally:
            q.put(c)

    def checkout(self) -> ContextManager[Any]:
        @contextlib.contextmanager
        def lend() -> Iterator[Any]:
            c = self.q.get()
            try:
                yield c
            finally:
                self.q.put(c)

        return lend()

    def close(self) -> None:
        for c in self.conns:
            _close(c)


class Design021(Adapter):
    """The 0.2.1 design: a gevent.queue.Queue behind contextlib.contextmanager, replacements retried."""

    name = "0.2.1 design"
    kind = "ref"
    note = (
        "gevent.queue.Queue behind @contextlib.contextmanager; a broken connection is dropped"
        " and a greenlet retries its replacement every 0.1 s"
    )

    def open(self, size: int, connect: Connect, **options: Any) -> None:
        self.q: gevent.queue.Queue[Any] = gevent.queue.Queue()
        self.connect = connect
        self.greenlets: List[gevent.Greenlet] = [gevent.spawn(self._add_one) for _ in range(size)]
        self.exc_classes: Tuple[Type[BaseException], ...] = (OSError,)
        self.timeout = options.get("timeout")

    def _add_one(self) -> None:
        while True:
            try:
                c = self.connect()
            except OSError:
                gevent.sleep(0.1)
                continue
            self.q.put(c)
            return

    def wait_ready(self, timeout: float = 10.0) -> None:
        with gevent.Timeout(timeout):
            while self.q.qsize() < len(self.greenlets):
                gevent.sleep(0.005)

    @contextlib.contextmanager
    def get(self) -> Iterator[Any]:
        c = self.q.get(timeout=self.timeout)
        try:
            yield c
        except self.exc_classes:
            _close(c)
            self.greenlets.append(gevent.spawn(self._add_one))
            raise
        except BaseException:
            self.q.put(c)
            raise
        else:
            self.q.put(c)

    def checkout_loop(self, n: int) -> None:
        get = self.get
        for _ in range(n):
            with get() as _c:
                pass

    def ping(self) -> None:
        with self.get() as c:
            roundtrip(c)

    def checkout(self) -> ContextManager[Any]:
        return self.get()

    def close(self) -> None:
        gevent.killall(self.greenlets)
        while not self.q.empty():
            _close(self.q.get())


class NullWith(Adapter):
    """A ``with`` statement on a ready-made object: the floor of any context-manager API."""

    name = "with on a ready object"
    kind = "ref"
    note = "with obj as c: pass, where obj.__enter__ returns a constant and __exit__ does nothing"

    class _CM:
        __slots__ = ()

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: object) -> None:
            return None

    def open(self, size: int, connect: Connect, **options: Any) -> None:
        self.cm = self._CM()

    def checkout_loop(self, n: int) -> None:
        cm = self.cm
        for _ in range(n):
            with cm as _c:
                pass

    def close(self) -> None:
        pass


class Dedicated(Adapter):
    """No pool: every greenlet has a connection of its own, opened once."""

    name = "dedicated connection"
    kind = "ref"
    note = "no pool: each greenlet opens one connection before the clock starts and keeps it"

    def open(self, size: int, connect: Connect, **options: Any) -> None:
        import weakref

        self.connect = connect
        self.mine: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self.all: List[Any] = []

    def prepare(self) -> None:
        """Open this greenlet's connection (called by each worker before the clock starts)."""
        c = self.connect()
        self.mine[gevent.getcurrent()] = c
        self.all.append(c)

    def ping(self) -> None:
        me = gevent.getcurrent()
        c = self.mine.get(me)
        if c is None:
            c = self.mine[me] = self.connect()
            self.all.append(c)
        try:
            roundtrip(c)
        except BaseException:
            del self.mine[me]
            _close(c)
            raise

    def close(self) -> None:
        for c in self.all:
            _close(c)


class Fresh(Adapter):
    """No pool: a new connection for every request, closed after it."""

    name = "fresh connection per request"
    kind = "ref"
    note = "no pool: connect, PING, close, for every request"

    def open(self, size: int, connect: Connect, **options: Any) -> None:
        self.connect = connect

    def ping(self) -> None:
        c = self.connect()
        try:
            roundtrip(c)
        finally:
            c.close()

    def close(self) -> None:
        pass


# -- peers ----------------------------------------------------------------------


class _DBAPIConn:
    """What SQLAlchemy's pool expects from a DBAPI connection, around a socket."""

    __slots__ = ("sock",)

    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        self.sock.close()


class SQLAlchemyQueuePool(Adapter):
    name = "SQLAlchemy QueuePool"
    note = (
        "sqlalchemy.pool.QueuePool(pool_size=size, max_overflow=0, reset_on_return=None);"
        " invalidate() on a failed request"
    )

    def open(self, size: int, connect: Connect, **options: Any) -> None:
        try:
            import sqlalchemy
            from sqlalchemy.pool import QueuePool
        except ImportError as e:
            raise not_installed("SQLAlchemy", e) from None
        self.version = sqlalchemy.__version__
        self.name = f"SQLAlchemy {self.version} QueuePool"
        timeout = options.get("timeout") or 30.0
        self.pool = QueuePool(
            lambda: _DBAPIConn(connect()),
            pool_size=size,
            max_overflow=0,
            timeout=timeout,
            reset_on_return=None,
        )

    def checkout_loop(self, n: int) -> None:
        connect = self.pool.connect
        for _ in range(n):
            c = connect()
            c.close()

    def ping(self) -> None:
        fairy = self.pool.connect()
        try:
            roundtrip(fairy.dbapi_connection.sock)
        except OSError as e:
            fairy.invalidate(e)
            raise
        finally:
            fairy.close()

    def checkout(self) -> ContextManager[Any]:
        return contextlib.closing(self.pool.connect())

    def close(self) -> None:
        self.pool.dispose()


class GSocketPool(Adapter):
    name = "gsocketpool"
    note = (
        "gsocketpool.Pool(max_connections=size, initial_connections=size); no waiting queue:"
        " a caller that finds no connection sleeps 0.1 s and retries 10 times, then fails; a broken"
        " connection is closed and reopened on its next use"
    )

    def open(self, size: int, connect: Connect, **options: Any) -> None:
        try:
            import gsocketpool
            from gsocketpool.connection import Connection
        except ImportError as e:
            raise not_installed("gsocketpool", e) from None

        class SockConnection(Connection):  # type: ignore[misc]
            def __init__(self) -> None:
                self.sock: Any = None

            def open(self) -> None:
                self.sock = connect()

            def close(self) -> None:
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None

            def get(self) -> Any:
                return self.sock

            def is_connected(self) -> bool:
                return self.sock is not None

        def factory() -> SockConnection:
            c = SockConnection()
            c.open()
            return c

        self.name = f"gsocketpool {_version('gsocketpool')}".strip()
        self.pool = gsocketpool.Pool(
            factory, {}, initial_connections=size, max_connections=size, reap_expired_connections=False
        )

    def checkout_loop(self, n: int) -> None:
        connection = self.pool.connection
        for _ in range(n):
            with connection() as _c:
                pass

    def ping(self) -> None:
        # Its drop() refuses a connection in use, so a broken one is closed and reopened on its next use.
        conn = self.pool.acquire()
        try:
            if not conn.is_connected():
                conn.open()
            roundtrip(conn.sock)
        except BaseException:
            conn.close()
            raise
        finally:
            self.pool.release(conn)

    def checkout(self) -> ContextManager[Any]:
        return self.pool.connection()  # type: ignore[no-any-return]

    def close(self) -> None:
        for conn in list(self.pool._pool) + list(self.pool._using):
            conn.close()


class SocketPool(Adapter):
    name = "socketpool"
    note = (
        "socketpool.ConnectionPool(backend='gevent', max_size=size); max_size bounds only the idle"
        " connections kept: a caller that finds none opens a new connection"
    )

    def open(self, size: int, connect: Connect, **options: Any) -> None:
        try:
            from socketpool import ConnectionPool
            from socketpool.conn import Connector
        except ImportError as e:
            raise not_installed("socketpool", e) from None
        except Exception as e:  # socketpool is from 2013: any error on import means it does not work here
            raise Unavailable(f"importing it fails on this Python: {e!r}") from None
        from socketpool import util

        class SockConnector(Connector):  # type: ignore[misc]
            def __init__(self, backend_mod: Any = None, pool: Any = None, **_: Any) -> None:
                import time

                self._s = connect()
                self._connected = True
                self._life = time.time()
                self._pool = pool

            def matches(self, **match_options: Any) -> bool:
                return True

            def is_connected(self) -> bool:
                return self._connected and bool(util.is_connected(self._s))

            def handle_exception(self, exception: BaseException) -> None:
                self.invalidate()

            def get_lifetime(self) -> float:
                return self._life

            def invalidate(self) -> None:
                self._s.close()
                self._connected = False
                self._life = -1

        self.name = f"socketpool {_version('socketpool')}".strip()
        self.pool = ConnectionPool(
            factory=SockConnector,
            backend="gevent",
            max_size=size,
            reap_connections=False,
            max_lifetime=3600.0,
        )
        # Fill it with `size` idle connections, as the other pools are.
        held = [self.pool.get() for _ in range(size)]
        for c in held:
            self.pool.release_connection(c)

    def checkout_loop(self, n: int) -> None:
        connection = self.pool.connection
        for _ in range(n):
            with connection() as _c:
                pass

    def ping(self) -> None:
        conn = self.pool.get()
        try:
            roundtrip(conn._s)
        except OSError:
            conn.invalidate()
            raise
        finally:
            self.pool.release_connection(conn)

    def checkout(self) -> ContextManager[Any]:
        return self.pool.connection()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.pool.release_all()


class GenericConnectionPool(Adapter):
    name = "generic-connection-pool"
    note = (
        "generic_connection_pool.threading.ConnectionPool(min_idle=size, max_size=size) with a TCP socket"
        " manager checking aliveness at checkout (gevent-patched threading)"
    )

    def open(self, size: int, connect: Connect, **options: Any) -> None:
        try:
            from generic_connection_pool.contrib.socket import SocketAlivenessCheckingMixin
            from generic_connection_pool.threading import BaseConnectionManager, ConnectionPool
        except ImportError as e:
            raise not_installed("generic-connection-pool", e) from None
        try:
            from importlib.metadata import version

            self.name = f"generic-connection-pool {version('generic-connection-pool')}"
        except Exception:
            pass

        class Manager(SocketAlivenessCheckingMixin[str], BaseConnectionManager[str, Any]):  # type: ignore[misc]
            def create(self, endpoint: str, timeout: Optional[float] = None) -> Any:
                return connect()

            def dispose(self, endpoint: str, conn: Any, timeout: Optional[float] = None) -> None:
                conn.close()

        timeout = options.get("timeout")
        self.pool = ConnectionPool(
            Manager(),
            min_idle=size,
            max_size=size,
            total_max_size=size,
            acquire_timeout=timeout,
            idle_timeout=3600.0,
            max_lifetime=3600.0,
        )
        self.endpoint = "redis"
        held = [self.pool.acquire(self.endpoint) for _ in range(size)]
        for c in held:
            self.pool.release(c, self.endpoint)

    def checkout_loop(self, n: int) -> None:
        connection = self.pool.connection
        endpoint = self.endpoint
        for _ in range(n):
            with connection(endpoint) as _c:
                pass

    def ping(self) -> None:
        conn = self.pool.acquire(self.endpoint)
        try:
            roundtrip(conn)
        finally:
            # No public discard: its aliveness check (a MSG_PEEK at checkout) drops a dead one.
            self.pool.release(conn, self.endpoint)

    def checkout(self) -> ContextManager[Any]:
        return self.pool.connection(self.endpoint)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.pool.close()


def peer_rows() -> List[Adapter]:
    return [SQLAlchemyQueuePool(), GSocketPool(), SocketPool(), GenericConnectionPool()]


def describe(rows: List[Adapter]) -> Dict[str, str]:
    return {r.name: r.note for r in rows if r.note}
