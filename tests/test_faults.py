"""The pool under faults: a real redis-server or line server, and a fault-injecting proxy.

Every scenario ends by checking what a user would check after an incident:
the pool is back to ``size`` healthy connections, the network (the proxy,
redis' ``CLIENT LIST`` or the line server) saw each connection the pool opened
either closed or still open and owned by the pool, ``stats()`` adds up, and
no file descriptor or pool greenlet was left behind.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional

import gevent
import pytest
from doubles import FastRedisPool, LineTrackingPool
from faultproxy import FaultProxy
from gevent.event import Event
from greenlet import GreenletExit
from helpers import recv_line, wait_until
from redis_server import RedisServer, TrackingPool, echo, needs_redis
from reliability_checks import check_closed, check_recovered

from geventconnpool import PoolTimeout, retry


def echo_each(pool: TrackingPool, label: str, count: int) -> None:
    """Send ``count`` ECHO requests one after another; each must get its own token back."""
    for n in range(count):
        token = f"{label}-{n}"
        assert echo(pool, token) == token.encode()


def end_of_scenario(pool: TrackingPool, proxy: FaultProxy, redis: RedisServer, leak_check: Any) -> None:
    """How every scenario behind the proxy ends: the pool whole again, the network agreeing, then closed,
    and nothing leaked."""
    check_recovered(pool, proxy=proxy, redis=redis)
    check_closed(pool, proxy=proxy)
    proxy.stop()  # before the leak check: the proxy's sockets are this process's too
    leak_check()


# -- the remote is down when the pool starts -------------------------------------------------------


class CappedRedisPool(TrackingPool):
    """The default first delay, and a 2 s cap on the reconnect backoff."""

    RECONNECT_MAX_DELAY = 2.0


@needs_redis
def test_remote_down_at_start_fills_within_max_delay_plus_one_second(leak_check, pool_log):
    """A pool made while redis is down is full within RECONNECT_MAX_DELAY + 1 s of redis coming up, logging
    one warning and one recovery line."""
    redis = RedisServer()  # its port is chosen, nothing listens there yet
    try:
        made = time.monotonic()
        pool = CappedRedisPool(redis.address, 4, name="down-at-start")
        wait_until(lambda: pool.stats().failed_connects >= 4)
        wait_until(lambda: time.monotonic() - made >= 1.0)  # the remote comes up 1 s after the pool
        assert pool.stats().idle == 0
        redis.start()
        pool.wait(timeout=CappedRedisPool.RECONNECT_MAX_DELAY + 1)

        loud = [r for r in pool_log.records() if r.levelno >= logging.INFO]
        assert [r.levelname for r in loud] == ["WARNING", "INFO"], [r.getMessage() for r in loud]
        assert "down-at-start" in loud[0].getMessage() and "ConnectionRefusedError" in loud[0].getMessage()
        assert "connected again" in loud[1].getMessage()
        assert len(pool_log.records()) <= pool.stats().failed_connects + 2  # one DEBUG line per later failure
        check_recovered(pool, redis=redis)
        check_closed(pool)
        wait_until(lambda: redis.client_ports() == set(), interval=0.05)
    finally:
        redis.cleanup()
    leak_check()


# -- the remote restarts under load ----------------------------------------------------------------


@needs_redis
@pytest.mark.watchdog(60)
def test_redis_restarts_under_load_and_no_request_fails_or_crosses(leak_check, redis):
    """200 greenlets making ECHO requests through @retry(max_failures=3) see no failure and no reply meant for
    another while redis is killed and restarted twice."""
    pool = FastRedisPool(redis.address, 10, name="restarts")
    pool.wait(timeout=10)
    done: List[int] = []
    failures: List[BaseException] = []
    crossed: List[tuple] = []

    @retry(max_failures=3)
    def request(token: str) -> bytes:
        return echo(pool, token)

    def client(n: int) -> None:
        for k in range(30):
            token = f"client-{n}-request-{k}"
            try:
                reply = request(token)
            except Exception as error:
                failures.append(error)
                continue
            if reply != token.encode():
                crossed.append((token, reply))
            done.append(1)

    clients = [gevent.spawn(client, n) for n in range(200)]
    restarts_at = []
    for threshold in (1500, 4000):
        wait_until(lambda threshold=threshold: len(done) >= threshold, timeout=30)
        restarts_at.append(len(done))
        redis.restart(kill=True)
    assert gevent.joinall(clients, timeout=40) and all(g.dead for g in clients)

    assert failures == []
    assert crossed == []
    assert len(done) == 200 * 30
    assert all(at < 200 * 30 for at in restarts_at)  # both restarts happened under load
    assert pool.stats().discarded >= 1
    check_recovered(pool, redis=redis)
    check_closed(pool)
    wait_until(lambda: redis.client_ports() == set(), interval=0.05)
    leak_check()


# -- an idle cut-off (load balancer, NAT) ----------------------------------------------------------


def _link_requests(link) -> int:
    """How many PING round trips went through a proxy link, counted from its bytes."""
    return link.bytes // len(b"*1\r\n$4\r\nPING\r\n+PONG\r\n")


@needs_redis
@pytest.mark.watchdog(60)
def test_idle_cutoff_never_reached_with_keepalive(leak_check, redis, proxy):
    """With an idle cut-off of 2 s and keepalive=0.5, no connection is ever cut and every request succeeds."""
    proxy.cut_when_idle(2.0)
    pool = FastRedisPool(proxy.address, 4, keepalive=0.5, name="idle-keepalive")
    pool.wait(timeout=10)
    links = proxy.open_links()
    # Quiet for longer than the cut-off: only the keepalive speaks (6 pings take >= 2.5 s).
    wait_until(lambda: all(_link_requests(link) >= 7 for link in links), timeout=20)
    assert [link.how for link in proxy.links if link.closed] == []
    echo_each(pool, "after-quiet", 50)
    s = pool.stats()
    assert (s.discarded, s.keepalive_failures, s.opened) == (0, 0, 4)
    end_of_scenario(pool, proxy, redis, leak_check)


@needs_redis
@pytest.mark.watchdog(60)
def test_idle_cutoff_caught_by_check_after(leak_check, redis, proxy):
    """With an idle cut-off of 2 s and check_after=0.5, get() never lends a cut connection: every request
    succeeds at the first try, and each cut seen by a check counts as a keepalive failure.  (Not watched:
    the checks alone stand for a cut whose FIN never reaches this host.)"""
    proxy.cut_when_idle(2.0)
    pool = FastRedisPool(proxy.address, 4, check_after=0.5, name="idle-check-after", watch_idle=False)
    pool.wait(timeout=10)
    first = set(pool.owned_ports())
    wait_until(lambda: {link.port for link in proxy.links if link.how == "idle"} == first, timeout=10)
    echo_each(pool, "after-cut", 50)  # no retry: a cut connection lent to a caller would fail its request
    s = pool.stats()
    assert s.keepalive_failures >= 1 and s.discarded == s.keepalive_failures
    assert not first & pool.owned_ports()
    # A second quiet spell, shorter than the cut-off but longer than check_after: the checks pass.
    wait_until(lambda: time.monotonic() - max(link.last_active for link in proxy.open_links()) >= 0.6)
    failures = s.keepalive_failures
    echo_each(pool, "short-quiet", 20)
    assert pool.stats().keepalive_failures == failures
    end_of_scenario(pool, proxy, redis, leak_check)


# -- a black hole ----------------------------------------------------------------------------------


@needs_redis
@pytest.mark.watchdog(60)
def test_black_hole_times_out_frees_slots_and_recovers(leak_check, redis, proxy):
    """In a black hole get(timeout) raises PoolTimeout on time, connect_timeout ends every hung connect, and
    the pool fills again once the hole closes."""
    pool = FastRedisPool(proxy.address, 3, connect_timeout=0.3, name="black-hole")
    pool.wait(timeout=10)

    # 1. Accept and never answer: requests in flight hang until the caller's own timeout.
    proxy.blackhole()

    def stuck_request(n: int) -> Optional[BaseException]:
        try:
            with gevent.Timeout(0.3):
                echo(pool, f"lost-{n}")
        except gevent.Timeout as timeout:
            return timeout
        return None

    stuck = [gevent.spawn(stuck_request, n) for n in range(3)]
    gevent.joinall(stuck, timeout=10)
    assert all(isinstance(g.value, gevent.Timeout) for g in stuck)  # each holder timed out, not hung
    assert pool.stats().discarded == 3  # and its connection was dropped
    # New connections are accepted, but their PING handshake is never answered: connect_timeout fails them.
    wait_until(lambda: pool.stats().failed_connects >= 6, timeout=10)
    started = time.monotonic()
    with pytest.raises(PoolTimeout, match="connect error: TimeoutError") as raised, pool.get(timeout=0.4):
        pass
    assert 0.4 <= time.monotonic() - started < 5
    assert "connect_timeout" in str(raised.value)
    assert len(proxy.open_links()) <= 3  # at most one attempt per slot: the hung ones were closed

    # 2. Connects that never complete (the SYN is dropped): connect_timeout ends them too.
    proxy.heal()
    proxy.blackhole_connects()
    before = pool.stats().failed_connects
    seen = len(proxy.links)
    wait_until(lambda: pool.stats().failed_connects >= before + 6, timeout=10)
    assert len(proxy.links) == seen  # none of them got through
    with pytest.raises(PoolTimeout) as raised, pool.get(timeout=0.2):
        pass
    assert isinstance(raised.value.__cause__, TimeoutError)
    assert "connect_timeout" in str(raised.value.__cause__)

    # 3. The hole closes.
    proxy.heal()
    pool.wait(timeout=5)
    end_of_scenario(pool, proxy, redis, leak_check)


# -- 2,000 greenlets, a third of them killed -------------------------------------------------------


@pytest.mark.watchdog(60)
def test_2000_greenlets_a_third_killed_mid_request(line_server, leak_check):
    """2,000 greenlets on a pool of 10, a third killed mid-request by Greenlet.kill() or gevent.Timeout: each
    killed holder's connection is discarded and never lent again, nobody reads another's reply, and the
    waiters are served first come, first served."""
    pool = LineTrackingPool(line_server, 10, name="two-thousand")
    pool.wait(timeout=10)
    never = Event()
    arrived: List[int] = []
    served: List[int] = []
    lent: List[tuple] = []  # (greenlet number, connection) in the order of the loans
    outcome: Dict[int, str] = {}
    crossed: List[tuple] = []

    def killer(victim: gevent.Greenlet) -> None:
        victim.kill()

    def worker(n: int) -> None:
        token = b"token-%d" % n
        fate = ("ok", "kill", "timeout")[n % 3]
        try:
            arrived.append(n)
            with pool.get() as c:
                served.append(n)
                lent.append((n, c))
                c.sendall(b"ECHO " + token + b"\n")
                if fate == "kill":
                    gevent.spawn(killer, gevent.getcurrent())
                    never.wait()  # a slow request: killed before it reads its reply
                elif fate == "timeout":
                    with gevent.Timeout(0.001):
                        never.wait()
                reply = recv_line(c)
            if reply != token:
                crossed.append((token, reply))
            outcome[n] = "ok"
        except GreenletExit:
            outcome[n] = "killed"
        except gevent.Timeout:
            outcome[n] = "timed out"

    workers = [gevent.spawn(worker, n) for n in range(2000)]
    assert gevent.joinall(workers, timeout=45) and all(g.dead for g in workers)

    assert crossed == []
    expected = {n: ("ok", "killed", "timed out")[n % 3] for n in range(2000)}
    assert outcome == expected
    assert served == arrived  # first come, first served
    victims = {n for n in range(2000) if n % 3}
    pool.wait(timeout=10)
    s = pool.stats()
    assert s.discarded == len(victims)
    assert s.opened == 10 + len(victims)
    # Each victim's connection was closed by the pool, and never lent after the victim's loan.
    for position, (n, c) in enumerate(lent):
        if n in victims:
            assert c.fileno() == -1
            assert all(other is not c for _, other in lent[position + 1 :])
    check_recovered(pool)
    assert line_server.accepted == s.opened
    wait_until(lambda: {sock.getpeername()[1] for sock in line_server.open} == pool.owned_ports())
    check_closed(pool)
    wait_until(lambda: line_server.closed == line_server.accepted)
    leak_check()
