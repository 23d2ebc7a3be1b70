"""max_waiting: past that many waiting callers, get() sheds load at once with PoolOverloaded."""

from __future__ import annotations

import time
from typing import List

import gevent
import pytest
from doubles import FLAVOURS
from gevent.event import Event
from helpers import LinePool, recv_line, request, wait_until

from geventconnpool import PoolOverloaded, PoolTimeout


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_the_caller_past_max_waiting_fails_at_once_and_the_waiters_are_served_in_order(
    line_server, leak_check, flavour
):
    """With every connection held and max_waiting callers queued, the next get() raises PoolOverloaded
    at once, naming the pool and its gauges; the queued callers are then served, first come, first served,
    each with a working connection."""
    release = Event()
    served: List[int] = []

    def hold() -> None:
        with pool.get():
            release.wait()

    def queue(number: int) -> None:
        with pool.get() as c:
            served.append(number)
            c.sendall(b"ECHO %d\n" % number)
            assert recv_line(c) == b"%d" % number

    with LinePool(line_server, 2, max_waiting=3, name="shed", **FLAVOURS[flavour]) as pool:
        pool.wait(timeout=5)
        holders = [gevent.spawn(hold) for _ in range(2)]
        wait_until(lambda: pool.stats().in_use == 2)
        waiters = []
        for number in range(3):
            waiters.append(gevent.spawn(queue, number))
            wait_until(lambda: pool.stats().waiting == number + 1)  # noqa: B023 (used at once)
        started = time.monotonic()
        with pytest.raises(PoolOverloaded) as info:
            pool.get()
        assert time.monotonic() - started < 1.0  # at once, not after the pool's 30 s timeout
        assert isinstance(info.value, PoolTimeout)
        message = str(info.value)
        assert "pool 'shed' is overloaded: max_waiting=3 callers wait already" in message
        for gauge in ("idle=0", "in_use=2", "connecting=0", "waiting=3"):
            assert gauge in message
        s = pool.stats()
        assert (s.overloaded, s.timeouts, s.waiting) == (1, 0, 3)
        release.set()
        gevent.joinall(holders + waiters, timeout=5, raise_error=True)
        assert served == [0, 1, 2]
        assert request(pool, b"PING") == b"PONG"  # the queue drained: no longer overloaded
        assert pool.stats().overloaded == 1
    leak_check()


def test_max_waiting_does_not_limit_callers_that_find_a_connection(line_server, leak_check):
    """Only waiting is limited: with max_waiting=1, callers that find an idle connection never fail, and
    one caller may still wait for a busy pool."""
    with LinePool(line_server, 2, max_waiting=1) as pool:
        pool.wait(timeout=5)
        with pool.get(), pool.get():
            waiter = gevent.spawn(request, pool, b"PING")
            wait_until(lambda: pool.stats().waiting == 1)
            with pytest.raises(PoolOverloaded):
                pool.get(timeout=5)
        assert waiter.get(timeout=5) == b"PONG"
        for _ in range(10):
            assert request(pool, b"PING") == b"PONG"
        assert pool.stats().overloaded == 1
    leak_check()


def test_a_waiter_that_gives_up_frees_its_place(line_server, leak_check):
    """A waiter that times out leaves the queue, so the next caller may wait again rather than be refused."""
    with LinePool(line_server, 1, max_waiting=1) as pool:
        pool.wait(timeout=5)
        with pool.get():
            with pytest.raises(PoolTimeout) as info:
                pool.get(timeout=0.01)
            assert not isinstance(info.value, PoolOverloaded)
            with pytest.raises(PoolTimeout) as info:
                pool.get(timeout=0.01)
            assert not isinstance(info.value, PoolOverloaded)
        s = pool.stats()
        assert (s.timeouts, s.overloaded) == (2, 0)
    leak_check()
