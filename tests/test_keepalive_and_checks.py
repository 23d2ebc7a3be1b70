"""keepalive (idle connections pinged in the background) and check_after (a check inside get())."""

from __future__ import annotations

import logging
import time

# -- keepalive -------------------------------------------------------------------------------------
from typing import Any

import gevent
import pytest
from doubles import (
    LOGGER,
    Conn,
    ControlFlow,
    FakePool,
    FastLinePool,
    LineTrackingPool,
    RecordingLinePool,
    warnings_of,
)
from faultproxy import FaultProxy
from gevent import socket
from gevent.event import Event
from helpers import LinePool, LineServer, local_port, pool_greenlets, recv_line, request, wait_until
from reliability_checks import check_closed

from geventconnpool import PoolClosed, PoolTimeout


class TaggedKeepalivePool(RecordingLinePool):
    """A pool whose keepalive sends ``KA <local port>``: the server's log says which connection was pinged."""

    def _keepalive(self, c):
        tag = ka_tag(c)
        c.sendall(tag)
        if recv_line(c) + b"\n" != tag:
            raise OSError("keepalive: wrong reply")


def ka_tag(c) -> bytes:
    """The keepalive command line that :class:`TaggedKeepalivePool` sends on ``c``."""
    return b"KA %d\n" % c.getsockname()[1]


def pings(server: LineServer, c) -> int:
    """How many keepalive pings the server received on the connection ``c``."""
    return server.commands.count(ka_tag(c))


def test_keepalive_pings_every_idle_connection_and_never_a_held_one(line_server, leak_check):
    """Every idle connection is pinged each period, in turn with the others; a held one is never pinged."""
    with TaggedKeepalivePool(line_server, 4, keepalive=0.1) as pool:
        pool.wait(timeout=5)
        with pool.get() as held:
            before = pings(line_server, held)
            start = len(line_server.commands)
            others = [c for c in pool.created if c is not held]
            assert len(others) == 3
            # Three pings of one connection span at least two periods.
            wait_until(lambda: all(pings(line_server, c) - before >= 3 for c in others), timeout=10)
            gevent.sleep(0.1)  # one more period, still held: a bounded wait for a negative check
            assert pings(line_server, held) == before
            # Between any connection's first and third ping, every other idle one was pinged too.
            log = line_server.commands[start:]
            for c in others:
                mine = [i for i, line in enumerate(log) if line == ka_tag(c)]
                window = set(log[mine[0] : mine[2]])
                for other in others:
                    assert ka_tag(other) in window, (ka_tag(c), ka_tag(other), log)
            # The held connection is still in a clean protocol state: no ping reply is waiting on it.
            held.sendall(b"ECHO mine\n")
            assert recv_line(held) == b"mine"
        count = pings(line_server, held)
        wait_until(lambda: pings(line_server, held) > count, timeout=10)  # idle again, so pinged again
        assert line_server.accepted == 4
        assert pool.stats().keepalive_failures == 0
    leak_check()


def test_keepalive_never_touches_a_connection_in_use(line_server, leak_check):
    """With pings due all the time, callers still read their own replies: held connections are not pinged."""
    replies = []

    def worker(n):
        for i in range(8):
            token = b"w%d-%d" % (n, i)
            with pool.get() as c:
                c.sendall(b"ECHO " + token + b"\n")
                gevent.sleep(0.003)  # hold it across the keepalive period
                replies.append((token, recv_line(c)))
            gevent.sleep(0.012)  # and leave it idle long enough to be pinged

    with TaggedKeepalivePool(line_server, 3, keepalive=0.005) as pool:
        pool.wait(timeout=5)
        workers = [gevent.spawn(worker, n) for n in range(6)]
        gevent.joinall(workers, timeout=20, raise_error=True)
        assert all(w.successful() for w in workers)
        assert len(replies) == 6 * 8
        assert [token for token, reply in replies if token != reply] == []
        wait_until(lambda: all(pings(line_server, c) >= 2 for c in pool.created))
        stats = pool.stats()
        assert (stats.keepalive_failures, stats.discarded, stats.opened) == (0, 0, 3)
    leak_check()


class OneBadPingPool(TaggedKeepalivePool):
    """A pool whose first keepalive check says its connection is broken."""

    def __init__(self, *args, **kwargs):
        self.victim = None
        super().__init__(*args, **kwargs)

    def _keepalive(self, c):
        if self.victim is None:
            self.victim = c
            raise OSError("keepalive: no PONG")
        super()._keepalive(c)


