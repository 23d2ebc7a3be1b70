"""close(): what it closes and when, what it tells the callers, and the same under load and in an outage."""

from __future__ import annotations

import gc
import logging
import time
import weakref
from typing import Any, Dict, List

import gevent
import pytest
from doubles import FakeConn, FakePool, FastLinePool, FastRedisPool, LineTrackingPool, RecordingLinePool
from gevent.monkey import get_original
from helpers import LinePool, LineServer, pool_greenlets, recv_line, request, wait_until
from redis_server import echo, needs_redis
from reliability_checks import check_closed

from geventconnpool import PoolClosed, retry


def test_close_closes_idle_kills_greenlets_and_is_idempotent(line_server, leak_check):
    """close() closes idle connections at once through _close_connection, stops the pool's greenlets, and may
    be called again.
    """
    pool = FastLinePool(line_server, 3, keepalive=10, max_lifetime=100, leak_warning=100, name="to-close")
    pool.wait(timeout=5)
    assert [g for g in pool_greenlets() if "to-close" in g.name]
    assert not pool.closed
    pool.close()
    assert pool.closed
    assert len(pool.dropped) == 3
    assert not [g for g in pool_greenlets() if "to-close" in g.name]
    wait_until(lambda: line_server.closed == 3)
    pool.close()
    assert len(pool.dropped) == 3
    assert "closed" in repr(pool)
    leak_check()


def test_pool_is_a_context_manager_that_closes(line_server, leak_check):
    """`with MyPool(n) as pool:` yields the pool and closes it on exit, even on an exception."""
    with pytest.raises(KeyError), FastLinePool(line_server, 2) as pool:
        pool.wait(timeout=5)
        raise KeyError("boom")
    assert pool.closed
    assert len(pool.dropped) == 2
    leak_check()


def test_close_closes_held_connections_when_they_come_back(line_server, leak_check):
    """A connection held during close() works until its block ends, then is closed and not replaced."""
    pool = FastLinePool(line_server, 2)
    pool.wait(timeout=5)
    with pool.get() as c:
        pool.close()
        assert len(pool.dropped) == 1
        c.sendall(b"PING\n")
        assert recv_line(c) == b"PONG"
    assert pool.dropped[-1] is c
    wait_until(lambda: line_server.closed == 2)
    assert line_server.accepted == 2
    leak_check()


def test_close_while_connecting_stops_the_connect_greenlets(leak_check):
    """close() during an outage stops the retrying connect greenlets."""
    server = LineServer()
    server.start()
    server.stop()
    pool = FastLinePool(server, 3, name="closing-down")
    wait_until(lambda: pool.stats().failed_connects >= 3)
    pool.close()
    assert not [g for g in pool_greenlets() if "closing-down" in g.name]
    failed = pool.stats().failed_connects
    gevent.sleep(0.05)  # a few reconnect periods: no attempt follows (a negative check)
    assert pool.stats().failed_connects == failed
    leak_check()


def test_close_stops_waiting_for_a_hook_that_swallows_the_kill(caplog, leak_check):
    """A connect hook that swallows the kill cannot hold close() past connect_timeout + 1 s: close()
    returns, says so in one WARNING, and the connection the hook opens late is closed, not pooled."""
    opened: List[FakeConn] = []

    class Stubborn(FakePool):
        def _new_connection(self) -> FakeConn:
            until = time.monotonic() + 2.0  # longer than close() waits: connect_timeout + 1 s
            while time.monotonic() < until:
                try:
                    gevent.sleep(until - time.monotonic())
                except BaseException:  # as some libraries do: a kill or a timeout taken for a failure
                    pass
            opened.append(FakeConn(1))
            return opened[-1]

    pool = Stubborn(1, connect_timeout=0.2)
    gevent.sleep(0)  # the connect greenlet is in the hook
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="geventconnpool"):
        pool.close()
    assert 1.2 <= time.monotonic() - started < 1.8
    assert [r.getMessage() for r in caplog.records if "did not stop" in r.getMessage()] == [
        f"pool {pool.name!r}: closed, but 1 background greenlets did not stop"
    ]
    wait_until(lambda: len(opened) == 1 and opened[0].closed == 1)
    assert pool.stats().idle == 0
    leak_check()


