"""The production features of issue 3: timeouts, FIFO waiters, fail_fast, connect_timeout,
max_lifetime, check_after, leak_warning, wait(), close(), stats(), repr(), logging, errors,
and the bad values of every new argument.

Most tests run against a real LineServer on loopback; a few pin pure pool logic with scripted
fake connections, whose hooks block on events the test controls.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
import sys
import time

import gevent
import pytest
from doubles import FakeConn, FakePool, FastLinePool
from gevent import socket
from gevent.event import Event
from helpers import LinePool, LineServer, pool_greenlets, recv_line, request, wait_until

import geventconnpool
from geventconnpool import (
    ConnectionPool,
    PoolClosed,
    PoolError,
    PoolStats,
    PoolTimeout,
    PoolUnavailable,
)


def invariant_holds(pool: ConnectionPool[object]) -> bool:
    s = pool.stats()
    return s.idle + s.in_use + s.connecting == s.size


def client_port(sock: socket.socket) -> int:
    return sock.getsockname()[1]


def server_socket_for(server: LineServer, port: int) -> socket.socket:
    """The server-side socket of the connection whose client port is ``port``."""
    for sock in server.open:
        if sock.getpeername()[1] == port:
            return sock
    raise AssertionError(f"the server has no open connection from port {port}")


# -- get(timeout) -------------------------------------------------------------------------


def test_get_timeout_raises_pool_timeout_not_before_the_timeout(line_server, leak_check):
    """get(timeout) with every connection held raises PoolTimeout, a TimeoutError and an OSError, after the
    timeout.
    """
    with LinePool(line_server, 1) as pool:
        pool.wait(timeout=5)
        with pool.get():
            started = time.monotonic()
            with pytest.raises(PoolTimeout) as info, pool.get(timeout=0.2):
                pass
            elapsed = time.monotonic() - started
        assert 0.2 <= elapsed < 5
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value, OSError)
        assert isinstance(info.value, PoolError)
        assert "0.2" in str(info.value)
        assert pool.stats().timeouts == 1
        assert pool.stats().waiting == 0
        assert info.value.__cause__ is None and info.value.__suppress_context__  # the remote is fine
        assert request(pool, b"PING") == b"PONG"
    leak_check()


def test_pool_timeout_is_the_default_of_get(line_server, leak_check):
    """get() without a timeout waits the pool's timeout, whose default is 30 s."""
    with LinePool(line_server, 1) as default_pool:
        assert default_pool.timeout == 30.0
    with LinePool(line_server, 1, timeout=0.15) as pool:
        pool.wait(timeout=5)
        with pool.get():
            started = time.monotonic()
            with pytest.raises(PoolTimeout), pool.get():
                pass
            assert 0.15 <= time.monotonic() - started < 5
    leak_check()


def test_get_timeout_zero_takes_only_an_idle_connection(line_server, leak_check):
    """get(timeout=0) lends an idle connection at once, and raises PoolTimeout at once when none is idle."""
    with LinePool(line_server, 1) as pool:
        pool.wait(timeout=5)
        with pool.get(timeout=0) as c:
            c.sendall(b"PING\n")
            assert recv_line(c) == b"PONG"
            with pytest.raises(PoolTimeout), pool.get(timeout=0):
                pass
        assert pool.stats().timeouts == 1
        assert pool.stats().checkouts == 1
    leak_check()


def test_timeout_none_waits_for_ever_until_served(line_server, leak_check):
    """With timeout=None a waiter is still waiting long after any usual timeout, and is served when a
    connection comes back.
    """
    with LinePool(line_server, 1, timeout=None) as pool:
        pool.wait(timeout=5)

        def waiter() -> bytes:
            return request(pool, b"ECHO late")

        with pool.get() as held:
            g = gevent.spawn(waiter)
            wait_until(lambda: pool.stats().waiting == 1)
            gevent.sleep(0.5)  # far longer than the other tests' timeouts: a bounded wait, a negative check
            assert not g.ready()
            assert pool.stats().waiting == 1
            held.sendall(b"PING\n")
            assert recv_line(held) == b"PONG"
        assert g.get(timeout=5) == b"late"
        assert pool.stats().timeouts == 0
    leak_check()


