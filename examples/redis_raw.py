"""A pool of raw Redis connections speaking RESP over a gevent socket.

Run it as a script; it starts its own ``redis-server`` on 127.0.0.1 (the
program must be installed), or uses one that is already running::

    python examples/redis_raw.py [--port PORT]

Each pooled connection is a :class:`RedisConnection`: a socket and a buffered
reader that send commands and parse replies (RESP2).  A Redis error reply
(``-ERR ...``) raises :class:`RedisError`, which is not in the pool's
``exc_classes``: the connection is fine and goes back to the pool.  The pool
watches the socket of each idle connection (it finds it in the connection's
``sock``), so a connection the server closes is dropped as soon as it
happens, and never handed out.

To show it, the example restarts its redis-server while the pool's four
connections are idle: the pool drops them and opens new ones, and the
requests that follow all succeed, without any retry.  With ``--port`` it
does not restart a server it did not start: it closes the pool's own
connections from the server's side with ``CLIENT KILL`` instead.

With redis-py the pool is the same, with ``redis.connection.Connection(host=...,
port=...)`` returned by ``_new_connection`` (after ``connect()``), ``c._sock``
returned by ``_socket_of`` (redis-py keeps its socket there), and
``c.disconnect()`` in ``_close_connection``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from typing import Callable, List, Optional, Union

import gevent
from gevent import socket

from geventconnpool import ConnectionPool

HOST = "127.0.0.1"
Reply = Union[None, int, bytes, str, List["Reply"]]


class RedisError(Exception):
    """Redis answered a command with an error reply; the connection itself is fine."""


class RedisConnection:
    """One Redis connection: RESP2 commands out, replies in."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = self.sock.makefile("rb")

    def execute(self, *args: Union[str, bytes, int]) -> Reply:
        parts = [arg if isinstance(arg, bytes) else str(arg).encode() for arg in args]
        request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        self.sock.sendall(request)
        return self._read_reply()

    def _read_reply(self) -> Reply:
        line = self.reader.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("Redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            if int(rest) < 0:
                return None
            data = self.reader.read(int(rest) + 2)
            if len(data) != int(rest) + 2:
                raise ConnectionError("Redis closed the connection")
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._read_reply() for _ in range(count)]
        raise ConnectionError(f"not a RESP reply: {line!r}")  # the stream is out of step: discard

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class RedisPool(ConnectionPool[RedisConnection]):
    """Redis connections; one the server closes while idle is dropped as soon as it happens."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        super().__init__(size, name="redis")

    def _new_connection(self) -> RedisConnection:
        c = RedisConnection(HOST, self.port)
        try:
            c.execute("CLIENT", "SETNAME", "geventconnpool-example")
        except BaseException:
            c.close()
            raise
        return c


class RedisServer:
    """A redis-server of the example's own, on a free loopback port, without persistence."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            self.port = probe.getsockname()[1]
        self.process: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        """Start it, and wait until it answers."""
        self.process = subprocess.Popen(
            ["redis-server", "--bind", HOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", self.directory],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                c = RedisConnection(HOST, self.port, timeout=1)
                try:
                    if c.execute("PING") == "PONG":
                        return
                finally:
                    c.close()
            except (OSError, RedisError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            gevent.sleep(0.05)

    def stop(self) -> None:
        """Stop it: it closes every connection as it exits."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        """Stop it and start it again on the same port."""
        self.stop()
        self.start()


def kill_connections_of(pool: RedisPool, port: int) -> int:
    """Close every connection of ``pool`` from the server's side (``CLIENT KILL``); return how many."""
    with ExitStack() as stack:
        ids = [stack.enter_context(pool.get()).execute("CLIENT", "ID") for _ in range(pool.size)]
    admin = RedisConnection(HOST, port)
    try:
        return sum(admin.execute("CLIENT", "KILL", "ID", i) == 1 for i in ids)
    finally:
        admin.close()


def run(port: int, restart: Optional[Callable[[], None]] = None) -> int:
    """Use the pool against Redis on ``port``; ``restart`` restarts that server, when it is ours."""
    print(f"Redis at {HOST}:{port}")
    with RedisPool(port, size=4) as pool:
        pool.wait(timeout=10)
        with pool.get() as c:
            print(f"PING -> {c.execute('PING')}; ECHO -> {c.execute('ECHO', 'hello')!r}")
            c.execute("DEL", "example:counter")

        def incr() -> Reply:
            with pool.get() as c:
                return c.execute("INCR", "example:counter")

        jobs = [gevent.spawn(incr) for _ in range(50)]
        gevent.joinall(jobs, timeout=20, raise_error=True)
        with pool.get() as c:
            counter = c.execute("GET", "example:counter")
            print(f"50 greenlets ran INCR over 4 connections: counter = {counter!r}")
            try:
                c.execute("INCR", "one", "too", "many")
            except RedisError as error:
                print(f"an error reply leaves the connection in the pool: {error}")

        before = pool.stats()
        if restart is not None:
            restart()
            event = f"redis-server restarted while the pool's {before.size} connections were idle"
        else:
            killed = kill_connections_of(pool, port)
            event = f"CLIENT KILL closed the pool's {killed} idle connections (a server not ours stays up)"
        gevent.sleep(0.1)  # the next requests arrive a moment later

        def request_succeeds() -> bool:
            """One request, without retry: does Redis answer it?"""
            try:
                with pool.get() as c:
                    return c.execute("PING") == "PONG"
            except OSError:
                return False

        jobs = [gevent.spawn(request_succeeds) for _ in range(20)]
        gevent.joinall(jobs, timeout=20)
        failed = sum(1 for job in jobs if job.value is not True)
        pool.wait(timeout=10)
        after = pool.stats()
        replaced = after.opened - before.opened
        print(
            f"{event}: {len(jobs)} requests, {failed} failed; the pool replaced {replaced} "
            f"connections the server closed (closed_while_idle={after.closed_while_idle})"
        )
    return 0 if counter == b"50" and not failed else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, help="use the redis-server already listening on 127.0.0.1:PORT")
    args = parser.parse_args(argv)
    if args.port is not None:
        status = run(args.port)
    else:
        if shutil.which("redis-server") is None:
            print("redis-server is not installed: install it, or pass --port of a running one")
            return 2
        with tempfile.TemporaryDirectory() as directory:
            server = RedisServer(directory)
            server.start()
            try:
                status = run(server.port, restart=server.restart)
            finally:
                server.stop()
    print("done" if status == 0 else "FAILED")
    return status


if __name__ == "__main__":
    sys.exit(main())