def test_close_closes_connections_taken_for_a_keepalive_check(line_server, leak_check):
    """close() closes every connection once, even those the keepalive took out for a check that has not run
    yet.
    """
    real_sleep = get_original("time", "sleep")
    with RecordingLinePool(line_server, 4, keepalive=0.05) as pool:
        pool.wait(timeout=5)
        # A CPU-bound stretch blocks the loop: the keepalive and this test's timer fall due in the same
        # loop iteration, the keepalive first, so close() runs before the checks it spawned have started.
        gevent.spawn(real_sleep, 0.15)
        gevent.sleep(0.1)
        pool.close()
        # close() has closed them all, each once, by the time it returns.
        assert sorted(map(id, pool.dropped)) == sorted(map(id, pool.created))
        assert pool.stats().in_use == 0
        wait_until(lambda: line_server.closed == 4, timeout=5)
    leak_check()


def test_background_keepalive_interrupted_by_close(leak_check):
    """close() stops a keepalive check in progress and closes its connection exactly once."""
    pool = FakePool(2, keepalive=0.02)
    pool.wait(timeout=5)
    pool.keepalive_gate.clear()
    wait_until(lambda: len(pool.keepalive_calls) >= 1)
    pool.close()
    wait_until(lambda: all(c.closed == 1 for c in pool.conns))
    assert len(pool.conns) == 2
    assert not [g for g in pool_greenlets() if pool.name in g.name]
    pool.keepalive_gate.set()
    leak_check()


# -- callers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"keepalive": 60}, {"check_after": 60}, {"leak_warning": 60}])
def test_get_after_close_raises_pool_closed(line_server, leak_check, options):
    """get() and wait() on a closed pool raise PoolClosed naming the pool at once, whatever the pool's
    options."""
    pool = LineTrackingPool(line_server, 2, name="shut", **options)
    pool.wait(timeout=5)
    pool.close()
    for timeout in (None, 0):
        with pytest.raises(PoolClosed, match="is closed") as info, pool.get(timeout=timeout):
            pass
        assert "shut" in str(info.value)
    with pytest.raises(PoolClosed):
        pool.wait(timeout=1)
    check_closed(pool)
    leak_check()


def test_close_wakes_every_waiter_with_pool_closed(line_server, leak_check):
    """Every greenlet blocked in get() gets PoolClosed, naming the pool, when the pool closes."""
    pool = LinePool(line_server, 1, timeout=None, name="shutting")
    pool.wait(timeout=5)
    with pool.get():
        waiters = [gevent.spawn(lambda: pool.get().__enter__()) for _ in range(3)]
        wait_until(lambda: pool.stats().waiting == 3)
        pool.close()
        gevent.joinall(waiters, timeout=5)
        for g in waiters:
            assert isinstance(g.exception, PoolClosed)
            assert "shutting" in str(g.exception)
        assert pool.stats().waiting == 0
    leak_check()


def test_a_waiter_handed_a_connection_as_the_pool_closes_gets_pool_closed(leak_check):
    """A waiter handed a connection just before close() but resuming after it gets PoolClosed, not the
    connection.
    """
    pool = FakePool(1)
    pool.wait(timeout=5)
    got: list[FakeConn] = []

    def waiter() -> None:
        with pool.get(timeout=5) as c:
            got.append(c)

    with pool.get():
        w = gevent.spawn(waiter)
        wait_until(lambda: pool.stats().waiting == 1)
    # The connection went to the waiter, which has not run yet; close() before it does.
    pool.close()
    w.join(timeout=5)
    assert isinstance(w.exception, PoolClosed)
    assert got == []
    assert pool.conns[0].closed == 1
    leak_check()


