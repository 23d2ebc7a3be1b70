"""Elastic size: ``min_size`` and ``max_idle``, against a real line server that counts the connections it
accepted and saw closed.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List

import gevent
import pytest
from doubles import IPS, FastAddressPool, FastLinePool
from gevent.event import Event
from helpers import LineServer, request, wait_until
from test_fork import run_child, threaded_server  # noqa: F401 (a fixture: the server in its own thread)

from geventconnpool import ConnectionPool, PoolTimeout
from geventconnpool._figures import FIGURES

# The fork test's server runs in another OS thread, which the child never touches.
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")

MAX_IDLE = 0.4


class ClosingLinePool(FastLinePool):
    """A FastLinePool that notes when it closed each connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.closed_at: List[float] = []
        super().__init__(*args, **kwargs)

    def _close_connection(self, c: Any) -> None:
        self.closed_at.append(time.monotonic())
        super()._close_connection(c)


def open_or_opening(pool: ConnectionPool[Any]) -> int:
    s = pool.stats()
    return s.idle + s.in_use + s.connecting


def assert_within_bounds(pool: ConnectionPool[Any]) -> None:
    """The invariant of an elastic pool: what is open or opening is between min_size and size."""
    s = pool.stats()
    assert s.min_size is not None
    assert s.min_size <= s.idle + s.in_use + s.connecting <= s.size, s


class Burst:
    """``count`` callers that each hold a connection until the test releases them all."""

    def __init__(self, pool: ConnectionPool[Any], count: int) -> None:
        self.release = Event()
        self.held: List[Any] = []
        self.greenlets = [gevent.spawn(self._hold, pool) for _ in range(count)]

    def _hold(self, pool: ConnectionPool[Any]) -> None:
        with pool.get(timeout=5) as c:
            self.held.append(c)
            self.release.wait()

    def end(self) -> None:
        self.release.set()
        gevent.joinall(self.greenlets, timeout=5, raise_error=True)


def grow_to_size(pool: ClosingLinePool, server: LineServer) -> None:
    """Make a burst of ``size`` callers grow ``pool`` to its size, then end it."""
    server.settle()  # so that accepted counts every connection open now
    expected = server.accepted + pool.size - open_or_opening(pool)
    burst = Burst(pool, pool.size)
    wait_until(lambda: len(burst.held) == pool.size, message=lambda: repr(pool))
    server.wait_for_accepted(expected)
    assert_within_bounds(pool)
    burst.end()


def test_an_elastic_pool_opens_min_size_then_one_per_waiting_caller_up_to_size(line_server, leak_check):
    """At first only min_size connections open; a burst of callers opens one more per caller that has to
    wait, and never more than size: the server sees exactly size connections."""
    with ClosingLinePool(line_server, 4, min_size=1) as pool:
        pool.wait(timeout=5)
        line_server.wait_for_accepted(1)
        s = pool.stats()
        assert (s.min_size, s.size, s.idle, s.in_use, s.connecting) == (1, 4, 1, 0, 0)
        burst = Burst(pool, 6)  # two more callers than size: they wait for one to come back
        wait_until(lambda: len(burst.held) == 4 and pool.stats().waiting == 2, message=lambda: repr(pool))
        assert_within_bounds(pool)
        assert pool.stats().connecting == 0
        line_server.wait_for_accepted(4)
        burst.end()
        assert len(burst.held) == 6
        assert line_server.accepted == 4 and pool.stats().opened == 4
        # Without max_idle, nothing closes them: the pool only opened them lazily.
        s = pool.stats()
        assert (s.idle, s.in_use, s.connecting, s.retired) == (4, 0, 0, 0)
    leak_check()


def test_a_quiet_period_shrinks_to_min_size_one_close_per_quarter_of_max_idle(line_server, leak_check):
    """After a burst, the connections unused for max_idle close one at a time, no two closer than
    max_idle / 4, down to min_size and no further; the server sees them closed."""
    with ClosingLinePool(line_server, 4, min_size=1, max_idle=MAX_IDLE) as pool:
        pool.wait(timeout=5)
        grow_to_size(pool, line_server)
        quiet_since = time.monotonic()
        wait_until(lambda: len(pool.closed_at) == 3, timeout=5, message=lambda: repr(pool))
        assert pool.closed_at[0] - quiet_since >= MAX_IDLE * 0.95
        gaps = [later - earlier for earlier, later in zip(pool.closed_at, pool.closed_at[1:])]
        assert all(gap >= MAX_IDLE / 4 * 0.9 for gap in gaps), gaps
        wait_until(lambda: line_server.closed == 3)
        s = pool.stats()
        assert (s.idle, s.in_use, s.connecting, s.retired) == (1, 0, 0, 3)
        assert len(line_server.open) == 1
        # At min_size it stays: another max_idle closes nothing more, and the last one still serves.
        deadline = time.monotonic() + MAX_IDLE * 1.5
        while time.monotonic() < deadline:
            assert len(pool.closed_at) == 3
            assert_within_bounds(pool)
            gevent.sleep(0.02)
        assert request(pool, b"PING") == b"PONG"
    leak_check()


