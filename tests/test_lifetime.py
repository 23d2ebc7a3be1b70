"""max_lifetime: each connection is recycled after a lifetime drawn between 90% and 100% of it."""

from __future__ import annotations

import logging
import time

import gevent
import pytest
from doubles import FakePool, FastLinePool
from gevent import socket
from gevent.event import Event
from helpers import local_port, recv_line, request, wait_until

from geventconnpool import PoolTimeout


def test_max_lifetime_recycles_idle_connections_between_90_and_100_percent(line_server, leak_check):
    """Idle connections are closed and replaced after a lifetime drawn between 0.9 and 1.0 of max_lifetime,
    not all at once.
    """
    lifetime = 0.3
    with FastLinePool(line_server, 6, max_lifetime=lifetime) as pool:
        pool.wait(timeout=5)
        first = set(pool.opened_at)
        wait_until(lambda: first <= {id(c) for c in pool.dropped}, timeout=5)
        wait_until(lambda: line_server.closed >= 6 and line_server.accepted >= 12)
        pool.wait(timeout=5)
        s = pool.stats()
        assert s.recycled >= 6 and s.discarded == 0 and s.opened >= 12
        wait_until(lambda: len(pool.lifetimes) >= 12, timeout=5)  # a second generation, recycled too
        assert all(0.9 * lifetime - 0.01 <= t < lifetime + 2 for t in pool.lifetimes), pool.lifetimes
        assert request(pool, b"PING") == b"PONG"
    leak_check()


def test_first_generation_lifetimes_are_spread(line_server, leak_check):
    """The connections a new pool opens together are not all recycled together: each lives its own drawn
    lifetime.
    """

    class SlowHandshakePool(FastLinePool):
        def _new_connection(self) -> socket.socket:
            gevent.sleep(0.02)  # a TLS handshake: the remote takes a moment to answer
            return super()._new_connection()

    lifetime = 0.3
    with SlowHandshakePool(line_server, 6, max_lifetime=lifetime) as pool:
        pool.wait(timeout=5)
        first = set(pool.opened_at)
        wait_until(lambda: first <= {id(c) for c in pool.dropped}, timeout=5)
        first_lifetimes = pool.lifetimes[:6]
        assert all(0.9 * lifetime - 0.01 <= t < lifetime + 2 for t in first_lifetimes), first_lifetimes
        # Six draws from [0.9, 1.0] * lifetime span more than 1 ms but for a chance below 1e-5.
        assert max(first_lifetimes) - min(first_lifetimes) > 0.001, (
            f"all recycled together: {first_lifetimes}"
        )
    leak_check()


def test_max_lifetime_never_closes_a_held_connection(line_server, leak_check):
    """A connection held past its lifetime keeps working, and is closed and replaced once it comes back."""
    with FastLinePool(line_server, 1, max_lifetime=0.1) as pool:
        pool.wait(timeout=5)
        with pool.get() as c:
            opened = pool.opened_at[id(c)]
            wait_until(lambda: time.monotonic() > opened + 0.3)
            gevent.sleep(0.05)  # the maintenance greenlet runs past the lifetime: a negative check follows
            c.sendall(b"PING\n")
            assert recv_line(c) == b"PONG"
            assert line_server.closed == 0
            assert pool.stats().recycled == 0
        assert pool.dropped == [c]
        assert pool.stats().recycled == 1
        wait_until(lambda: line_server.closed == 1 and line_server.accepted == 2)
        assert request(pool, b"PING") == b"PONG"
    leak_check()


def test_a_connection_returned_shortly_before_its_lifetime_ends_is_recycled_on_time(line_server, leak_check):
    """A connection held while the maintenance greenlet plans its next wake-up, and given back just before its
    lifetime ends, is recycled when it ends, not one maintenance period later.
    """
    lifetime = 1.0
    with FastLinePool(line_server, 1, max_lifetime=lifetime) as pool:
        pool.wait(timeout=5)
        with pool.get() as c:
            opened = pool.opened_at[id(c)]
            # The maintenance greenlet wakes about 0.9 * lifetime after the pool was made, while this
            # block holds the connection; the connection's own lifetime ends between 0.9 and 1.0 of it.
            wait_until(lambda: time.monotonic() > opened + 0.93 * lifetime, timeout=5)
        wait_until(lambda: pool.lifetimes, timeout=5)
        assert pool.lifetimes[0] < lifetime + 0.3, pool.lifetimes
        assert request(pool, b"PING") == b"PONG"
    leak_check()


def test_an_expired_connection_coming_back_is_not_handed_to_a_waiter(line_server, leak_check):
    """A connection that outlived max_lifetime while held is closed when it comes back; the waiter gets a new
    one.
    """
    with FastLinePool(line_server, 1, max_lifetime=0.1) as pool:
        pool.wait(timeout=5)
        served: list[int] = []

        def waiter() -> None:
            with pool.get(timeout=5) as c:
                served.append(local_port(c))

        with pool.get() as old:
            old_port = local_port(old)
            w = gevent.spawn(waiter)
            wait_until(lambda: pool.stats().waiting == 1)
            wait_until(lambda: time.monotonic() > pool.opened_at[id(old)] + 0.15)
        w.get(timeout=5)
        assert served and served[0] != old_port
        assert pool.dropped == [old]
        assert pool.stats().recycled == 1 and line_server.accepted == 2
    leak_check()


def test_an_expired_idle_connection_is_never_lent(leak_check):
    """get() never lends an idle connection older than max_lifetime, even while maintenance is busy."""
    lifetime = 0.2
    # The second connection opens 0.1 s after the first, so it expires 0.1 s later; the
    # replacements of the first never open.
    pool = FakePool(2, free_connects=2, connect_delays=(0, 0.1), max_lifetime=lifetime, timeout=0.2)
    pool.close_gates.append(Event())  # the first recycle blocks in _close_connection
    try:
        pool.wait(timeout=5)
        first, other = sorted(pool.conns, key=lambda c: c.born)
        wait_until(lambda: pool.close_calls == [first], timeout=5)
        assert pool.stats().idle == 1
        wait_until(lambda: time.monotonic() > other.born + lifetime + 0.05)
        lent_age = None
        try:
            with pool.get() as c:
                lent_age = time.monotonic() - c.born
        except PoolTimeout:
            pass  # nothing young enough to lend: the right answer while connects are held back
        assert lent_age is None or lent_age < lifetime, f"lent a connection {lent_age:.2f} s old"
    finally:
        pool.open_gates()
        pool.close()
    leak_check()


def test_a_slow_close_never_delays_recycling(leak_check, pool_log):
    """While the close of one recycled connection hangs, the others are recycled when their lifetime ends,
    none is lent, each is closed once, and nothing is logged as an error.
    """
    lifetime = 0.2
    pool = FakePool(3, free_connects=3, max_lifetime=lifetime, timeout=0.2)
    first_close = Event()
    pool.close_gates.append(first_close)
    try:
        pool.wait(timeout=5)
        wait_until(lambda: len(pool.close_calls) == 3, timeout=5)
        assert sorted(c.closed for c in pool.conns) == [0, 1, 1]  # the first close still hangs
        # The replacements cannot open (connect_gate): nothing is left to lend.
        with pytest.raises(PoolTimeout):
            pool.get(timeout=0)
        assert pool.stats().recycled == 3
        first_close.set()
        wait_until(lambda: all(c.closed == 1 for c in pool.conns))
        assert pool_log.records(logging.ERROR) == []
    finally:
        pool.open_gates()
        pool.close()
    assert all(c.closed == 1 for c in pool.conns[:3]), pool.conns
    leak_check()
