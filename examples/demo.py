"""A self-contained tour of geventconnpool: a local line server, a pool of three connections, failures.

Run it from a checkout::

    python -m pip install -e .
    python examples/demo.py

It starts a tiny line-protocol server on 127.0.0.1 (a free port), fills a pool
of three connections to it, runs ten requests from ten greenlets at once, and
prints what happened at each step of two failures:

- the server cuts a connection under a request: the request fails with
  ``ConnectionError``, the pool discards that connection, and ``retry`` runs
  the request again on another one.  This is what ``retry`` is for: nothing
  could tell beforehand that the connection would break.
- the server restarts while the three connections are idle: the pool sees
  each one closed as soon as it happens (it watches idle connections), drops
  them and opens new ones, so the requests that follow the restart all
  succeed, without any retry.

It exits with status 0 in a second or two.
"""

from __future__ import annotations

import sys
from typing import Dict, List, Optional, Tuple

import gevent
from gevent import socket
from gevent.server import StreamServer

from geventconnpool import ConnectionPool, retry


class LineServer:
    """A server on 127.0.0.1: ``PING`` answers ``PONG``, ``ECHO x`` answers ``x``; one reply line each."""

    def __init__(self) -> None:
        self.accepted = 0
        self.open: Dict[Tuple[str, int], socket.socket] = {}
        self.address: Tuple[str, int] = ("127.0.0.1", 0)  # a free port the first time, then the same one
        self.server: Optional[StreamServer] = None

    def start(self) -> None:
        server = StreamServer(self.address, lambda sock, client: self.handle(server, sock, client))
        server.start()
        self.server, self.address = server, server.address

    def stop(self) -> None:
        """Stop listening and close every connection, as the server's process does when it exits."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        for client in list(self.open):
            self.cut(client)

    def handle(self, server: StreamServer, sock: socket.socket, address: Tuple[str, int]) -> None:
        if server.closed:
            return  # accepted just before the server stopped: closed unanswered, like the others
        self.accepted += 1
        self.open[address] = sock
        try:
            for line in sock.makefile("rb"):
                command = line.rstrip(b"\r\n")
                reply = b"PONG" if command == b"PING" else command.removeprefix(b"ECHO ")
                sock.sendall(reply + b"\n")
        except OSError:
            pass
        finally:
            del self.open[address]
            sock.close()

    def cut(self, client: Tuple[str, int]) -> None:
        """Close the connection from ``client`` on the server side, like a restarted load balancer."""
        self.open[client].shutdown(socket.SHUT_RDWR)


def read_line(sock: socket.socket) -> bytes:
    """Read one reply line (without its newline); a closed connection is a ConnectionError."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1024)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data[:-1]


class LinePool(ConnectionPool[socket.socket]):
    """The whole subclass API most protocols need: how to open one connection."""

    def __init__(self, address: Tuple[str, int], size: int) -> None:
        self.address = address
        super().__init__(size, timeout=5.0, name="demo")

    def _new_connection(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=5)


def main() -> int:
    server = LineServer()
    server.start()
    address = server.address
    print(f"server listening on {address[0]}:{address[1]}")

    with LinePool(address, 3) as pool:
        pool.wait(timeout=5)
        print(f"pool filled: {pool.stats().opened} connections opened; {pool!r}")

        def echo(text: str) -> str:
            with pool.get() as c:
                c.sendall(b"ECHO " + text.encode() + b"\n")
                return read_line(c).decode()

        jobs = [gevent.spawn(echo, f"hello {i}") for i in range(10)]
        gevent.joinall(jobs, timeout=10, raise_error=True)
        replies = [job.value for job in jobs]
        print(f"10 greenlets, 3 connections: {len(replies)} replies, e.g. {replies[0]!r} .. {replies[-1]!r}")

        used: List[Tuple[str, int]] = []

        @retry(max_failures=1)
        def echo_with_a_cut(text: str) -> str:
            with pool.get() as c:
                used.append(c.getsockname())
                if len(used) == 1:
                    server.cut(c.getsockname())  # the server closes this very connection
                c.sendall(b"ECHO " + text.encode() + b"\n")
                return read_line(c).decode()  # ConnectionError on the cut connection

        reply = echo_with_a_cut("after the cut")
        print(
            f"the server cut connection {used[0][1]} under a request: the pool discarded it and retry "
            f"ran the request again on connection {used[-1][1]} -> {reply!r} ({len(used)} attempts)"
        )

        pool.wait(timeout=5)
        before = pool.stats()
        print(
            f"pool full again: idle={before.idle} opened={before.opened} discarded={before.discarded} "
            f"checkouts={before.checkouts}"
        )

        server.stop()
        gevent.sleep(0.2)  # the server takes a moment to come back; meanwhile the pool drops its connections
        server.start()

        def request_succeeds(i: int) -> bool:
            """One request, without retry: does it get its reply?"""
            try:
                return echo(f"after the restart {i}") == f"after the restart {i}"
            except OSError:
                return False

        jobs = [gevent.spawn(request_succeeds, i) for i in range(20)]
        gevent.joinall(jobs, timeout=10)
        failed = sum(1 for job in jobs if job.value is not True)
        pool.wait(timeout=5)
        after = pool.stats()
        replaced = after.opened - before.opened
        print(
            f"the server restarted while the pool's {before.size} connections were idle: "
            f"{len(jobs)} requests, {failed} failed; "
            f"the pool replaced {replaced} connections the server closed "
            f"(closed_while_idle={after.closed_while_idle})"
        )
    print(f"pool closed: {pool!r}")
    server.stop()
    if failed:
        print("FAILED: requests failed after the restart")
        return 1
    print("demo finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