# -- FIFO ----------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"leak_warning": 30.0}], ids=["plain", "checked"])
def test_waiters_are_served_first_come_first_served(line_server, leak_check, options):
    """Parked waiters are served in arrival order, and a holder that returns and asks again at once queues
    behind them.
    """
    with LinePool(line_server, 1, **options) as pool:
        pool.wait(timeout=5)
        served: list[str] = []

        def waiter(name: str) -> None:
            with pool.get(timeout=10):
                served.append(name)

        def holder() -> None:
            greenlets = []
            with pool.get():
                # Park the waiters one at a time, so their arrival order is known.
                for i in range(5):
                    greenlets.append(gevent.spawn(waiter, f"w{i}"))
                    wait_until(lambda i=i: pool.stats().waiting == i + 1)
            # No yield between returning the connection and asking again.
            with pool.get(timeout=10):
                served.append("holder")
            gevent.joinall(greenlets, timeout=5, raise_error=True)

        gevent.spawn(holder).get(timeout=10)
        assert served == ["w0", "w1", "w2", "w3", "w4", "holder"]
        assert pool.stats().checkouts == 7
        assert line_server.accepted == 1
    leak_check()


def test_timed_out_waiter_leaves_the_queue(line_server, leak_check):
    """A waiter that timed out is not served later; the next waiter in line is."""
    with LinePool(line_server, 1) as pool:
        pool.wait(timeout=5)
        served: list[str] = []

        def waiter(name: str, timeout: float) -> None:
            with pool.get(timeout=timeout):
                served.append(name)

        with pool.get():
            short = gevent.spawn(waiter, "short", 0.05)
            wait_until(lambda: pool.stats().waiting == 1)
            long = gevent.spawn(waiter, "long", 10)
            wait_until(lambda: pool.stats().waiting == 2)
            with pytest.raises(PoolTimeout):
                short.get(timeout=5)
            assert pool.stats().waiting == 1
        long.get(timeout=5)
        assert served == ["long"]
    leak_check()


def test_a_waiter_whose_timeout_fires_as_it_is_served_keeps_the_connection(leak_check):
    """A connection handed to a waiter in the loop turn where its get() timeout also fires is lent to that
    waiter, not lost.
    """
    with FakePool(1) as pool:
        pool.wait(timeout=5)
        outcome: list[object] = []

        def holder() -> None:
            with pool.get():
                gevent.sleep(0.01)

        def waiter() -> None:
            try:
                with pool.get(timeout=0.02) as c:
                    outcome.append(c)
            except PoolTimeout as error:
                outcome.append(error)

        def hog() -> None:
            # Keeps the hub busy past both timers, so that they expire in the same loop turn: the
            # holder's first, whose block then hands its connection to the waiter, then the waiter's.
            end = time.monotonic() + 0.08
            while time.monotonic() < end:
                pass

        greenlets = [gevent.spawn(holder), gevent.spawn(waiter), gevent.spawn(hog)]
        gevent.joinall(greenlets, timeout=5, raise_error=True)
        assert outcome == pool.conns[:1], outcome
        s = pool.stats()
        assert (s.idle, s.in_use, s.waiting, s.timeouts, s.checkouts) == (1, 0, 0, 0, 2)
    leak_check()


# -- remote down, fail_fast ------------------------------------------------------------------


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
        assert pool.stats().timeouts == 1
        assert invariant_holds(pool)
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


# -- connect_timeout ---------------------------------------------------------------------------


class HandshakePool(FastLinePool):
    """A pool whose connect includes a handshake: send PING, read PONG."""

    def _new_connection(self) -> socket.socket:
        sock = super()._new_connection()
        try:
            sock.sendall(b"PING\n")
            if recv_line(sock) != b"PONG":
                raise OSError("bad handshake")
        except BaseException:
            sock.close()
            raise
        return sock


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


# -- max_lifetime --------------------------------------------------------------------------------


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


# -- check_after -------------------------------------------------------------------------------


