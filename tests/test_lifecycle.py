"""Lifecycle control: discard() by the holder, explicit leases, close(timeout) and resize(), against a real
line server that counts the connections it accepted and saw closed.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, List

import gevent
import pytest
from doubles import FLAVOURS, FastLinePool
from gevent.event import Event
from helpers import LineServer, recv_line, request, wait_until
from test_threads import run_in_real_thread

from geventconnpool import PoolClosed, PoolTimeout


def steady_load(pool: Any, stop: Event, errors: List[BaseException]) -> None:
    """One caller's steady load: PING every millisecond, at most 2,000 times, until ``stop`` is set; the
    first error ends it, in ``errors``."""
    for _ in range(2000):
        if stop.is_set():
            return
        try:
            assert request(pool, b"PING") == b"PONG"
        except BaseException as error:
            errors.append(error)
            return
        gevent.sleep(0.001)


def talk(c: Any, command: bytes = b"PING") -> bytes:
    c.sendall(command + b"\n")
    return recv_line(c)


# -- discard() -------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_discard_closes_and_replaces_when_the_block_ends(line_server, leak_check, flavour):
    """discard(c) raises nothing; c works until its block ends, then the server sees it closed and a
    replacement opened, whatever the pool's options."""
    with FastLinePool(line_server, 1, **FLAVOURS[flavour]) as pool:
        pool.wait(timeout=5)
        with pool.get() as c:
            pool.discard(c)
            pool.discard(c)  # again: nothing more
            assert talk(c) == b"PONG"
            assert line_server.closed == 0
        assert pool.dropped == [c]
        wait_until(lambda: line_server.closed == 1)
        pool.wait(timeout=5)
        line_server.wait_for_accepted(2)
        with pool.get() as again:
            assert again is not c
        s = pool.stats()
        assert (s.idle, s.in_use, s.connecting, s.discarded) == (1, 0, 0, 1)
    leak_check()


def test_discard_then_an_error_closes_once(line_server, leak_check):
    """A discarded connection whose block then raises one of exc_classes is closed and replaced once."""
    with FastLinePool(line_server, 1) as pool:
        pool.wait(timeout=5)
        with pytest.raises(ConnectionResetError), pool.get() as c:
            pool.discard(c)
            raise ConnectionResetError("and then it broke")
        assert pool.dropped == [c]
        pool.wait(timeout=5)
        assert pool.stats().discarded == 1
        line_server.wait_for_accepted(2)
    leak_check()


def test_discarded_connection_is_never_handed_to_a_waiter(line_server, leak_check):
    """A caller waiting when a discarded connection comes back gets its replacement, not it."""
    with FastLinePool(line_server, 1) as pool:
        pool.wait(timeout=5)
        got: List[Any] = []

        def wait_for_one() -> None:
            with pool.get(timeout=5) as c:
                got.append(c)

        with pool.get() as c:
            pool.discard(c)
            waiter = gevent.spawn(wait_for_one)
            wait_until(lambda: pool.stats().waiting == 1)
        waiter.join(timeout=5)
        assert got and got[0] is not c and got[0] is pool.created[1]
    leak_check()


def test_discard_of_what_the_caller_does_not_hold_raises_value_error(line_server, leak_check):
    """discard() of an idle connection, of one given back, or of an unknown object raises ValueError naming
    the pool, and changes nothing."""
    with FastLinePool(line_server, 2, name="disc") as pool, FastLinePool(line_server, 1) as other:
        pool.wait(timeout=5)
        other.wait(timeout=5)
        with pool.get() as c:
            pass
        with other.get() as foreign:
            for stranger in (c, foreign, object()):
                with pytest.raises(ValueError, match=r"'disc'.*no caller holds"):
                    pool.discard(stranger)
        with pool.get() as held:
            assert held is c
        assert pool.dropped == [] and pool.stats().discarded == 0
        assert line_server.closed == 0
    leak_check()