def test_an_elastic_pool_over_two_addresses_keeps_its_spread_as_it_grows_and_shrinks(servers, leak_check):
    """Made with address=, an elastic pool opens min_size over both addresses, grows evenly under a burst,
    and once max_idle has shrunk it back to min_size, rebalancing leaves one connection on each."""

    def spread() -> List[int]:
        by_ip = {a.ip: n for a, n in pool.connections_by_address().items()}
        return [by_ip.get(ip, 0) for ip in IPS[:2]]

    with FastAddressPool(
        6, servers[0].port, IPS[:2], min_size=2, max_idle=MAX_IDLE, rebalance_every=0.05
    ) as pool:
        pool.wait(timeout=5)
        assert spread() == [1, 1]
        burst = Burst(pool, 6)
        wait_until(lambda: len(burst.held) == 6, message=lambda: repr(pool))
        assert spread() == [3, 3]
        burst.end()
        wait_until(lambda: pool.stats().retired == 4, message=lambda: repr(pool))
        wait_until(lambda: spread() == [1, 1], message=lambda: str(spread()))
        assert_within_bounds(pool)
        assert request(pool, b"PING") == b"PONG"
    leak_check()


def test_keepalive_pings_do_not_keep_an_unused_connection_open(line_server, leak_check):
    """A keepalive ping is no use: a connection pinged every 50 ms still closes once unused for max_idle."""
    with ClosingLinePool(line_server, 2, min_size=1, max_idle=MAX_IDLE, keepalive=0.05) as pool:
        pool.wait(timeout=5)
        grow_to_size(pool, line_server)
        wait_until(lambda: len(pool.closed_at) == 1, timeout=5, message=lambda: repr(pool))
        assert line_server.commands.count(b"PING\n") >= 2
        assert pool.stats().keepalive_failures == 0
        assert_within_bounds(pool)
    leak_check()


def test_a_connection_in_use_keeps_the_pool_from_shrinking_below_it(line_server, leak_check):
    """The connection a steady caller keeps using is never the one closed: the pool shrinks around it."""
    with ClosingLinePool(line_server, 3, min_size=1, max_idle=MAX_IDLE) as pool:
        pool.wait(timeout=5)
        grow_to_size(pool, line_server)
        used = set()
        deadline = time.monotonic() + 5
        while len(pool.closed_at) < 2 and time.monotonic() < deadline:
            with pool.get() as c:
                used.add(id(c))
            gevent.sleep(0.02)
        assert len(pool.closed_at) == 2
        assert len(used) == 1  # the most recently used one is lent first: the same one throughout
        assert all(id(c) not in used for c in pool.dropped)
    leak_check()


def test_a_broken_connection_is_replaced_at_min_size_but_not_above_it(line_server, leak_check):
    """A connection that breaks is replaced while the pool would fall below min_size (or callers wait);
    above min_size with nobody waiting, the pool does without it."""
    with ClosingLinePool(line_server, 3, min_size=1) as pool:
        pool.wait(timeout=5)
        with pytest.raises(ConnectionResetError), pool.get():
            raise ConnectionResetError("broken at min_size")
        assert pool.stats().connecting == 1  # decided at once
        pool.wait(timeout=5)
        line_server.wait_for_accepted(2)
        grow_to_size(pool, line_server)  # 3 open now
        accepted = line_server.accepted
        with pytest.raises(ConnectionResetError), pool.get():
            raise ConnectionResetError("broken above min_size")
        s = pool.stats()
        assert (s.idle, s.in_use, s.connecting, s.discarded) == (2, 0, 0, 2)
        assert_within_bounds(pool)
        wait_until(lambda: line_server.closed == 2)
        assert line_server.accepted == accepted
    leak_check()