def test_check_after_discards_silently_cut_connections_inside_get(line_server, leak_check):
    """After idling past check_after, connections are checked in get(); the cut ones are discarded and the
    caller only gets working ones.
    """
    with FastLinePool(line_server, 3, check_after=0.05) as pool:
        pool.wait(timeout=5)
        with pool.get() as a, pool.get() as b, pool.get() as keep:
            ports = [client_port(a), client_port(b), client_port(keep)]
        gevent.sleep(0.1)  # every connection has now been idle longer than check_after
        for port in ports[:2]:
            server_socket_for(line_server, port).shutdown(socket.SHUT_RDWR)
        wait_until(lambda: line_server.closed == 2)
        pings_before = line_server.commands.count(b"PING\n")
        lent_ports = []
        with pool.get() as c1, pool.get() as c2, pool.get() as c3:
            for c in (c1, c2, c3):
                lent_ports.append(client_port(c))
                c.sendall(b"ECHO ok\n")
                assert recv_line(c) == b"ok"
        assert ports[0] not in lent_ports and ports[1] not in lent_ports
        assert ports[2] in lent_ports
        s = pool.stats()
        assert s.keepalive_failures == 2
        assert s.discarded == 2
        assert s.opened == 5
        assert line_server.accepted == 5
        # Each of the three old connections was checked once; the two new ones were not.
        assert line_server.commands.count(b"PING\n") - pings_before == 1
        assert invariant_holds(pool)
    leak_check()


def test_check_after_skips_recently_used_connections(line_server, leak_check):
    """A connection idle less than check_after is lent without a check."""
    with LinePool(line_server, 1, check_after=30) as pool:
        pool.wait(timeout=5)
        for _ in range(3):
            assert request(pool, b"ECHO x") == b"x"
        assert b"PING\n" not in line_server.commands
        assert pool.stats().keepalive_failures == 0
    leak_check()


def test_check_after_needs_keepalive_hook():
    """check_after on a pool that does not override _keepalive is a TypeError naming check_after."""

    class NoKeepalive(ConnectionPool[FakeConn]):
        def _new_connection(self) -> FakeConn:
            return FakeConn(0)

    with pytest.raises(TypeError, match="check_after"):
        NoKeepalive(1, check_after=1.0)


@pytest.mark.parametrize("check", ["fails", "passes"])
def test_a_check_ending_after_close_began_raises_pool_closed(leak_check, check):
    """A check_after check that ends after close() began, failing or passing, gives the caller PoolClosed and
    closes that connection once, opening no replacement.
    """
    pool = FakePool(1, check_after=0.01)
    pool.wait(timeout=5)
    gevent.sleep(0.05)  # the connection is now idle longer than check_after
    pool.conns[0].broken = check == "fails"
    pool.keepalive_gate.clear()
    g = gevent.spawn(lambda: pool.get().__enter__())
    wait_until(lambda: len(pool.keepalive_calls) == 1)
    pool.close()
    pool.keepalive_gate.set()
    with pytest.raises(PoolClosed):
        g.get(timeout=5)
    assert pool.conns[0].closed == 1
    assert len(pool.conns) == 1  # no replacement opened for a closed pool
    assert pool.stats().checkouts == 0
    if check == "passes":
        assert pool.stats().keepalive_failures == 0
    leak_check()


@pytest.mark.parametrize("kill_first", [True, False], ids=["killed-before-it-runs", "killed-in-its-block"])
def test_a_waiter_killed_as_it_is_handed_a_connection_loses_nothing(leak_check, kill_first):
    """A waiter killed just as it is handed a connection gives it back (or it is replaced): none is lost."""
    with FakePool(1) as pool:
        pool.wait(timeout=5)
        got: list[FakeConn] = []

        def waiter() -> None:
            with pool.get(timeout=5) as c:
                got.append(c)
                gevent.sleep(10)

        with pool.get() as held:
            w = gevent.spawn(waiter)
            wait_until(lambda: pool.stats().waiting == 1)
            if kill_first:
                w.kill(block=False)  # runs before the waiter is told it was handed the connection
        # Leaving the block handed the connection to the waiter, which has not run yet.
        w.kill(block=True, timeout=5)
        assert w.dead
        with pool.get(timeout=1) as c:
            assert c is held if kill_first else c.number == 1
        assert got == ([] if kill_first else [held])
        s = pool.stats()
        assert s.idle + s.in_use + s.connecting == 1 and s.waiting == 0
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


