"""Lending: what get() hands out and takes back, who waits and in what order, and get()'s timeout."""

from __future__ import annotations

import time

# -- what get() lends and takes back ---------------------------------------------------------------
from typing import Any

import gevent
import pytest
from doubles import FLAVOURS, Conn, FakeConn, FakePool, LineTrackingPool, RecordingLinePool, holds
from helpers import LinePool, raise_in_block, recv_line, request, wait_until
from reliability_checks import check_closed

from geventconnpool import PoolError, PoolTimeout


def test_get_hands_back_the_object_new_connection_returned(line_server, leak_check):
    """`with pool.get() as c` yields the very object that _new_connection returned, and it works."""
    with RecordingLinePool(line_server, 3) as pool:
        pool.wait(timeout=5)
        with pool.get() as c:
            assert holds(pool.created, c)
            c.sendall(b"ECHO identity\n")
            assert recv_line(c) == b"identity"
        assert len(pool.created) == 3
    leak_check()


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_no_two_holders_share_a_connection(flavour, line_server, leak_check):
    """Many greenlets borrowing concurrently never hold the same connection at the same time."""
    holders = {}
    overlaps = []
    used = set()

    def worker(n):
        for i in range(8):
            token = b"w%d-%d" % (n, i)
            with pool.get() as c:
                if id(c) in holders:
                    overlaps.append((holders[id(c)], n))
                holders[id(c)] = n
                used.add(id(c))
                c.sendall(b"ECHO " + token + b"\n")
                gevent.sleep(0)  # let the others run while this one holds c
                reply = recv_line(c)
                del holders[id(c)]
            assert reply == token

    with RecordingLinePool(line_server, 4, **FLAVOURS[flavour]) as pool:
        pool.wait(timeout=5)
        workers = [gevent.spawn(worker, n) for n in range(24)]
        gevent.joinall(workers, timeout=20, raise_error=True)
        assert all(w.successful() for w in workers)
        assert overlaps == []
        assert used <= {id(c) for c in pool.created}
        assert len(used) == 4
        assert line_server.accepted == 4
        assert pool.stats().checkouts == 24 * 8
    leak_check()


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_normal_exit_returns_the_connection(flavour, line_server, leak_check):
    """A block that ends normally gives its connection back, and it is lent again."""
    with RecordingLinePool(line_server, 1, **FLAVOURS[flavour]) as pool:
        pool.wait(timeout=5)
        for _ in range(5):
            assert request(pool, b"PING") == b"PONG"
        with pool.get() as c:
            assert c is pool.created[0]
        assert line_server.accepted == 1
        assert pool.stats().checkouts == 6
    leak_check()


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_other_exception_returns_the_connection(flavour, line_server, leak_check):
    """Any other Exception in the block propagates unchanged and the same connection is lent again."""
    with RecordingLinePool(line_server, 1, **FLAVOURS[flavour]) as pool:
        pool.wait(timeout=5)
        first = raise_in_block(pool, KeyError("not a network problem"))
        with pool.get() as c:
            assert c is first
            c.sendall(b"PING\n")
            assert recv_line(c) == b"PONG"
        assert pool.dropped == []
        assert line_server.accepted == 1
        assert line_server.closed == 0
        assert pool.stats().discarded == 0
    leak_check()


BLACK_BOXES = {
    "object": object,  # no close() at all
    "dict": dict,  # falsy while empty
    "FakeConn": lambda: FakeConn(0),  # a close() the pool must call
}


@pytest.mark.parametrize("kind", list(BLACK_BOXES))
def test_black_box_connections(kind, leak_check):
    """Any non-None object is a connection: lent as is, never re-created while alive, and discarded safely."""
    with FakePool(2, factory=BLACK_BOXES[kind]) as pool:
        pool.wait(timeout=5)
        assert pool.connect_calls == 2
        with pool.get() as c:
            assert holds(pool.conns, c)
        victim = raise_in_block(pool, OSError("broken"))
        assert pool.close_calls == [victim]
        if isinstance(victim, FakeConn):
            assert victim.closed == 1
        pool.wait(timeout=5)
        stats = pool.stats()
        assert (stats.idle, stats.opened, stats.discarded, stats.failed_connects) == (2, 3, 1, 0)
        with pool.get() as a, pool.get() as b:
            assert a is not victim
            assert b is not victim
            assert a is not b
    leak_check()