def test_discard_while_the_pool_closes_closes_without_replacement(line_server, leak_check):
    """A connection discarded by its holder around close() is closed when its block ends, not replaced; on a
    closed pool, discard() does nothing, and raises nothing."""
    with FastLinePool(line_server, 1) as pool:
        pool.wait(timeout=5)
        with pool.get() as c:
            pool.discard(c)
            pool.close()
            pool.discard(c)  # on a closed pool: nothing more
        assert pool.dropped == [c]
        pool.discard(c)  # even given back
        assert pool.stats().connecting == 0
        wait_until(lambda: line_server.closed == 1)
        assert line_server.accepted == 1
    leak_check()


# -- acquire() and release() -------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_acquire_and_release_lend_like_get(line_server, leak_check, flavour):
    """acquire() lends a connection until release() gives it back, to be lent again; release(c,
    discard=True) closes and replaces it."""
    with FastLinePool(line_server, 1, **FLAVOURS[flavour]) as pool:
        pool.wait(timeout=5)
        c = pool.acquire()
        assert talk(c) == b"PONG"
        assert (pool.stats().idle, pool.stats().in_use) == (0, 1)
        pool.release(c)
        assert (pool.stats().idle, pool.stats().in_use) == (1, 0)
        again = pool.acquire(timeout=1)
        assert again is c
        pool.release(again, discard=True)
        assert pool.dropped == [c]
        pool.wait(timeout=5)
        with pool.get() as new:
            assert new is pool.created[1]
        assert pool.stats().checkouts == 3
        wait_until(lambda: line_server.closed == 1)
    leak_check()


def test_release_misuse_raises_runtime_error_and_changes_nothing(line_server, leak_check):
    """Releasing twice, a connection from get(), or one the pool never lent raises RuntimeError, and the
    pool's state stays as it was."""
    with FastLinePool(line_server, 2, name="rel") as pool:
        pool.wait(timeout=5)
        c = pool.acquire()
        pool.release(c)
        before = pool.stats()
        with pytest.raises(RuntimeError, match=r"'rel'.*did not lend"):
            pool.release(c)
        with pool.get() as from_get, pytest.raises(RuntimeError, match="did not lend"):
            pool.release(from_get)
        with pytest.raises(RuntimeError, match="did not lend"):
            pool.release(object(), discard=True)
        leased = pool.acquire()
        with pytest.raises(TypeError, match="discard"):
            pool.release(leased, discard="yes")  # type: ignore[arg-type]
        after = pool.stats()
        assert (after.idle, after.in_use, after.discarded) == (1, 1, 0)
        assert before.idle == 2
        pool.release(leased)
        assert pool.dropped == []
    leak_check()


def test_acquire_waits_first_come_first_served_and_times_out(line_server, leak_check):
    """acquire() waits in the same queue as get(), first come first served, and raises PoolTimeout after
    its timeout."""
    with FastLinePool(line_server, 1) as pool:
        pool.wait(timeout=5)
        c = pool.acquire()
        with pytest.raises(PoolTimeout):
            pool.acquire(timeout=0.01)
        order: List[str] = []

        def by_get() -> None:
            with pool.get(timeout=5):
                order.append("get")

        def by_acquire() -> None:
            conn = pool.acquire(timeout=5)
            order.append("acquire")
            pool.release(conn)

        first = gevent.spawn(by_acquire)
        wait_until(lambda: pool.stats().waiting == 1)
        second = gevent.spawn(by_get)
        wait_until(lambda: pool.stats().waiting == 2)
        pool.release(c)
        gevent.joinall([first, second], timeout=5)
        assert order == ["acquire", "get"]
        assert pool.stats().timeouts == 1
    leak_check()


def test_acquire_from_another_thread_raises(line_server, leak_check):
    """acquire(), release() and discard() from a thread other than the pool's raise RuntimeError."""
    with FastLinePool(line_server, 1) as pool:
        pool.wait(timeout=5)
        c = pool.acquire()
        for call in (pool.acquire, lambda: pool.release(c), lambda: pool.discard(c)):
            kind, error, _ = run_in_real_thread(call)
            assert kind == "error" and isinstance(error, RuntimeError), error
        pool.release(c)
    leak_check()