# -- leak_warning ---------------------------------------------------------------------------------


def test_leak_warning_logs_once_per_loan_with_the_get_stack(line_server, leak_check, pool_log):
    """A connection held past leak_warning logs one WARNING naming the pool, the time held, and where get()
    was called.
    """
    with LinePool(line_server, 1, leak_warning=0.05, name="leaky") as pool:
        pool.wait(timeout=5)
        get_line = sys._getframe().f_lineno + 1
        with pool.get():
            wait_until(lambda: any("held" in r.getMessage() for r in pool_log.records(logging.WARNING)))
            gevent.sleep(0.2)  # four more leak_warning periods: still a single warning (a negative check)
        warnings = [r.getMessage() for r in pool_log.records(logging.WARNING)]
        assert len(warnings) == 1, warnings
        message = warnings[0]
        assert "leaky" in message
        assert "held for" in message
        assert "test_leak_warning_logs_once_per_loan_with_the_get_stack" in message
        # The innermost frame names the line of the get() call, not where the holder is now.
        assert f'test_production.py", line {get_line}, in test_leak_warning' in message, message
        # A new loan may warn again.
        with pool.get():
            wait_until(lambda: len(pool_log.records(logging.WARNING)) == 2)
        # A short loan does not.
        assert request(pool, b"PING") == b"PONG"
        gevent.sleep(0.15)  # three leak_warning periods: no warning about it (a negative check)
        assert len(pool_log.records(logging.WARNING)) == 2
    leak_check()


def test_leak_warning_names_the_get_of_a_loan_that_had_to_wait(line_server, leak_check, pool_log):
    """A loan obtained after waiting in get() is watched too; its warning shows the waiting caller's stack."""
    with LinePool(line_server, 1, leak_warning=0.05, name="waited") as pool:
        pool.wait(timeout=5)
        release = Event()

        def borrower_that_waited() -> None:
            with pool.get(timeout=5):
                release.wait(5)

        with pool.get():
            g = gevent.spawn(borrower_that_waited)
            wait_until(lambda: pool.stats().waiting == 1)

        def about_the_waiter() -> list[str]:
            messages = [r.getMessage() for r in pool_log.records(logging.WARNING)]
            return [m for m in messages if "borrower_that_waited" in m]

        wait_until(about_the_waiter)
        gevent.sleep(0.2)  # four more leak_warning periods: no second warning (a negative check)
        release.set()
        g.get(timeout=5)
        assert len(about_the_waiter()) == 1
    leak_check()


def test_no_leak_warning_when_off(line_server, leak_check, pool_log):
    """Without leak_warning a long loan logs nothing."""
    with LinePool(line_server, 1) as pool:
        pool.wait(timeout=5)
        with pool.get():
            gevent.sleep(0.3)  # a long loan, and nothing is logged: a bounded wait for a negative check
        assert pool_log.records(logging.WARNING) == []
        assert not [g for g in pool_greenlets() if "maintenance" in g.name and pool.name in g.name]
    leak_check()


# -- wait() and close() ---------------------------------------------------------------------------


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


def test_an_expired_connection_coming_back_is_not_handed_to_a_waiter(line_server, leak_check):
    """A connection that outlived max_lifetime while held is closed when it comes back; the waiter gets a new
    one.
    """
    with FastLinePool(line_server, 1, max_lifetime=0.1) as pool:
        pool.wait(timeout=5)
        served: list[int] = []

        def waiter() -> None:
            with pool.get(timeout=5) as c:
                served.append(client_port(c))

        with pool.get() as old:
            old_port = client_port(old)
            w = gevent.spawn(waiter)
            wait_until(lambda: pool.stats().waiting == 1)
            wait_until(lambda: time.monotonic() > pool.opened_at[id(old)] + 0.15)
        w.get(timeout=5)
        assert served and served[0] != old_port
        assert pool.dropped == [old]
        assert pool.stats().recycled == 1 and line_server.accepted == 2
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


def test_pool_is_a_context_manager_that_closes(line_server, leak_check):
    """`with MyPool(n) as pool:` yields the pool and closes it on exit, even on an exception."""
    with pytest.raises(KeyError), FastLinePool(line_server, 2) as pool:
        pool.wait(timeout=5)
        raise KeyError("boom")
    assert pool.closed
    assert len(pool.dropped) == 2
    leak_check()