@pytest.mark.watchdog(60)
def test_close_under_full_load_ends_every_caller_and_connection(line_server, leak_check):
    """close() while 200 greenlets hammer a pool of 10: every caller ends promptly (served or PoolClosed),
    every connection is closed, and every pool greenlet ends."""
    pool = LineTrackingPool(line_server, 10, name="close-under-load")
    pool.wait(timeout=10)
    done: List[int] = []
    ended: Dict[int, str] = {}
    crossed: List[tuple] = []

    def client(n: int) -> None:
        for k in range(200):
            token = b"%d-%d" % (n, k)
            try:
                reply = request(pool, b"ECHO " + token)
            except PoolClosed:
                ended[n] = "closed"
                return
            if reply != token:
                crossed.append((token, reply))
            done.append(1)
        ended[n] = "finished"

    clients = [gevent.spawn(client, n) for n in range(200)]
    wait_until(lambda: len(done) >= 1000, timeout=30)
    assert pool.stats().waiting > 0
    pool.close()
    assert gevent.joinall(clients, timeout=10) and all(g.dead for g in clients)
    assert set(ended.values()) == {"closed"} and len(ended) == 200
    assert crossed == []
    check_closed(pool)
    wait_until(lambda: line_server.closed == line_server.accepted)
    leak_check()


@needs_redis
@pytest.mark.watchdog(60)
def test_close_during_an_outage_ends_every_caller(leak_check, redis, proxy):
    """close() while the remote is unreachable and 50 callers wait: each gets PoolClosed at once, the
    reconnect loops stop, and no connection or greenlet is left."""
    pool = FastRedisPool(proxy.address, 5, name="close-in-outage")
    pool.wait(timeout=10)
    proxy.refuse()
    proxy.reset_all()
    ended: Dict[int, Any] = {}

    @retry(max_failures=None)
    def request(n: int) -> bytes:
        return echo(pool, f"outage-{n}")

    def client(n: int) -> None:
        try:
            request(n)
            ended[n] = "served"
        except Exception as error:
            ended[n] = type(error)

    clients = [gevent.spawn(client, n) for n in range(50)]
    wait_until(lambda: pool.stats().waiting == 50 and pool.stats().failed_connects >= 10, timeout=10)
    closed_at = time.monotonic()
    pool.close()
    assert gevent.joinall(clients, timeout=5) and all(g.dead for g in clients)
    assert time.monotonic() - closed_at < 5
    assert ended == dict.fromkeys(range(50), PoolClosed)
    check_closed(pool, proxy=proxy)
    proxy.stop()
    leak_check()


# -- without close() ----------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["full", "reconnecting"])
def test_a_dropped_pool_is_collected_and_its_greenlets_end(state, line_server, caplog, leak_check):
    """A pool that nobody refers to any more, never closed, is garbage-collected, and its background
    greenlets (connects, maintenance, keepalive checks) end: they hold it only by weak reference.
    """
    # pytest keeps every log record of a test, and the record of a failed connect keeps the error, whose
    # traceback holds the pool's frames: the pool logs nothing here, so that only the pool's own references
    # count.
    caplog.set_level(logging.CRITICAL + 1, logger="geventconnpool")
    name = f"dropped-{state}"
    if state == "reconnecting":
        line_server.stop()  # every connect fails: the connect greenlets wait in their backoff

    def make_and_drop() -> weakref.ref[FastLinePool]:
        pool = FastLinePool(line_server, 2, keepalive=0.01, max_lifetime=60, leak_warning=60, name=name)
        if state == "full":
            pool.wait(timeout=5)
            wait_until(lambda: line_server.commands.count(b"PING\n") >= 4)  # keepalive checks ran
        else:
            wait_until(lambda: pool.stats().failed_connects >= 4)
        assert [g for g in pool_greenlets() if name in g.name]
        return weakref.ref(pool)

    collected = make_and_drop()

    def gone() -> bool:
        gc.collect()
        return collected() is None

    wait_until(gone, interval=0.05)
    wait_until(lambda: not [g for g in pool_greenlets() if name in g.name])
    leak_check()
