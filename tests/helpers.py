"""Helpers shared by the tests: waiting on conditions, counting resources, a real line server."""

from __future__ import annotations

import contextlib
import gc
import os
import time
import warnings
from typing import Callable, Iterator, List, Optional, Set, Tuple, TypeVar

import gevent
import greenlet
from gevent import select, socket
from gevent.event import Event
from gevent.server import StreamServer

from geventconnpool import ConnectionPool

C = TypeVar("C")
S = TypeVar("S")


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 5.0,
    interval: float = 0.002,
    message: Optional[Callable[[], str]] = None,
) -> None:
    """Yield to other greenlets until ``predicate()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            detail = message() if message else getattr(predicate, "__name__", "condition")
            raise AssertionError(f"not true within {timeout} s: {detail}")
        gevent.sleep(interval)


# What Python 3.12+ says when a process that has other threads forks.
FORK_WARNING = (
    r"This process \(pid=\d+\) is multi-threaded, use of fork\(\) may lead to deadlocks in the child"
)


def only_gevent_pool_threads() -> bool:
    """Whether each OS thread of this process but the main one is a worker of gevent's thread pool.

    gevent's default resolver runs getaddrinfo() in that pool, so the first
    name lookup of a test (``create_connection``) starts a worker, which then
    idles, waiting for work, for the rest of the run.
    """
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        return False  # no /proc to count them: unknown
    return threads - 1 <= gevent.get_hub().threadpool.size


@contextlib.contextmanager
def starting_a_program() -> Iterator[None]:
    """Start a program (a subprocess: fork, then exec) inside this block.

    Python 3.12+ warns when a process with threads forks: the child could
    block on a lock that another thread held at the time.  The warning is
    silenced here only when the other threads are gevent's thread-pool
    workers, because that cannot happen with a child that execs at once: it
    takes no lock of theirs before it becomes the new program.  With any other
    thread (one a test forgot to stop, say) the warning stays, and conftest's
    ``fork_warnings_fail`` fails the test.
    """
    known_and_harmless = only_gevent_pool_threads()
    with warnings.catch_warnings():
        if known_and_harmless:
            warnings.filterwarnings("ignore", FORK_WARNING, DeprecationWarning)
        yield


def open_fds() -> Set[str]:
    """The process's open file descriptors, as /proc/self/fd names them (with their targets)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass  # the descriptor used by listdir itself
    return found


def pool_greenlets() -> Set[greenlet.greenlet]:
    """The live greenlets started by any pool (their names start with 'geventconnpool')."""
    return {
        g
        for g in gc.get_objects()
        if isinstance(g, gevent.Greenlet)
        and not g.dead
        and str(getattr(g, "name", "")).startswith("geventconnpool")
    }


def local_port(sock: socket.socket) -> int:
    """The local port of a connected socket: which of the pool's connections it is, seen from the server."""
    return int(sock.getsockname()[1])


class LineServer:
    """A real TCP server on 127.0.0.1 (or another loopback ``host``) speaking a line protocol, with what a
    test needs to watch and break it.

    Commands, one per line: ``PING`` answers ``PONG``; ``ECHO x`` answers ``x``;
    ``WHO`` answers the client's port; ``QUIT`` closes the connection; anything
    else is echoed back.  The server counts the connections it accepted and
    those that ended, can be stopped and started again on the same port, and
    can cut every open connection.
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.accepted = 0
        self.closed = 0
        self.open: Set[socket.socket] = set()
        self.peers: List[Tuple[str, int]] = []
        self.commands: List[bytes] = []
        self.stalled = Event()
        self.stalled.set()  # set: answering; clear: replies are held back
        self._server: Optional[StreamServer] = None

    @property
    def address(self) -> Tuple[str, int]:
        return (self.host, self.port)

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._server = StreamServer(listener, self._handle)
        self._server.start()

    def stop(self) -> None:
        """Stop listening and cut every open connection."""
        if self._server is not None:
            self.settle()
            self._server.close()
            self._server = None
        self.cut_all()

    def cut_all(self) -> None:
        """Close every open connection from the server side."""
        self.settle()
        for sock in list(self.open):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def settle(self) -> None:
        """Accept, and start serving, every connection that reached the server.

        A client's connect returns once the kernel has queued the connection;
        the server accepts it at the hub's next poll, and its handler starts a
        turn later.  ``pool.wait()`` returns the moment the client's connect
        does, so what acts on "every open connection" settles first.
        """
        server = self._server
        if server is None:
            return
        listener = server.socket
        wait_until(lambda: not select.select([listener], [], [], 0)[0], message=lambda: "accepts pending")
        gevent.sleep(0)  # the handlers of the last accepts start

    @property
    def running(self) -> bool:
        return self._server is not None

    def wait_for_accepted(self, count: int, timeout: float = 5.0) -> None:
        """Wait until ``accepted`` is ``count``.

        The server counts a connection when its handler greenlet starts, a loop
        turn after the client's connect returns: read at once after
        ``pool.wait()``, ``accepted`` may still be one short.
        """
        wait_until(lambda: self.accepted == count, timeout, message=lambda: f"accepted={self.accepted}")

    def _handle(self, sock: socket.socket, address: Tuple[str, int]) -> None:
        self.accepted += 1
        self.open.add(sock)
        self.peers.append(address)
        try:
            reader = sock.makefile("rb")
            for line in reader:
                self.commands.append(line)
                self.stalled.wait()
                reply = self.answer(line.rstrip(b"\r\n"), address)
                if reply is None:
                    break
                sock.sendall(reply + b"\n")
        except OSError:
            pass
        finally:
            self.open.discard(sock)
            self.closed += 1
            sock.close()

    def answer(self, command: bytes, address: Tuple[str, int]) -> Optional[bytes]:
        """The reply to ``command`` from the client at ``address``; None closes the connection."""
        if command == b"PING":
            return b"PONG"
        if command.startswith(b"ECHO "):
            return command[5:]
        if command == b"WHO":
            return str(address[1]).encode()
        if command == b"QUIT":
            return None
        return command


class LinePool(ConnectionPool[socket.socket]):
    """A pool of plain sockets to a :class:`LineServer`, with a PING keepalive."""

    def __init__(self, server: LineServer, size: int, *args: object, **kwargs: object) -> None:
        self.server_address = server.address
        super().__init__(size, *args, **kwargs)  # type: ignore[arg-type]

    def _new_connection(self) -> socket.socket:
        return socket.create_connection(self.server_address, timeout=5)

    def _keepalive(self, c: socket.socket) -> None:
        c.sendall(b"PING\n")
        if recv_line(c) != b"PONG":
            raise OSError("keepalive: no PONG")


def recv_line(sock: socket.socket) -> bytes:
    """Read one reply line from ``sock``; raise ConnectionError if the peer closed."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data[:-1]


def raise_in_block(pool: ConnectionPool[C], error: BaseException) -> C:
    """Raise ``error`` inside ``with pool.get() as c:``; check that it comes out unchanged; return ``c``."""
    held: List[C] = []
    try:
        with pool.get() as c:
            held.append(c)
            raise error
    except BaseException as raised:
        if raised is not error:
            raise
    return held[0]


def request(pool: ConnectionPool[socket.socket], command: bytes) -> bytes:
    """Send one command on a pooled connection and return the reply line."""
    with pool.get() as c:
        c.sendall(command + b"\n")
        return recv_line(c)


def serving(server: S) -> Iterator[S]:
    """For a fixture: start an in-process server, yield it to the test, and stop it however the test ends."""
    server.start()  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()  # type: ignore[attr-defined]