# -- stats(), repr(), name --------------------------------------------------------------------------


def test_stats_is_a_frozen_dataclass_with_the_documented_fields(line_server, leak_check):
    """stats() returns a frozen PoolStats with the gauges and counters the issue names."""
    with LinePool(line_server, 2) as pool:
        pool.wait(timeout=5)
        s = pool.stats()
        assert isinstance(s, PoolStats)
        assert geventconnpool.PoolStats is PoolStats and PoolStats.__module__ == "geventconnpool"
        assert dataclasses.is_dataclass(s)
        assert {f.name for f in dataclasses.fields(s)} == {
            "size",
            "idle",
            "in_use",
            "connecting",
            "waiting",
            "checkouts",
            "opened",
            "failed_connects",
            "discarded",
            "recycled",
            "keepalive_failures",
            "timeouts",
        }
        with pytest.raises(dataclasses.FrozenInstanceError):
            s.idle = 5  # type: ignore[misc]
        assert s == PoolStats(2, 2, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0)
    leak_check()


def test_stats_counters_add_up(line_server, leak_check):
    """Checkouts, discards, opens and timeouts are counted as a user's requests make them happen."""
    with FastLinePool(line_server, 2) as pool:
        pool.wait(timeout=5)
        with pool.get() as a:
            s = pool.stats()
            assert (s.idle, s.in_use, s.connecting) == (1, 1, 0)
            a.sendall(b"PING\n")
            assert recv_line(a) == b"PONG"
        for _ in range(3):
            assert request(pool, b"PING") == b"PONG"
        with pytest.raises(OSError), pool.get():
            raise OSError("broken")
        with pytest.raises(ValueError), pool.get():
            raise ValueError("not a connection error")
        pool.wait(timeout=5)
        with pool.get(), pool.get(), pytest.raises(PoolTimeout), pool.get(timeout=0):
            pass
        s = pool.stats()
        assert s.checkouts == 1 + 3 + 1 + 1 + 2
        assert s.discarded == 1
        assert s.opened == 3
        line_server.wait_for_accepted(3)
        assert s.timeouts == 1
        assert s.failed_connects == s.recycled == s.keepalive_failures == 0
        assert (s.idle, s.in_use, s.connecting, s.waiting) == (2, 0, 0, 0)
    leak_check()


def test_stats_gauges_invariant_under_churn(line_server, leak_check):
    """idle + in_use + connecting == size at every point observed while holders, discards, checks, recycles
    and an outage churn.
    """
    violations: list[PoolStats] = []
    observations = [0]
    with FastLinePool(
        line_server, 4, keepalive=0.01, check_after=0.005, max_lifetime=0.1, timeout=0.05
    ) as pool:
        pool.wait(timeout=5)
        deadline = time.monotonic() + 1.5

        def observe() -> None:
            observations[0] += 1
            s = pool.stats()
            if s.idle + s.in_use + s.connecting != s.size:
                violations.append(s)

        def observer() -> None:
            while time.monotonic() < deadline:
                observe()
                gevent.sleep(0)

        def worker(n: int) -> None:
            for i in range(400):
                if time.monotonic() > deadline:
                    return
                try:
                    with pool.get() as c:
                        observe()
                        if (i + n) % 23 == 0:
                            raise OSError("discard this one")
                        c.sendall(b"PING\n")
                        recv_line(c)
                        observe()
                except (OSError, PoolError):
                    pass
                observe()
                gevent.sleep(0.001 * (n % 3))

        def saboteur() -> None:
            for _ in range(2):
                gevent.sleep(0.3)
                line_server.cut_all()
                observe()
            line_server.stop()
            gevent.sleep(0.1)
            observe()
            line_server.start()

        greenlets = [gevent.spawn(observer), gevent.spawn(saboteur)]
        greenlets += [gevent.spawn(worker, n) for n in range(6)]
        gevent.joinall(greenlets, timeout=10, raise_error=True)
        pool.wait(timeout=5)
        observe()
        s = pool.stats()
        assert violations == []
        assert observations[0] > 500
        assert s.discarded > 0 and s.checkouts > 50
        wait_until(lambda: pool.stats().recycled > 0)  # idle now, they reach max_lifetime if they had not
        # The server counts a connection when its handler starts, a loop turn after the pool counts it.
        wait_until(lambda: pool.stats().opened == line_server.accepted)
    line_server.stop()
    leak_check()