def test_leak_warning_names_the_acquire_call(line_server, leak_check, pool_log):
    """A connection held past leak_warning after acquire() logs the line of the acquire() call."""
    with FastLinePool(line_server, 1, leak_warning=0.05) as pool:
        pool.wait(timeout=5)
        line = sys._getframe().f_lineno + 1
        c = pool.acquire()
        wait_until(lambda: pool_log.records(logging.WARNING))
        message = pool_log.messages(logging.WARNING)[0]
        assert f'{os.path.basename(__file__)}", line {line}, in test_leak_warning_names' in message
        pool.release(c)
    leak_check()


# -- close(timeout) ---------------------------------------------------------------------------------------


def test_close_with_timeout_waits_for_holders_that_return(line_server, leak_check):
    """close(timeout) returns once the held connections came back, each closed once, after their holders
    finished undisturbed."""
    pool = FastLinePool(line_server, 2)
    pool.wait(timeout=5)
    finish = Event()
    replies: List[bytes] = []

    def holder() -> None:
        with pool.get() as c:
            finish.wait()
            replies.append(talk(c))

    holders = [gevent.spawn(holder) for _ in range(2)]
    wait_until(lambda: pool.stats().in_use == 2)
    gevent.spawn_later(0.02, finish.set)
    pool.close(timeout=5)
    assert replies == [b"PONG", b"PONG"]
    assert sorted(map(id, pool.dropped)) == sorted(map(id, pool.created))
    gevent.joinall(holders, timeout=5)
    wait_until(lambda: line_server.closed == 2)
    leak_check()


def test_close_with_timeout_closes_under_holders_that_do_not_return(line_server, leak_check, pool_log):
    """close(timeout) closes what is still held when the time is up; the holder's next I/O fails, and its
    block's end, or release(), closes nothing twice."""
    pool = FastLinePool(line_server, 3)
    pool.wait(timeout=5)
    with pool.get() as c:
        leased = pool.acquire()
        pool.close(timeout=0.02)
        assert len(pool.dropped) == 3
        wait_until(lambda: line_server.closed == 3)
        with pytest.raises(OSError):
            talk(c)
        pool.release(leased)
    assert len(pool.dropped) == 3
    assert "2 connections still held" in " ".join(pool_log.messages(logging.WARNING))
    pool.close(timeout=0)  # again: nothing left
    assert len(pool.dropped) == 3
    leak_check()


def test_close_with_timeout_zero_and_bad_timeouts(line_server, leak_check):
    """close(timeout=0) closes held connections at once; a negative or non-number timeout is refused before
    anything closes."""
    pool = FastLinePool(line_server, 1)
    pool.wait(timeout=5)
    with pytest.raises(ValueError, match="timeout"):
        pool.close(timeout=-1)
    with pytest.raises(TypeError, match="timeout"):
        pool.close(timeout="1")  # type: ignore[arg-type]
    assert not pool.closed
    with pool.get() as c:
        pool.close(timeout=0)
        assert pool.dropped == [c]
    assert pool.dropped == [c]
    leak_check()


# -- resize() -----------------------------------------------------------------------------------


def test_resize_grows_at_once_in_the_background(line_server, leak_check):
    """resize() to more opens the new connections in the background; size is the new one at once."""
    with FastLinePool(line_server, 2) as pool:
        pool.wait(timeout=5)
        pool.resize(5)
        s = pool.stats()
        assert (pool.size, s.size, s.idle + s.in_use + s.connecting) == (5, 5, 5)
        pool.wait(timeout=5)
        line_server.wait_for_accepted(5)
    leak_check()


