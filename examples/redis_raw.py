"""A pool of raw Redis connections speaking RESP over a gevent socket.

Run it as a script; it starts its own ``redis-server`` on 127.0.0.1 (the
program must be installed), or uses one that is already running::

    python examples/redis_raw.py [--port PORT]

Each pooled connection is a :class:`RedisConnection`: a socket and a buffered
reader that send commands and parse replies (RESP2).  A Redis error reply
(``-ERR ...``) raises :class:`RedisError`, which is not in the pool's
``exc_classes``: the connection is fine and goes back to the pool.  The pool
watches the socket of each idle connection (it finds it in the connection's
``sock``), so a connection the server kills is dropped as soon as it happens,
and never handed out.

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
from typing import List, Optional, Tuple, Union

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


def start_redis(directory: str) -> Tuple[subprocess.Popen[bytes], int]:
    """Start redis-server on a free loopback port, without persistence, and wait until it answers."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        ["redis-server", "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", directory],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            c = RedisConnection(HOST, port, timeout=1)
            try:
                if c.execute("PING") == "PONG":
                    return process, port
            finally:
                c.close()
        except (OSError, RedisError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"redis-server did not start on port {port}")
        gevent.sleep(0.05)


def run(port: int) -> int:
    print(f"Redis at {HOST}:{port}")
    with RedisPool(port, size=4) as pool:
        pool.wait(timeout=10)
        with pool.get() as c:
            print(f"PING -> {c.execute('PING')}; ECHO -> {c.execute('ECHO', 'hello')!r}")
            c.execute("DEL", "example:counter")
            victim = c.execute("CLIENT", "ID")

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

        admin = RedisConnection(HOST, port)
        killed = admin.execute("CLIENT", "KILL", "ID", victim)
        admin.close()
        print(f"the server killed pooled connection {victim} ({killed} killed)")

        # The hub learns of the close as soon as it runs; here we wait until it has.
        deadline = time.monotonic() + 10
        while pool.stats().closed_while_idle < 1 and time.monotonic() < deadline:
            gevent.sleep(0.01)
        with ExitStack() as stack:
            held = [stack.enter_context(pool.get()) for _ in range(4)]
            pongs = [c.execute("PING") for c in held]
        stats = pool.stats()
        print(
            f"4 callers got 4 working connections {pongs}: the pool dropped the dead one while it was idle "
            f"(closed_while_idle={stats.closed_while_idle}, opened={stats.opened})"
        )
        ok = counter == b"50" and stats.closed_while_idle == 1 and pongs == ["PONG"] * 4
    return 0 if ok else 1


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
            process, port = start_redis(directory)
            try:
                status = run(port)
            finally:
                process.terminate()
                process.wait(timeout=10)
    print("done" if status == 0 else "FAILED")
    return status


if __name__ == "__main__":
    sys.exit(main())
