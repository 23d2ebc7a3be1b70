"""Opening connections: all at once in the background, retried after any failure, bounded by
connect_timeout; wait(); and what get() says during an outage, with and without fail_fast.
"""

from __future__ import annotations

import logging
import time
from typing import Any, List

import gevent
import pytest
from doubles import Conn, ControlFlow, FakePool, FalsyConn, FastLinePool, FastReconnect
from faultproxy import FaultProxy
from gevent import socket
from helpers import LinePool, LineServer, recv_line, request, wait_until

from geventconnpool import ConnectionPool, PoolClosed, PoolError, PoolTimeout, PoolUnavailable

# -- opening ---------------------------------------------------------------------------------------


class HandshakePool(FastLinePool):
    """A pool whose connections need a HELLO exchange first, like a login; counts the handshakes in flight."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.in_flight = 0
        self.most_in_flight = 0
        super().__init__(*args, **kwargs)

    def _new_connection(self) -> socket.socket:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            sock = super()._new_connection()
            try:
                sock.sendall(b"HELLO\n")
                if recv_line(sock) != b"HELLO":
                    raise OSError("bad greeting")
            except BaseException:
                sock.close()
                raise
            return sock
        finally:
            self.in_flight -= 1


def test_construction_does_not_block_and_opens_all_connections_at_once(line_server, leak_check):
    """The constructor returns before any connection opens, and all `size` handshakes run at once."""
    line_server.stalled.clear()  # every handshake now waits for the server's answer
    with HandshakePool(line_server, 50) as pool:
        assert line_server.accepted == 0
        assert pool.stats().connecting == 50
        assert "size=50 idle=0 in_use=0 connecting=50" in repr(pool)
        assert pool.stats().idle == 0
        # All 50 are mid-handshake together: impossible if they were opened one after another.
        wait_until(lambda: len(line_server.commands) == 50, timeout=10)
        assert line_server.accepted == 50
        assert pool.most_in_flight == 50
        assert pool.stats().idle == 0
        line_server.stalled.set()
        # 0.2.1 staggered the opens 0.1 s apart: 5 s for 50.  In parallel they all land together.
        pool.wait(timeout=2.5)
        stats = pool.stats()
        assert (stats.idle, stats.opened, stats.connecting, stats.failed_connects) == (50, 50, 0, 0)
    leak_check()


class LateConfiguredPool(ConnectionPool):
    """A pool that sets what _new_connection needs after calling ConnectionPool.__init__, a common style."""

    def __init__(self, server, size):
        super().__init__(size)
        self.server_address = server.address

    def _new_connection(self):
        return socket.create_connection(self.server_address, timeout=5)


def test_attributes_set_after_super_init_are_seen_by_new_connection(line_server, leak_check):
    """The constructor only schedules the connects: attributes set after super().__init__() are in place."""
    with LateConfiguredPool(line_server, 3) as pool:
        pool.wait(timeout=5)
        assert request(pool, b"ECHO late") == b"late"
        stats = pool.stats()
        assert (stats.idle, stats.failed_connects) == (3, 0)
        assert line_server.accepted == 3
    leak_check()


def test_wait_fills_the_pool(line_server, leak_check):
    """wait() returns once all size connections are open, and a borrowed one answers."""
    with LinePool(line_server, 4) as pool:
        pool.wait(timeout=5)
        s = pool.stats()
        assert (s.idle, s.opened, s.connecting) == (4, 4, 0)
        line_server.wait_for_accepted(4)
        assert request(pool, b"PING") == b"PONG"
    leak_check()


def test_wait_raises_pool_timeout_or_pool_closed(line_server, leak_check):
    """wait() raises PoolTimeout when the pool cannot fill in time, and PoolClosed once it is closed."""
    line_server.stop()
    with FastLinePool(line_server, 2) as pool:
        started = time.monotonic()
        with pytest.raises(PoolTimeout, match="did not open all 2"):
            pool.wait(timeout=0.1)
        assert time.monotonic() - started >= 0.1
        pool.close()
        with pytest.raises(PoolClosed):
            pool.wait(timeout=1)
    leak_check()


# -- failed attempts -------------------------------------------------------------------------------


@pytest.mark.parametrize("down", ["at_construction", "after_fill"])
def test_defect1_new_connection_raising_does_not_shrink_the_pool(down, leak_check):
    """While the server refuses connections the pool keeps trying, then returns to `size` once it is back.

    0.2.1: an exception from _new_connection() killed the refill greenlet: each failure lost a slot for ever.
    """
    server = LineServer()
    server.start()
    port = server.port
    if down == "at_construction":
        server.stop()
    try:
        with FastLinePool(server, 3) as pool:
            if down == "after_fill":
                pool.wait(timeout=5)
                server.stop()  # refuses new connections and cuts the open ones
                for _ in range(3):
                    with pytest.raises(OSError):
                        request(pool, b"PING")
            # Every slot fails again and again (ECONNREFUSED) while the server is down.
            wait_until(lambda: pool.stats().failed_connects >= 6, timeout=10)
            stats = pool.stats()
            assert (stats.idle, stats.in_use, stats.connecting) == (0, 0, 3)
            with pytest.raises(PoolTimeout):
                pool.get(timeout=0.05).__enter__()
            server = LineServer(port)
            server.start()
            pool.wait(timeout=10)
            assert pool.stats().idle == 3
            server.wait_for_accepted(3)
            for _ in range(4):
                assert request(pool, b"PING") == b"PONG"
    finally:
        server.stop()
    leak_check()


def test_defect1_none_and_falsy_connections(leak_check):
    """A None from _new_connection is a failed attempt; any other object, even a falsy one, is a connection.

    0.2.1: it tested truthiness, so a falsy connection was leaked and the factory called again.
    """
    conn = FalsyConn(0)
    script = [None, None, conn]
    spare = []

    def factory():
        if script:
            return script.pop(0)
        spare.append(object())
        return spare[-1]

    with FakePool(1, factory=factory) as pool:
        pool.wait(timeout=10)
        assert pool.connect_calls == 3
        assert pool.stats().failed_connects == 2
        for _ in range(3):
            with pool.get() as c:
                assert c is conn
        assert pool.connect_calls == 3
        assert spare == []
        assert pool.close_calls == []
    leak_check()


def test_defect1_any_exception_is_a_failed_attempt(leak_check):
    """Any Exception from _new_connection, not only OSError, is a failed attempt that the pool retries.

    0.2.1: the exception killed the greenlet filling that slot, so the pool stayed empty and get() hung.
    """
    conn = object()
    script = [
        ValueError("bad greeting"),
        RuntimeError("library bug"),
        KeyError("config"),
        OSError("reset"),
        conn,
    ]

    def factory():
        step = script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    with FakePool(1, factory=factory) as pool:
        pool.wait(timeout=10)
        assert pool.connect_calls == 5
        assert pool.stats().failed_connects == 4
        with pool.get() as c:
            assert c is conn
    leak_check()


def test_new_connection_returning_none_is_a_failed_connect(leak_check, pool_log):
    """_new_connection() returning None is a failed attempt: retried, logged once at WARNING, and named in
    the PoolTimeout of a caller."""
    with FakePool(2, factory=lambda: None, name="returns-none") as pool:
        wait_until(lambda: pool.stats().failed_connects >= 6)
        with pytest.raises(PoolTimeout, match=r"returned None") as raised, pool.get(timeout=0.1):
            pass
        assert isinstance(raised.value.__cause__, TypeError)
        s = pool.stats()
        assert (s.opened, s.idle, s.connecting) == (0, 0, 2)
    warnings = [r for r in pool_log.records() if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "returned None" in warnings[0].getMessage()
    leak_check()


class OwnTimeoutPool(FastReconnect, ConnectionPool[socket.socket]):
    """A pool whose _new_connection bounds its own connect with ``with gevent.Timeout(0.2):``."""

    def __init__(self, address, *args: Any, **kwargs: Any) -> None:
        self.address = address
        super().__init__(*args, **kwargs)

    def _new_connection(self) -> socket.socket:
        with gevent.Timeout(0.2):
            return socket.create_connection(self.address)


def test_own_gevent_timeout_in_new_connection_is_a_failed_connect(line_server, leak_check):
    """A _new_connection() that times out with its own gevent.Timeout counts as a failed attempt, retried,
    and the pool fills once connects succeed again.

    0.2.1: any exception from _new_connection() killed the refill greenlet and shrank the pool for ever.
    """
    black = FaultProxy(line_server.address)
    black.start()
    black.blackhole_connects()
    try:
        with OwnTimeoutPool(black.address, 2, name="own-timeout") as pool:
            wait_until(lambda: pool.stats().failed_connects >= 2, timeout=3)
            black.heal()
            pool.wait(timeout=5)
            s = pool.stats()
            assert (s.idle, s.opened) == (2, 2)
            assert request(pool, b"PING") == b"PONG"
    finally:
        black.stop()
    leak_check()


def test_connect_timeout_fails_a_hung_handshake_and_retries(line_server, leak_check, pool_log):
    """A handshake the server never answers fails after connect_timeout, is retried, and the slot serves once
    the server answers.
    """
    line_server.stalled.clear()  # the server reads but never answers
    with HandshakePool(line_server, 1, connect_timeout=0.1) as pool:
        wait_until(lambda: pool.stats().failed_connects >= 2)
        s = pool.stats()
        assert s.connecting == 1 and s.idle == 0 and s.opened == 0
        assert any("connect_timeout" in r.getMessage() for r in pool_log.records(logging.WARNING))
        line_server.stalled.set()
        pool.wait(timeout=5)
        assert request(pool, b"PING") == b"PONG"
        assert pool.stats().opened == 1
    leak_check()


# -- an outage, and fail_fast ----------------------------------------------------------------------


def test_pool_timeout_while_remote_down_names_gauges_and_cause(leak_check):
    """Without fail_fast (the default) get() during an outage waits its timeout, then raises a PoolTimeout
    that names the gauges and the last connect error, which is its __cause__.
    """
    server = LineServer()
    server.start()
    server.stop()  # a port on which nothing listens
    with FastLinePool(server, 2, timeout=0.2, name="down-pool") as pool:
        wait_until(lambda: pool.stats().failed_connects >= 2)
        with pytest.raises(PoolTimeout) as info, pool.get():
            pass
        message = str(info.value)
        assert "down-pool" in message
        assert "size=2" in message and "idle=0" in message and "in_use=0" in message
        assert "connecting=2" in message and "waiting=" in message
        assert "last connect error" in message and "ConnectionRefusedError" in message
        assert isinstance(info.value.__cause__, ConnectionRefusedError)
        with pytest.raises(PoolTimeout) as info:
            pool.wait(timeout=0.1)
        assert isinstance(info.value.__cause__, ConnectionRefusedError)
        s = pool.stats()
        assert s.timeouts == 1
        assert s.idle + s.in_use + s.connecting == s.size
    leak_check()


def test_fail_fast_raises_unavailable_at_once_and_recovers(leak_check):
    """fail_fast makes get() raise PoolUnavailable at once during an outage, and the pool serves again once
    the server is back.
    """
    server = LineServer()
    server.start()
    server.stop()
    with FastLinePool(server, 2, fail_fast=True, timeout=20) as pool:
        wait_until(lambda: pool.stats().failed_connects >= 1)
        started = time.monotonic()
        with pytest.raises(PoolUnavailable) as info, pool.get():
            pass
        assert time.monotonic() - started < 5  # not the pool's 20 s timeout
        assert isinstance(info.value, ConnectionError)
        assert isinstance(info.value, PoolError)
        assert isinstance(info.value.__cause__, ConnectionRefusedError)
        assert pool.stats().timeouts == 0
        server.start()
        try:
            wait_until(lambda: pool.stats().idle >= 1)
            assert request(pool, b"ECHO back") == b"back"
            pool.wait(timeout=5)
        finally:
            pool.close()
            server.stop()
    leak_check()


def test_fail_fast_wakes_waiters_blocked_when_the_outage_starts(line_server, leak_check):
    """Waiters already blocked when the server goes down get PoolUnavailable; the pool serves again after a
    restart.
    """
    with FastLinePool(line_server, 1, fail_fast=True, timeout=20) as pool:
        pool.wait(timeout=5)
        results: list[BaseException] = []

        def waiter() -> None:
            try:
                with pool.get():
                    pass
            except PoolError as error:
                results.append(error)

        with pytest.raises(OSError), pool.get() as held:
            waiters = [gevent.spawn(waiter) for _ in range(3)]
            wait_until(lambda: pool.stats().waiting == 3)
            line_server.stop()
            held.sendall(b"PING\n")
            recv_line(held)  # the server cut it: ConnectionError, the pool discards it
        gevent.joinall(waiters, timeout=5)
        assert len(results) == 3
        assert all(isinstance(e, PoolUnavailable) for e in results), results
        assert all(isinstance(e.__cause__, ConnectionRefusedError) for e in results)
        line_server.start()
        wait_until(lambda: pool.stats().idle == 1)
        assert request(pool, b"PING") == b"PONG"
    line_server.stop()  # its new listening socket is not a leak
    leak_check()


def test_a_base_exception_from_new_connection_is_a_failed_attempt(leak_check, capsys):
    """1.0: a BaseException raised by _new_connection escaped the connect greenlet, printed a traceback and
    left connecting=1 for ever; now it is a failed attempt like any other, retried with backoff.
    """
    made: List[Conn] = []

    def factory() -> Conn:
        if len(made) < 3 and not getattr(factory, "healed", False):
            made.append(Conn(-1))
            raise ControlFlow("not now")
        conn = Conn(len(made))
        made.append(conn)
        return conn

    with FakePool(1, factory=factory, timeout=5) as pool:
        pool.wait(timeout=5)
        s = pool.stats()
        assert (s.idle, s.connecting, s.failed_connects) == (1, 0, 3)
        with pool.get() as c:
            assert c is made[-1]
    assert "Traceback" not in capsys.readouterr().err
    leak_check()
