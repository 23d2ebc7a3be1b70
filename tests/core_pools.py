"""Pool subclasses shared by the core tests (issue 2): they record what the pool did with its hooks."""

from __future__ import annotations

from typing import Any, Callable, List

from gevent import socket
from helpers import LinePool, LineServer, recv_line

from geventconnpool import ConnectionPool


class RecordingLinePool(LinePool):
    """A :class:`LinePool` that keeps every socket it opened and every one it was asked to close.

    ``calls`` counts the calls of ``_new_connection`` as they begin, ``created``
    holds the sockets returned, ``dropped`` the objects handed to
    ``_close_connection`` (which then closes them as the default does).
    """

    def __init__(self, server: LineServer, size: int, *args: Any, **kwargs: Any) -> None:
        self.calls = 0
        self.created: List[socket.socket] = []
        self.dropped: List[Any] = []
        super().__init__(server, size, *args, **kwargs)

    def _new_connection(self) -> socket.socket:
        self.calls += 1
        sock = super()._new_connection()
        self.created.append(sock)
        return sock

    def _close_connection(self, c: Any) -> None:
        self.dropped.append(c)
        super()._close_connection(c)


class TaggedKeepalivePool(RecordingLinePool):
    """A pool whose keepalive sends ``KA <local port>``: the server's log says which connection was pinged."""

    def _keepalive(self, c: socket.socket) -> None:
        tag = ka_tag(c)
        c.sendall(tag)
        if recv_line(c) + b"\n" != tag:
            raise OSError("keepalive: wrong reply")


def ka_tag(c: socket.socket) -> bytes:
    """The keepalive command line that :class:`TaggedKeepalivePool` sends on ``c``."""
    return b"KA %d\n" % c.getsockname()[1]


def pings(server: LineServer, c: socket.socket) -> int:
    """How many keepalive pings the server received on the connection ``c``."""
    return server.commands.count(ka_tag(c))


class FactoryPool(ConnectionPool[Any]):
    """A pool of black-box objects made by ``factory()``; records the objects made and closed."""

    RECONNECT_DELAY = 0.005
    RECONNECT_MAX_DELAY = 0.02

    def __init__(self, size: int, factory: Callable[[], Any], *args: Any, **kwargs: Any) -> None:
        self.factory = factory
        self.calls = 0
        self.created: List[Any] = []
        self.dropped: List[Any] = []
        super().__init__(size, *args, **kwargs)

    def _new_connection(self) -> Any:
        self.calls += 1
        conn = self.factory()
        if conn is not None:
            self.created.append(conn)
        return conn

    def _close_connection(self, c: Any) -> None:
        self.dropped.append(c)
        super()._close_connection(c)


def holds(seq: List[Any], obj: Any) -> bool:
    """Whether ``obj`` itself (by identity, not equality) is in ``seq``."""
    return any(x is obj for x in seq)


#: Pool options that switch the pool onto each of its internal lending paths, with periods long
#: enough that no check or recycling happens during a test: the documented behaviour must not depend
#: on them.
FLAVOURS = {
    "plain": {},
    "keepalive": {"keepalive": 60},
    "check_after": {"check_after": 60},
    "leak_warning": {"leak_warning": 60},
    "max_lifetime": {"max_lifetime": 600},
}
