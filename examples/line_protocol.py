"""A line protocol with an application-level PING keepalive: the example of the user guide.

Run it as a script; it starts its own server on 127.0.0.1::

    python examples/line_protocol.py [--keepalive SECONDS]

The server answers ``PING`` with ``PONG`` and ``ECHO x`` with ``x``, one line
each.  The pool pings every idle connection every ``--keepalive`` seconds
(0.3 here so that the run is short; 30 is a usual value against a firewall
that forgets connections idle for a minute), and turns TCP keepalive on for
each socket.  The keepalive is for what only a round trip can tell: a
firewall that drops an idle connection without a word, a server that hangs.

The server then restarts while the four connections are idle.  No keepalive
is needed for that: the event loop watches idle connections, and the pool
drops each one as soon as the server closes it and opens a new one, so the
requests that follow the restart all succeed, without any retry.  (A PING
that happens to be under way at that moment finds its connection closed
too: the pool discards it and opens another just the same.)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import gevent
from gevent import socket
from gevent.server import StreamServer

from geventconnpool import ConnectionPool, enable_tcp_keepalive


class PingServer:
    """The remote end: one reply line per command line, and a count of the PINGs received."""

    def __init__(self) -> None:
        self.pings = 0
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
        for sock in list(self.open.values()):
            sock.shutdown(socket.SHUT_RDWR)

    def handle(self, server: StreamServer, sock: socket.socket, address: Tuple[str, int]) -> None:
        if server.closed:
            return  # accepted just before the server stopped: closed unanswered, like the others
        self.open[address] = sock
        try:
            for line in sock.makefile("rb"):
                command = line.rstrip(b"\r\n")
                if command == b"PING":
                    self.pings += 1
                    sock.sendall(b"PONG\n")
                elif command.startswith(b"ECHO "):
                    sock.sendall(command[5:] + b"\n")
                else:
                    sock.sendall(b"ERR unknown command\n")
        except OSError:
            pass
        finally:
            del self.open[address]
            sock.close()


def read_line(sock: socket.socket) -> bytes:
    """Read one reply line, without its newline; the peer closing is a ConnectionError (an OSError)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1024)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data[:-1]


class MyPool(ConnectionPool[socket.socket]):
    """Plain TCP connections, kept alive by TCP keepalive and by an application-level PING."""

    def __init__(self, address: Tuple[str, int], size: int, keepalive: float) -> None:
        self.address = address
        super().__init__(size, keepalive=keepalive)

    def _new_connection(self) -> socket.socket:
        s = socket.create_connection(self.address, timeout=10)
        enable_tcp_keepalive(s, idle=60, interval=10, count=5)
        return s

    def _keepalive(self, c: socket.socket) -> None:
        c.sendall(b"PING\n")
        if read_line(c) != b"PONG":
            raise OSError("no PONG in reply to PING")


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` (yielding to gevent) until it is true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.01)
    return True


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keepalive", type=float, default=0.3, help="seconds between PINGs (default 0.3)")
    args = parser.parse_args(argv)
    # The pool logs on the "geventconnpool" logger: failed connects, discarded connections...
    logging.basicConfig(format="log: %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    remote = PingServer()
    remote.start()
    print(f"server listening on {remote.address[0]}:{remote.address[1]}")

    with MyPool(remote.address, 4, keepalive=args.keepalive) as pool:
        pool.wait(timeout=5)
        with pool.get() as c:
            c.sendall(b"ECHO hello\n")
            print(f"reply: {read_line(c).decode()}")

        if not wait_for(lambda: remote.pings >= 4, timeout=10):
            print(f"FAILED: only {remote.pings} PINGs in 10 s")
            return 1
        print(f"keepalive pinged the idle connections: {remote.pings} PINGs so far")

        before = pool.stats()
        remote.stop()
        gevent.sleep(0.2)  # the server takes a moment to come back; meanwhile the pool drops its connections
        remote.start()

        def request_succeeds(i: int) -> bool:
            """One request, without retry: does it get its reply?"""
            try:
                with pool.get() as c:
                    c.sendall(b"ECHO %d\n" % i)
                    return read_line(c) == b"%d" % i
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
            f"(closed_while_idle={after.closed_while_idle}, discarded={after.discarded})"
        )
    remote.stop()
    if failed:
        print("FAILED: requests failed after the restart")
        return 1
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
