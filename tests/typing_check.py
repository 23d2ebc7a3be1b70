"""What a user's typed code looks like; `mypy --strict tests/typing_check.py` must accept it.

Not a test module (pytest does not collect it): nothing here runs.  Each ``# type: ignore[code]``
marks a line that mypy must reject; under --strict (warn_unused_ignores) an ignore that is not
needed is itself an error, so these lines prove that the types are precise, not ``Any``.
"""

from __future__ import annotations

import socket
import ssl
from typing import Optional

from geventconnpool import ConnectionPool, PoolOverloaded, PoolStats, PoolTimeout, retry


class MyPool(ConnectionPool[ssl.SSLSocket]):
    """A pool of TLS sockets, typed as such."""

    def __init__(self, host: str, size: int) -> None:
        self.host = host
        self.context = ssl.create_default_context()
        super().__init__(size, (OSError,), 30, timeout=5.0, check_after=10.0, name=f"tls-{host}")

    def _new_connection(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, 443), timeout=5)
        return self.context.wrap_socket(raw, server_hostname=self.host)

    def _keepalive(self, c: ssl.SSLSocket) -> None:
        c.sendall(b"PING\r\n")

    def _close_connection(self, c: ssl.SSLSocket) -> None:
        c.unwrap().close()


def tls_version(pool: MyPool) -> str:
    with pool.get() as c:
        conn: ssl.SSLSocket = c
        version: Optional[str] = conn.version()
        not_a_str: str = c  # type: ignore[assignment]
    return version or not_a_str


def with_timeout(pool: MyPool) -> bytes:
    try:
        with pool.get(timeout=0.5) as c:
            return c.recv(10)
    except PoolTimeout:
        return b""


def stats_of(pool: MyPool) -> int:
    with MyPool("example.org", 2) as other:
        s: PoolStats = other.stats()
        closed: bool = other.closed
        other.wait(timeout=1.0)
        other.wait(timeout=1.0, min_open=1)
        other.wait(1.0, 1)  # type: ignore[call-arg]
        why: Optional[BaseException] = other.last_connect_error
        del why
        limit: Optional[int] = other.max_waiting
    return s.idle + s.in_use + s.connecting + s.overloaded + pool.stats().waiting + int(closed) + (limit or 0)


class ResettingPool(MyPool):
    """A pool that undoes a borrower's session state."""

    def _reset(self, c: ssl.SSLSocket) -> None:
        c.sendall(b"RSET\r\n")


def shed(pool: MyPool) -> bytes:
    try:
        with pool.get() as c:
            return c.recv(10)
    except PoolOverloaded as error:
        timeout: PoolTimeout = error
        return str(timeout).encode()


@retry(max_failures=3, interval=0.1, backoff=2.0, max_interval=1.0, jitter=0.5, giveup=lambda e: False)
def fetch(pool: MyPool, key: str, *, default: bytes = b"") -> bytes:
    with pool.get() as c:
        c.sendall(key.encode())
        return c.recv(100) or default


@retry
def bare(n: int) -> int:
    return n + 1


def callers(pool: MyPool) -> None:
    data: bytes = fetch(pool, "key", default=b"-")
    number: int = bare(1)
    fetch(pool, 42)  # type: ignore[arg-type]
    fetch(pool, "key", missing=True)  # type: ignore[call-arg]
    wrong: str = bare(2)  # type: ignore[assignment]
    del data, number, wrong