def test_a_lease_entered_again_raises_instead_of_sharing_the_connection(leak_check):
    """Entering a finished ``pool.get()`` lease a second time raises RuntimeError (as 0.2.1's generator did)
    instead of lending a connection that another holder may have."""
    with FakePool(2, name="reentered") as pool:
        pool.wait(timeout=5)
        lease = pool.get()
        with lease as first:
            pass
        with pytest.raises(RuntimeError, match="one with statement only"), lease:
            pass
        with pool.get() as b, pool.get() as c:
            assert first in (b, c) and b is not c
        s = pool.stats()
        assert (s.idle, s.in_use, s.checkouts) == (2, 0, 3), s
    leak_check()


# -- get(timeout) ----------------------------------------------------------------------------------


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


@pytest.mark.parametrize("options", [{}, {"keepalive": 60}, {"check_after": 60}])
def test_nested_get_on_a_pool_of_one_raises_pool_timeout(line_server, leak_check, options):
    """A greenlet that asks for a second connection of a pool of 1 it already holds gets PoolTimeout when
    the timeout ends (not before), and keeps its first connection."""
    with LineTrackingPool(line_server, 1, timeout=0.3, **options) as pool:
        pool.wait(timeout=5)
        with pool.get() as outer:
            started = time.monotonic()
            with pytest.raises(PoolTimeout, match=r"within 0\.3 s"), pool.get():
                pass
            assert 0.3 <= time.monotonic() - started < 5
            started = time.monotonic()
            with pytest.raises(PoolTimeout, match=r"within 0\.1 s"), pool.get(timeout=0.1):
                pass
            assert 0.1 <= time.monotonic() - started < 5
            pool.ping(outer)
        s = pool.stats()
        assert (s.idle, s.timeouts, s.discarded) == (1, 2, 0)
        with pool.get() as again:
            assert again is outer
    check_closed(pool)
    leak_check()


# -- waiters, first come first served --------------------------------------------------------------


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


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_a_second_exit_of_a_lease_raises_and_changes_nothing(flavour, leak_check):
    """1.0: exiting a lease twice put its connection in the pool twice (idle=2, in_use=-1 on a pool of 1),
    so two callers then held one connection; now the second exit raises RuntimeError and changes nothing.
    """

    class Pool(FakePool):
        def _keepalive(self, c: Any) -> None:
            pass

    counter = iter(range(1000))
    with Pool(1, factory=lambda: Conn(next(counter)), **FLAVOURS[flavour]) as pool:
        pool.wait(timeout=5)
        lease = pool.get()
        lease.__enter__()
        lease.__exit__(None, None, None)
        with pytest.raises(RuntimeError, match="once"):
            lease.__exit__(None, None, None)
        s = pool.stats()
        assert (s.idle, s.in_use, s.connecting) == (1, 0, 0)
        with pool.get() as c:
            assert pool.stats().idle == 0
            with pytest.raises(PoolTimeout):
                pool.get(timeout=0)
        assert c.number == 0


def test_a_second_exit_after_a_discard_raises_and_discards_nothing_more(leak_check):
    """A lease whose block broke its connection, exited again, raises RuntimeError and discards no other."""
    counter = iter(range(1000))
    with FakePool(1, factory=lambda: Conn(next(counter))) as pool:
        pool.wait(timeout=5)
        lease = pool.get()
        lease.__enter__()
        error = OSError("broken")
        lease.__exit__(OSError, error, None)
        pool.wait(timeout=5)
        with pytest.raises(RuntimeError, match="once"):
            lease.__exit__(OSError, error, None)
        assert pool.stats().discarded == 1
        s = pool.stats()
        assert (s.idle, s.in_use, s.connecting) == (1, 0, 0)


def test_exiting_a_lease_that_was_never_entered_raises(leak_check):
    """A lease exited without being entered raises RuntimeError: only a with statement gives a loan back."""
    counter = iter(range(1000))
    with FakePool(1, factory=lambda: Conn(next(counter))) as pool:
        pool.wait(timeout=5)
        lease = pool.get()
        with pytest.raises(RuntimeError):
            lease.__exit__(None, None, None)
        with lease:
            pass
        assert pool.stats().idle == 1
