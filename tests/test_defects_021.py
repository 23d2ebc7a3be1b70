"""One test per defect of geventconnpool 0.2.1 listed in issue 2; each one fails on 0.2.1's logic.

The second line of each docstring says what 0.2.1 did.
"""

import gevent
import pytest
from doubles import FLAVOURS, FakePool, FalsyConn, FastLinePool, RecordingLinePool
from helpers import LineServer, pool_greenlets, recv_line, request, wait_until

from geventconnpool import ConnectionPool, PoolTimeout


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


def interrupt_by_timeout(pool, server):
    """Send a request and let a gevent.Timeout fire while the reply is still unread."""
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.05), pool.get() as c:
        c.sendall(b"ECHO first\n")
        recv_line(c)
    return c


def interrupt_by_kill(pool, server):
    """Send a request from another greenlet and kill that greenlet while the reply is still unread."""
    held = []

    def holder():
        with pool.get() as c:
            held.append(c)
            c.sendall(b"ECHO first\n")
            recv_line(c)

    g = gevent.spawn(holder)
    wait_until(lambda: len(server.commands) == 1)
    g.kill(block=True, timeout=5)
    assert g.dead
    return held[0]


def interrupt_by_keyboard(pool, server):
    """Send a request and raise KeyboardInterrupt (Ctrl-C) before the reply is read."""
    with pytest.raises(KeyboardInterrupt), pool.get() as c:
        c.sendall(b"ECHO first\n")
        wait_until(lambda: len(server.commands) == 1)
        raise KeyboardInterrupt
    return c


@pytest.mark.parametrize(
    "interrupt",
    [interrupt_by_timeout, interrupt_by_kill, interrupt_by_keyboard],
    ids=["gevent.Timeout", "Greenlet.kill", "KeyboardInterrupt"],
)
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_defect5_baseexception_in_block_discards_the_connection(flavour, interrupt, line_server, leak_check):
    """A BaseException that is not an Exception, mid-exchange, discards the connection and its unread reply.

    0.2.1: its bare `except:` put the connection back, so the next caller read the previous caller's reply.
    """
    with RecordingLinePool(line_server, 1, **FLAVOURS[flavour]) as pool:
        pool.wait(timeout=5)
        line_server.stalled.clear()  # the server holds its reply to "ECHO first"
        victim = interrupt(pool, line_server)
        line_server.stalled.set()  # the stale reply "first" is sent now
        assert request(pool, b"ECHO second") == b"second"
        assert pool.dropped == [victim]
        assert victim.fileno() == -1
        assert line_server.accepted == 2
        assert pool.stats().discarded == 1
        wait_until(lambda: line_server.closed == 1)
    leak_check()


def test_defect6_keepalive_without_override_fails_at_construction():
    """keepalive= on a pool that does not override _keepalive raises TypeError at once, starting nothing.

    0.2.1: the constructor succeeded and its keepalive greenlet died of NotImplementedError, silently.
    """

    class NoPingPool(ConnectionPool):
        def _new_connection(self):
            return object()

    before = pool_greenlets()
    with pytest.raises(TypeError, match="_keepalive"):
        NoPingPool(2, keepalive=30)
    assert pool_greenlets() <= before
