"""A real redis-server for the reliability tests, and the few RESP calls they need.

:class:`RedisServer` runs Debian's ``redis-server`` as a subprocess on a free
port of 127.0.0.1, with no persistence, and can stop, kill and restart it on
the same port.  :func:`call` speaks just enough RESP over a plain socket for
``PING``, ``ECHO`` and ``CLIENT LIST``; :class:`RedisPool` is a pool of such
sockets that remembers every connection it opened and closed, so that a test
can compare that with what the server (or a proxy) saw.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from typing import Dict, List, Optional, Set, Tuple, Union

import gevent
import pytest
from gevent import socket, subprocess

from geventconnpool import ConnectionPool

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def redis_available() -> bool:
    """Whether the ``redis-server`` program can be run here."""
    return os.access(REDIS_SERVER, os.X_OK)


#: Skip a test, with the reason, where redis-server is not installed.
needs_redis = pytest.mark.skipif(
    not redis_available(),
    reason=f"{REDIS_SERVER} is missing: install Debian's redis-server (.ci/run does) to run this test",
)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisError(Exception):
    """An error reply (``-ERR ...``) from the server."""


class ProtocolError(ConnectionError):
    """The bytes on the wire were not one well-formed RESP reply: the connection is unusable."""


Reply = Union[bytes, int, None, List["Reply"]]


def encode(*args: Union[str, bytes]) -> bytes:
    """A command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def call(sock: socket.socket, *args: Union[str, bytes]) -> Reply:
    """Send one command on ``sock`` and return its reply.

    :raises ConnectionError: the server closed the connection (an :exc:`OSError`).
    :raises ProtocolError: the reply is malformed, or more than one reply came.
    :raises RedisError: the server answered with an error.
    """
    sock.sendall(encode(*args))
    buffer = bytearray()
    while True:
        parsed = _parse(bytes(buffer), 0)
        if parsed is not None:
            reply, end = parsed
            if end != len(buffer):
                raise ProtocolError(f"{len(buffer) - end} unexpected bytes after the reply")
            if isinstance(reply, RedisError):
                raise reply
            return reply
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        buffer += chunk


def _parse(data: bytes, start: int) -> Optional[Tuple[Union[Reply, RedisError], int]]:
    """Parse one reply at ``start``; None while it is incomplete."""
    line_end = data.find(b"\r\n", start)
    if line_end < 0:
        return None
    kind, body, after = data[start : start + 1], data[start + 1 : line_end], line_end + 2
    if kind == b"+":
        return body, after
    if kind == b"-":
        return RedisError(body.decode(errors="replace")), after
    if kind == b":":
        return int(body), after
    if kind == b"$":
        length = int(body)
        if length < 0:
            return None, after
        if len(data) < after + length + 2:
            return None
        return data[after : after + length], after + length + 2
    if kind == b"*":
        items: List[Reply] = []
        for _ in range(int(body)):
            parsed = _parse(data, after)
            if parsed is None:
                return None
            item, after = parsed
            if isinstance(item, RedisError):
                raise ProtocolError("an error inside an array")
            items.append(item)
        return items, after
    raise ProtocolError(f"unexpected reply type {kind!r}")


class RedisServer:
    """Debian's ``redis-server`` on 127.0.0.1, run by the test as a subprocess.

    No persistence (``--save '' --appendonly no``) and its own scratch
    directory; :meth:`stop`, :meth:`kill` and :meth:`restart` keep the port.
    """

    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        self.starts = 0
        self._process: Optional[subprocess.Popen] = None
        self._dir = tempfile.mkdtemp(prefix="geventconnpool-redis-")

    @property
    def address(self) -> Tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and return once it answers PING."""
        assert not self.running, "redis-server is already running"
        self._process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                "--logfile",
                "",
                "--loglevel",
                "warning",
                "--protected-mode",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode} on port {self.port}")
            try:
                with socket.create_connection(self.address, timeout=1) as probe:
                    if call(probe, "PING") == b"PONG":
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")
            gevent.sleep(0.01)

    def stop(self) -> None:
        """Shut the server down (SIGTERM) and wait for it to exit."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the server (SIGKILL): its connections are cut without a goodbye."""
        self._end(signal.SIGKILL)

    def restart(self, kill: bool = True) -> None:
        """Kill (or stop) the server and start it again on the same port."""
        self._end(signal.SIGKILL if kill else signal.SIGTERM)
        self.start()

    def _end(self, signum: int) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def client_ports(self) -> Set[int]:
        """The client ports of the connections the server has open, not counting this query's own."""
        with socket.create_connection(self.address, timeout=5) as sock:
            me = sock.getsockname()[1]
            listing = call(sock, "CLIENT", "LIST")
        assert isinstance(listing, bytes)
        ports = set()
        for line in listing.decode().splitlines():
            fields = dict(field.split("=", 1) for field in line.split(" ") if "=" in field)
            port = int(fields["addr"].rsplit(":", 1)[1])
            if port != me:
                ports.add(port)
        return ports

    def cleanup(self) -> None:
        """Kill the server and remove its scratch directory."""
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


class TrackingPool(ConnectionPool[socket.socket]):
    """A pool of plain sockets that remembers each socket it opened and closed (by client port).

    ``address`` is where to connect; each new connection must answer PING
    (the handshake), so a remote that accepts and never answers is a failed
    connect, not a pooled connection.  Subclasses may swap :meth:`ping` for
    another protocol.
    """

    address: Tuple[str, int] = ("127.0.0.1", 0)
    io_timeout: Optional[float] = 5.0

    def __init__(self, address: Tuple[str, int], size: int, *args: object, **kwargs: object) -> None:
        self.address = address
        self.sockets: List[socket.socket] = []  # every connection opened, kept so that no id is reused
        self.opened_ports: List[int] = []  # their client ports (a port may come back later)
        self.closed_ports: List[int] = []  # the client ports of those handed to _close_connection
        self._port_of: Dict[int, int] = {}
        self._closed_ids: Set[int] = set()
        super().__init__(size, *args, **kwargs)  # type: ignore[arg-type]

    def ping(self, c: socket.socket) -> None:
        """One PING; raise ConnectionError unless PONG comes back."""
        if call(c, "PING") != b"PONG":
            raise ProtocolError("no PONG")

    def _new_connection(self) -> socket.socket:
        c = socket.create_connection(self.address, timeout=self.io_timeout)
        try:
            self.ping(c)  # switches
        except BaseException:
            c.close()
            raise
        port = c.getsockname()[1]
        self.opened_ports.append(port)
        self.sockets.append(c)
        self._port_of[id(c)] = port
        return c

    def _keepalive(self, c: socket.socket) -> None:
        self.ping(c)

    def _close_connection(self, c: socket.socket) -> None:
        self.closed_ports.append(self._port_of[id(c)])
        self._closed_ids.add(id(c))
        c.close()

    def owned_ports(self) -> Set[int]:
        """Client ports of the connections the pool opened and has not closed."""
        return {self._port_of[id(c)] for c in self.sockets if id(c) not in self._closed_ids}


class RedisPool(TrackingPool):
    """A :class:`TrackingPool` in front of redis (directly or through a proxy)."""


def echo(pool: ConnectionPool[socket.socket], token: str) -> bytes:
    """ECHO ``token`` on a pooled connection; return the reply."""
    with pool.get() as c:
        reply = call(c, "ECHO", token)
    assert isinstance(reply, bytes)
    return reply