def test_keepalive_failure_discards_and_replaces(line_server, leak_check):
    """A _keepalive raising OSError closes that connection (the server sees it) and the pool opens another."""
    with OneBadPingPool(line_server, 2, keepalive=0.05) as pool:
        pool.wait(timeout=5)
        wait_until(lambda: pool.victim is not None and pool.stats().opened == 3, timeout=10)
        pool.wait(timeout=5)
        assert pool.dropped == [pool.victim]
        assert pool.victim.fileno() == -1
        wait_until(lambda: line_server.closed == 1)
        assert line_server.accepted == 3
        stats = pool.stats()
        assert (stats.keepalive_failures, stats.discarded) == (1, 1)
        with pool.get() as a, pool.get() as b:
            assert pool.victim is not a
            assert pool.victim is not b
    leak_check()


class StuckPingPool(TaggedKeepalivePool):
    """A pool whose first keepalive check hangs until the test releases it, like a peer gone silent."""

    def __init__(self, *args, **kwargs):
        self.stuck = None
        self.stuck_at = 0.0
        self.release = Event()
        super().__init__(*args, **kwargs)

    def _keepalive(self, c):
        if self.stuck is None:
            self.stuck = c
            self.stuck_at = time.monotonic()
            self.release.wait()
        super()._keepalive(c)


def test_a_hung_keepalive_does_not_delay_the_others(line_server, leak_check):
    """While one connection's keepalive hangs, every other idle connection is still pinged each period."""
    with StuckPingPool(line_server, 3, keepalive=0.05, connect_timeout=30) as pool:
        pool.wait(timeout=5)
        wait_until(lambda: pool.stuck is not None)
        others = [c for c in pool.created if c is not pool.stuck]
        wait_until(lambda: all(pings(line_server, c) >= 3 for c in others), timeout=10)
        assert pings(line_server, pool.stuck) == 0
        with pool.get() as a, pool.get() as b:  # the stuck check holds its connection: nobody else gets it
            assert pool.stuck is not a
            assert pool.stuck is not b
            with pytest.raises(PoolTimeout):
                pool.get(timeout=0.1)
        pool.release.set()
        wait_until(lambda: pings(line_server, pool.stuck) >= 1)
        assert pool.stats().keepalive_failures == 0
    leak_check()


def test_a_keepalive_that_hangs_past_connect_timeout_discards(line_server, leak_check, pool_log):
    """A keepalive check that hangs fails after connect_timeout, with a warning: its connection is closed and
    replaced, and the check's greenlet ends.
    """
    with StuckPingPool(line_server, 2, keepalive=0.05, connect_timeout=0.3, name="hanging-ka") as pool:
        pool.wait(timeout=5)
        wait_until(lambda: pool.stats().keepalive_failures == 1, timeout=10)
        assert time.monotonic() - pool.stuck_at >= 0.3
        assert pool.dropped == [pool.stuck]
        assert pool.stuck.fileno() == -1
        warnings = pool_log.messages(logging.WARNING)
        assert any("the keepalive check raised" in m and "connect_timeout" in m for m in warnings), warnings
        pool.wait(timeout=5)
        assert pool.stats().opened == 3
        with pool.get() as a, pool.get() as b:
            assert pool.stuck is not a
            assert pool.stuck is not b
            # Held connections are never checked: no check can start, and the hung one has ended.
            wait_until(lambda: not [g for g in pool_greenlets() if "hanging-ka keepalive" in g.name])
        pool.release.set()
    leak_check()


# -- check_after -----------------------------------------------------------------------------------


def server_socket_for(server: LineServer, port: int) -> socket.socket:
    """The server-side socket of the connection whose client port is ``port``."""
    for sock in server.open:
        if sock.getpeername()[1] == port:
            return sock
    raise AssertionError(f"the server has no open connection from port {port}")


def test_check_after_discards_silently_cut_connections_inside_get(line_server, leak_check):
    """After idling past check_after, connections are checked in get(); the cut ones are discarded and the
    caller only gets working ones.  (Not watched: a silent cut, whose FIN never reaches this host.)
    """
    with FastLinePool(line_server, 3, check_after=0.05, watch_idle=False) as pool:
        pool.wait(timeout=5)
        with pool.get() as a, pool.get() as b, pool.get() as keep:
            ports = [local_port(a), local_port(b), local_port(keep)]
        gevent.sleep(0.1)  # every connection has now been idle longer than check_after
        for port in ports[:2]:
            server_socket_for(line_server, port).shutdown(socket.SHUT_RDWR)
        wait_until(lambda: line_server.closed == 2)
        pings_before = line_server.commands.count(b"PING\n")
        lent_ports = []
        with pool.get() as c1, pool.get() as c2, pool.get() as c3:
            for c in (c1, c2, c3):
                lent_ports.append(local_port(c))
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
        assert s.idle + s.in_use + s.connecting == s.size
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