def test_repr_and_name(line_server, leak_check, pool_log):
    """repr() shows the name and the gauges; the default name is the class name and a number; name= appears in
    logs and errors.
    """
    with LinePool(line_server, 2) as unnamed:
        assert unnamed.name.startswith("LinePool-")
    with FastLinePool(line_server, 2, name="orders-db", timeout=0.05) as pool:
        pool.wait(timeout=5)
        with pool.get():
            text = repr(pool)
            assert "orders-db" in text and "FastLinePool" in text
            for gauge in ("size=2", "idle=1", "in_use=1", "connecting=0", "waiting=0"):
                assert gauge in text
        with pool.get(), pool.get(), pytest.raises(PoolTimeout, match="orders-db"), pool.get():
            pass
        line_server.stop()
        with pytest.raises(OSError), pool.get() as c:
            c.sendall(b"PING\n")
            recv_line(c)
        wait_until(lambda: pool.stats().failed_connects >= 1)
        assert all("orders-db" in r.getMessage() for r in pool_log.records())
        assert pool_log.records(logging.WARNING)
    leak_check()


# -- logging ----------------------------------------------------------------------------------------


def test_outage_logs_a_handful_of_warnings_and_recovery_at_info(line_server, leak_check, pool_log):
    """A long streak of failed connects logs its first failure at WARNING with the error, the rest at DEBUG,
    and the recovery at INFO with the count.
    """
    with FastLinePool(line_server, 2, name="flaky") as pool:
        pool.wait(timeout=5)
        pool_log.clear()
        line_server.stop()
        for _ in range(2):
            with pytest.raises(OSError), pool.get() as c:
                c.sendall(b"PING\n")
                recv_line(c)
        wait_until(lambda: pool.stats().failed_connects >= 40, timeout=10)
        line_server.start()
        pool.wait(timeout=5)
        failures = pool.stats().failed_connects
        warnings = [r for r in pool_log.records(logging.WARNING) if "failed to open" in r.getMessage()]
        assert 1 <= len(warnings) <= 3, [r.getMessage() for r in warnings]
        assert "ConnectionRefusedError" in warnings[0].getMessage()
        assert "flaky" in warnings[0].getMessage()
        debug_failures = [r for r in pool_log.records(logging.DEBUG) if "failed to open" in r.getMessage()]
        assert len(debug_failures) + len(warnings) == failures
        infos = [r.getMessage() for r in pool_log.records(logging.INFO)]
        assert any("connected again" in m and "flaky" in m for m in infos), infos
        counts = [int(w) for m in infos for w in m.split() if w.isdigit()]
        assert counts and max(counts) >= 40 - 3
    line_server.stop()
    leak_check()


# -- errors -------------------------------------------------------------------------------------------


def test_exception_hierarchy():
    """The errors live in the package root under PoolError; each leaf is a builtin callers already catch."""
    assert issubclass(PoolError, Exception)
    assert issubclass(PoolTimeout, PoolError) and issubclass(PoolTimeout, TimeoutError)
    assert issubclass(PoolTimeout, OSError)  # code that catches socket.error still sees it
    assert issubclass(PoolTimeout, socket.error)
    assert issubclass(PoolClosed, PoolError) and not issubclass(PoolClosed, OSError)
    assert issubclass(PoolUnavailable, PoolError) and issubclass(PoolUnavailable, ConnectionError)
    for cls in (PoolError, PoolTimeout, PoolClosed, PoolUnavailable):
        assert cls.__module__ == "geventconnpool"
        assert getattr(geventconnpool, cls.__name__) is cls
        assert cls.__doc__ and cls.__doc__.strip()
        assert cls.__name__ in geventconnpool.__all__


@pytest.mark.parametrize("cls", [PoolError, PoolTimeout, PoolClosed, PoolUnavailable])
def test_errors_pickle(cls):
    """Each error survives pickling (multiprocessing, task queues), keeping its type and message."""
    error = cls("pool 'p' did something")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls and str(copy) == str(error)