def test_resize_shrinks_idle_first_then_held_ones_when_they_come_back(line_server, leak_check):
    """resize() to fewer closes idle connections at once, then held ones, for good, as they come back."""
    with FastLinePool(line_server, 4) as pool:
        pool.wait(timeout=5)
        with pool.get() as a, pool.get() as b:
            pool.resize(1)
            s = pool.stats()
            assert (s.size, s.idle, s.in_use, s.connecting, s.retiring) == (1, 0, 1, 0, 1)
            wait_until(lambda: line_server.closed == 2)
            assert talk(a) == b"PONG" and talk(b) == b"PONG"
        wait_until(lambda: line_server.closed == 3)
        s = pool.stats()
        assert (s.size, s.idle, s.in_use, s.connecting, s.retiring, s.retired) == (1, 1, 0, 0, 0, 3)
        assert line_server.accepted == 4
        for _ in range(3):
            assert request(pool, b"PING") == b"PONG"
    leak_check()


def test_a_retiring_connection_held_too_long_still_warns(line_server, leak_check, pool_log):
    """leak_warning covers a held connection that a shrink took out of the pool's size."""
    with FastLinePool(line_server, 2, leak_warning=0.05) as pool:
        pool.wait(timeout=5)
        with pool.get(), pool.get():
            pool.resize(1)
            assert pool.stats().retiring == 1
            wait_until(lambda: len(pool_log.messages(logging.WARNING)) == 2)
        assert pool.stats().retired == 1
    leak_check()


def test_resize_during_an_outage_cancels_connecting_slots(leak_check):
    """resize() to fewer while connections cannot open leaves only the new size opening: once the server
    is back, the pool opens them, closes the surplus at once, and keeps the new size."""
    server = LineServer()
    server.start()
    server.stop()
    with FastLinePool(server, 3) as pool:
        wait_until(lambda: pool.stats().failed_connects >= 3)
        pool.resize(1)
        s = pool.stats()
        assert (s.size, s.connecting, s.retiring) == (1, 1, 2)
        server.start()
        wait_until(lambda: pool.stats().retiring == 0 and pool.stats().idle == 1)
        s = pool.stats()
        assert (s.idle, s.in_use, s.connecting, s.retired) == (1, 0, 0, 2)
        wait_until(lambda: server.closed == server.accepted - 1)
        server.stop()
    leak_check()


def test_resize_refuses_bad_sizes_and_a_closed_pool(line_server, leak_check):
    """resize() of a non-int or of less than 1 raises at once, naming size; of a closed pool, PoolClosed."""
    with FastLinePool(line_server, 1) as pool:
        with pytest.raises(TypeError, match="size"):
            pool.resize(2.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="size"):
            pool.resize(0)
        assert pool.size == 1
    with pytest.raises(PoolClosed):
        pool.resize(2)
    leak_check()


# -- drain() ------------------------------------------------------------------------------------------


class MovablePool(FastLinePool):
    """A FastLinePool whose address the test changes, as rotated credentials or a failover would."""

    def _new_connection(self) -> Any:
        self.server_address = self.target.address
        return super()._new_connection()

    target: LineServer


def movable(server: LineServer, size: int, **options: Any) -> MovablePool:
    MovablePool.target = server
    pool = MovablePool(server, size, **options)
    pool.target = server
    return pool


def test_drain_under_load_replaces_every_connection_within_its_bound(leak_check):
    """drain(wait=True) under steady load moves every connection to the new server: no caller fails or waits
    past its timeout, every loan after it is a new connection, and no more than size + size // 4 connections
    are ever open or opening."""
    old_server, new_server = LineServer(), LineServer()
    old_server.start()
    new_server.start()
    size = 8
    with movable(old_server, size, timeout=5) as pool:
        pool.wait(timeout=5)
        stop = Event()
        errors: List[BaseException] = []
        most = [0]

        def load() -> None:
            steady_load(pool, stop, errors)

        def sample() -> None:
            while not stop.is_set():
                most[0] = max(most[0], pool.calls - len(pool.dropped))
                s = pool.stats()
                most[0] = max(most[0], s.idle + s.in_use + s.connecting + s.retiring)
                gevent.sleep(0)

        workers = [gevent.spawn(load) for _ in range(12)]
        sampler = gevent.spawn(sample)
        gevent.sleep(0.02)
        pool.target = new_server
        pool.drain(wait=True)
        assert old_server.accepted == size and new_server.accepted >= size
        for _ in range(size * 3):
            with pool.get() as c:
                assert c.getpeername()[1] == new_server.port
        stop.set()
        gevent.joinall([*workers, sampler], timeout=10)
        assert errors == []
        assert most[0] <= size + size // 4, most[0]
        wait_until(lambda: old_server.closed == size)
        s = pool.stats()
        assert (s.size, s.idle + s.in_use + s.connecting, s.retiring, s.retired) == (size, size, 0, size)
    old_server.stop()
    new_server.stop()
    leak_check()