class HangingKeepalivePool(LineTrackingPool):
    """A pool whose keepalive check never returns (the remote swallows the PING)."""

    def _keepalive(self, c: socket.socket) -> None:
        c.sendall(b"PING\n")
        Event().wait()


def test_check_after_that_hangs_is_bounded_by_connect_timeout(line_server, leak_check):
    """A check_after check that hangs fails after connect_timeout: get() discards that connection and returns
    a fresh one."""
    pool = HangingKeepalivePool(line_server, 1, check_after=0.05, connect_timeout=0.3)
    pool.wait(timeout=5)
    stale = pool.owned_ports()
    filled = time.monotonic()
    wait_until(lambda: time.monotonic() - filled >= 0.1)  # the connection is now older than check_after
    started = time.monotonic()
    with pool.get(timeout=5) as c:
        assert 0.3 <= time.monotonic() - started < 5
        assert c.getsockname()[1] not in stale
        pool.ping(c)
    s = pool.stats()
    assert (s.keepalive_failures, s.discarded, s.opened) == (1, 1, 2)
    check_closed(pool)
    leak_check()


@pytest.mark.watchdog(30)
def test_get_timeout_bounds_check_after_in_a_black_hole(line_server, leak_check):
    """Behind a load balancer that accepts connections but never answers, get(timeout=1) with check_after
    raises PoolTimeout within the timeout plus one connect_timeout, instead of checking for ever."""
    hole = FaultProxy(line_server.address)
    hole.start()
    try:
        with FastLinePool(hole, 2, check_after=0.05, connect_timeout=0.3, name="check-in-hole") as pool:
            pool.wait(timeout=5)
            hole.blackhole()  # new connects still succeed: the proxy accepts them
            filled = time.monotonic()
            wait_until(lambda: time.monotonic() - filled >= 0.1)  # the connections are older than check_after
            started = time.monotonic()
            # A plain gevent.Timeout (a BaseException): the check swallows any Exception, even an
            # AssertionError raised by a caller's timer (or by the watchdog).
            timer = gevent.Timeout(8)
            try:
                with timer, pytest.raises(PoolTimeout), pool.get(timeout=1.0):
                    pass
            except gevent.Timeout as fired:
                if fired is not timer:
                    raise
                raise AssertionError("get(timeout=1) was still checking connections after 8 s") from None
            assert 1.0 <= time.monotonic() - started < 1.0 + 0.3 + 3
    finally:
        hole.stop()
    leak_check()


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


def test_a_base_exception_from_a_background_keepalive_discards_the_connection(leak_check, capsys, caplog):
    """1.0: a BaseException raised by _keepalive in the background escaped its greenlet with a traceback;
    now it is a failed check: the connection is discarded and replaced.
    """
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    class Pool(FakePool):
        def _keepalive(self, c: Any) -> None:
            if c.number == 0:
                raise ControlFlow("bad ping")

    counter = iter(range(1000))
    with Pool(1, factory=lambda: Conn(next(counter)), keepalive=0.01) as pool:
        wait_until(lambda: pool.stats().keepalive_failures == 1 and pool.stats().idle == 1)
        with pool.get() as c:
            assert c.number == 1
        assert pool.stats().discarded == 1
    assert "Traceback" not in capsys.readouterr().err
    leak_check()


def test_a_failed_background_keepalive_logs_one_warning(line_server, leak_check, caplog):
    """1.0: a failed keepalive check logged "keepalive check failed" and then "discarding a broken
    connection": two WARNING lines for one connection; now one line names the pool, the check and the error.
    """
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with LinePool(line_server, 1, keepalive=0.02, name="ka-pool", watch_idle=False) as pool:
        pool.wait(timeout=5)
        line_server.cut_all()
        wait_until(lambda: pool.stats().keepalive_failures == 1)
        warnings = warnings_of(caplog)
        assert len(warnings) == 1, warnings
        assert "ka-pool" in warnings[0] and "keepalive" in warnings[0] and "Error" in warnings[0]
        pool.wait(timeout=5)
    line_server.stop()
    leak_check()


def test_a_failed_check_after_logs_one_warning(line_server, leak_check, caplog):
    """1.0: a check_after check that failed in get() logged two WARNING lines; now one, naming the check."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with LinePool(line_server, 1, check_after=0.01, name="ca-pool", watch_idle=False) as pool:
        pool.wait(timeout=5)
        line_server.cut_all()
        wait_until(lambda: line_server.closed == 1)
        gevent.sleep(0.1)  # a precondition, not the thing asserted: idle past check_after, so get() checks it
        with pool.get() as c:
            c.sendall(b"PING\n")
            assert recv_line(c) == b"PONG"
        warnings = warnings_of(caplog)
        assert len(warnings) == 1, warnings
        assert "ca-pool" in warnings[0] and "check_after" in warnings[0]
    line_server.stop()
    leak_check()