@pytest.mark.parametrize("error", ["PoolTimeout", "PoolUnavailable"])
def test_another_pools_error_inside_a_block_keeps_the_held_connection(line_server, leak_check, error):
    """A PoolTimeout or PoolUnavailable from a second pool, raised through a block, leaves the held connection
    alive.
    """
    down = LineServer()
    down.start()
    down.stop()
    fail_fast = error == "PoolUnavailable"
    cache = FastLinePool(down, 1, fail_fast=fail_fast, timeout=0.05)
    with FastLinePool(line_server, 1) as db, cache:
        db.wait(timeout=5)
        wait_until(lambda: cache.stats().failed_connects >= 1)
        expected = PoolTimeout if error == "PoolTimeout" else PoolUnavailable
        for _ in range(3):
            with pytest.raises(expected), db.get() as c:
                c.sendall(b"PING\n")
                assert recv_line(c) == b"PONG"
                if error == "PoolTimeout":
                    with cache.get(timeout=0):  # raises at once: nothing idle
                        pass
                else:
                    with cache.get():
                        pass
        assert db.stats().discarded == 0
        assert db.dropped == [] and line_server.accepted == 1
    leak_check()


# -- bad values ------------------------------------------------------------------------------------------


class Minimal(ConnectionPool[FakeConn]):
    """The smallest valid pool: fake connections, a keepalive that always passes."""

    def _new_connection(self) -> FakeConn:
        return FakeConn(0)

    def _keepalive(self, c: FakeConn) -> None:
        pass


DURATIONS = ["keepalive", "timeout", "connect_timeout", "max_lifetime", "check_after", "leak_warning"]


@pytest.mark.parametrize("argument", DURATIONS)
@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, -math.inf])
def test_zero_or_negative_durations_are_value_errors(argument, value, leak_check):
    """Zero or a negative number of seconds is a ValueError naming the argument, raised before any greenlet
    starts.
    """
    with pytest.raises(ValueError, match=argument):
        Minimal(1, **{argument: value})
    leak_check()


@pytest.mark.parametrize("argument", DURATIONS)
@pytest.mark.parametrize("value", ["1", b"1", [1], True, float("nan"), object()], ids=repr)
def test_non_numeric_durations_are_type_errors(argument, value):
    """A duration that is not a number (or is a bool or NaN) is a TypeError naming the argument."""
    with pytest.raises(TypeError, match=argument):
        Minimal(1, **{argument: value})


@pytest.mark.parametrize("argument", DURATIONS)
def test_none_turns_a_duration_off(argument, leak_check):
    """None is accepted for every duration."""
    with Minimal(1, **{argument: None}) as pool, pool.get(timeout=5) as c:
        assert isinstance(c, FakeConn)
    leak_check()


@pytest.mark.parametrize(
    ("argument", "value"), [("fail_fast", 1), ("fail_fast", "yes"), ("fail_fast", None), ("name", 3)]
)
def test_bad_fail_fast_and_name_are_type_errors(argument, value):
    """fail_fast must be a bool and name a str."""
    with pytest.raises(TypeError, match=argument):
        Minimal(1, **{argument: value})


def test_new_arguments_are_keyword_only():
    """Passing any new argument by position is a TypeError; the first three keep their 0.2.1 positions."""
    with pytest.raises(TypeError):
        Minimal(1, (OSError,), None, 5.0)  # type: ignore[misc]
    with Minimal(1, OSError, 0.5) as pool:
        assert (pool.size, pool.exc_classes, pool.keepalive) == (1, (OSError,), 0.5)


@pytest.mark.parametrize(("value", "error"), [(-1, ValueError), (-0.01, ValueError), ("1", TypeError)])
def test_bad_get_and_wait_timeouts(value, error, leak_check):
    """get(timeout) and wait(timeout) reject negative and non-numeric values."""
    with Minimal(1) as pool:
        with pytest.raises(error, match="timeout"):
            pool.get(timeout=value)
        with pytest.raises(error, match="timeout"):
            pool.wait(timeout=value)
    leak_check()