def test_a_broken_connection_is_replaced_for_a_waiting_caller(line_server, leak_check):
    """Above min_size, a connection that breaks while a caller waits is replaced, for that caller."""
    with ClosingLinePool(line_server, 2, min_size=1) as pool:
        pool.wait(timeout=5)
        burst = Burst(pool, 3)
        wait_until(lambda: len(burst.held) == 2 and pool.stats().waiting == 1)
        pool.discard(burst.held[0])
        burst.end()
        assert len(burst.held) == 3 and pool.stats().discarded == 1
        assert_within_bounds(pool)
        line_server.wait_for_accepted(3)
    leak_check()


def test_resize_keeps_min_size_and_refuses_a_size_below_it(line_server, leak_check):
    """resize() of an elastic pool refuses a size below min_size and changes nothing; a bigger size opens
    nothing at once; a smaller one closes only what the pool has above it."""
    with ClosingLinePool(line_server, 3, min_size=2) as pool:
        pool.wait(timeout=5)
        with pytest.raises(ValueError, match="min_size=2"):
            pool.resize(1)
        assert (pool.size, pool.min_size) == (3, 2)
        pool.resize(5)
        s = pool.stats()
        assert (s.size, s.min_size, s.idle + s.in_use + s.connecting) == (5, 2, 2)
        grow_to_size(pool, line_server)
        pool.resize(3)
        s = pool.stats()
        assert (s.size, s.idle, s.in_use, s.connecting, s.retired) == (3, 3, 0, 0, 2)
        pool.resize(2)
        s = pool.stats()
        assert (s.size, s.min_size, s.idle, s.retired) == (2, 2, 2, 3)
        wait_until(lambda: line_server.closed == 3)
        assert line_server.accepted == 5
    leak_check()


def test_a_fixed_pool_keeps_min_size_equal_to_size_through_resize(line_server, leak_check):
    """Without min_size the pool is fixed: min_size reads as size, and follows it through resize()."""
    with ClosingLinePool(line_server, 2) as pool:
        assert (pool.min_size, pool.max_idle, pool.stats().min_size) == (2, None, 2)
        pool.resize(4)
        assert (pool.min_size, pool.stats().min_size, open_or_opening(pool)) == (4, 4, 4)
        pool.wait(timeout=5)
        line_server.wait_for_accepted(4)
    leak_check()


def test_wait_waits_for_min_size_by_default(line_server, leak_check):
    """wait() returns once min_size connections are open; waiting for more times out without load."""
    with ClosingLinePool(line_server, 3, min_size=2) as pool:
        pool.wait(timeout=5)
        assert pool.stats().idle == 2
        with pytest.raises(PoolTimeout, match=r"3 of its 3|all 3"):
            pool.wait(timeout=0.05, min_open=3)
    leak_check()


def test_elastic_options_are_read_only_and_reported(line_server, leak_check):
    """min_size and max_idle read as given and refuse a new value; stats() and the idle.min figure report
    min_size, and size stays the maximum."""
    with ClosingLinePool(line_server, 3, min_size=1, max_idle=30) as pool:
        assert (pool.min_size, pool.max_idle) == (1, 30.0)
        for attribute in ("min_size", "max_idle"):
            with pytest.raises(AttributeError):
                setattr(pool, attribute, 2)
        s = pool.stats()
        assert (s.size, s.min_size) == (3, 1)
        figures = {figure.name: figure.read(s) for figure in FIGURES if figure.state is None}
        assert figures["db.client.connection.idle.min"] == 1
        assert figures["db.client.connection.idle.max"] == figures["db.client.connection.max"] == 3
    leak_check()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_opens_min_size(threaded_server, leak_check):  # noqa: F811 (the imported fixture)
    """After fork(), the child's first call reopens min_size connections of its own, not size."""
    fork: Callable[[], int] = gevent.fork
    with ClosingLinePool(threaded_server.server, 4, min_size=1, max_idle=MAX_IDLE) as pool:
        pool.wait(timeout=5)
        burst = Burst(pool, 4)  # the server counts in its own thread: the pool's count is what matters
        wait_until(lambda: len(burst.held) == 4, message=lambda: repr(pool))
        burst.end()

        def child() -> Dict[str, int]:
            before = open_or_opening(pool)
            pool.wait(timeout=5)
            s = pool.stats()
            return {
                "before": before,
                "open": s.idle + s.in_use,
                "connecting": s.connecting,
                "opened": s.opened,
            }

        report = run_child(fork, child)
        assert report == {"before": 1, "open": 1, "connecting": 0, "opened": 1}
        assert_within_bounds(pool)
    threaded_server.stop()
    leak_check()