def test_drain_with_a_failing_canary_raises_and_changes_nothing(line_server, leak_check):
    """When the canary cannot connect, drain() raises its error and the old connections keep serving."""
    dead = LineServer()
    dead.start()
    dead.stop()
    with movable(line_server, 2) as pool:
        pool.wait(timeout=5)
        before = pool.stats()
        pool.target = dead
        with pytest.raises(ConnectionRefusedError):
            pool.drain(wait=True)
        assert pool.stats() == before
        assert request(pool, b"PING") == b"PONG"
        assert (line_server.accepted, line_server.closed) == (2, 0)
    leak_check()


def test_drain_closes_a_held_old_connection_when_it_comes_back(line_server, leak_check):
    """An old connection held during a drain serves its holder to the end, then is closed, not reused;
    drain(wait=True) returns only then."""
    with movable(line_server, 2) as pool:
        pool.wait(timeout=5)
        with pool.get() as held:
            draining = gevent.spawn(pool.drain, wait=True)
            wait_until(lambda: pool.stats().retiring == 1 and pool.stats().idle == 2)  # made before the break
            gevent.sleep(0.03)  # a few polls of drain(wait=True): it is still waiting (a negative check)
            assert not draining.ready()
            assert talk(held) == b"PONG"
        draining.get(timeout=5)
        assert held in pool.dropped
        wait_until(lambda: line_server.closed == 2)
        assert line_server.accepted == 4
    leak_check()


def test_drain_again_starts_over_from_the_current_connections(line_server, leak_check):
    """A second drain() during a drain replaces what is open then; in the end only new connections remain."""
    with movable(line_server, 4) as pool:
        pool.wait(timeout=5)
        first = set(pool.created)
        pool.drain()
        pool.drain(wait=True)
        wait_until(lambda: pool.stats().connecting == 0)
        with pool.get() as a, pool.get() as b, pool.get() as c, pool.get() as d:
            assert not {a, b, c, d} & first
        s = pool.stats()
        assert (s.idle, s.retiring) == (4, 0)
        assert s.opened - s.retired == 4
    leak_check()


def test_drain_refuses_a_closed_pool_and_a_bad_wait(line_server, leak_check):
    """drain() of a closed pool raises PoolClosed; wait must be a bool."""
    with FastLinePool(line_server, 1) as pool, pytest.raises(TypeError, match="wait"):
        pool.drain(wait=1)  # type: ignore[arg-type]
    with pytest.raises(PoolClosed):
        pool.drain()
    leak_check()


def test_resize_both_ways_under_load(line_server, leak_check):
    """Resizing up and down while callers keep borrowing fails no caller, keeps the gauges summing to the new
    size, and ends with exactly the new size open."""
    with FastLinePool(line_server, 4, timeout=5) as pool:
        pool.wait(timeout=5)
        stop = Event()
        errors: List[BaseException] = []

        def load() -> None:
            steady_load(pool, stop, errors)

        workers = [gevent.spawn(load) for _ in range(8)]
        for size in (8, 2, 6, 1, 3):
            gevent.sleep(0.02)
            pool.resize(size)
            s = pool.stats()
            assert (s.size, s.idle + s.in_use + s.connecting) == (size, size)
        stop.set()
        gevent.joinall(workers, timeout=10)
        assert errors == []
        pool.wait(timeout=5)
        s = pool.stats()
        assert (s.idle, s.in_use, s.connecting, s.retiring) == (3, 0, 0, 0)
        wait_until(lambda: len(line_server.open) == 3)
        assert s.opened - s.retired - s.discarded == 3
    leak_check()
