"""The soak test: 60 s of random network faults in front of a real redis-server, under bounded load.

Run it with ``pytest -m slow -s`` (the tox env ``soak``); it prints one summary
line.  Requests may fail while a fault lasts; what must never happen is a hang,
a reply delivered to the wrong caller, a leak, or a pool that does not heal.
"""

from __future__ import annotations

import os
import random
import time
from typing import Callable, Dict, List, Tuple

import gevent
import pytest
from faultproxy import FaultProxy
from gevent.event import Event
from helpers import wait_until
from redis_server import RedisServer, TrackingPool, echo, needs_redis
from reliability_checks import check_closed, check_recovered

from geventconnpool import PoolTimeout, retry

SECONDS = float(os.environ.get("GEVENTCONNPOOL_SOAK_SECONDS", "60"))
WORKERS = 40


class SoakPool(TrackingPool):
    RECONNECT_DELAY = 0.01
    RECONNECT_MAX_DELAY = 0.5


def _faults(proxy: FaultProxy, redis: RedisServer) -> List[Tuple[str, Callable[[], None], float]]:
    """(name, switch on, seconds it lasts) for each fault; ``proxy.heal()`` ends each one."""
    return [
        ("reset all", proxy.reset_all, 0.0),
        ("refuse", proxy.refuse, 0.5),
        ("black hole", proxy.blackhole, 0.5),
        ("connects never complete", proxy.blackhole_connects, 0.7),
        ("latency", lambda: proxy.latency(0.05), 1.0),
        ("pause", proxy.pause, 0.3),
        ("cut after bytes", lambda: proxy.cut_after_bytes(random.randint(20, 400)), 1.0),
        ("idle cut-off", lambda: proxy.cut_when_idle(0.3), 2.0),
        ("redis restart", redis.restart, 0.0),
    ]


@pytest.mark.slow
@needs_redis
@pytest.mark.watchdog(180)
def test_soak_random_faults_under_load(leak_check):
    """60 s of random faults under load: no hang, no reply to the wrong caller, no leak, and the pool is
    whole again at the end."""
    rng = random.Random()
    redis = RedisServer()
    redis.start()
    proxy = FaultProxy(redis.address)
    proxy.start()
    stop = Event()
    done: List[int] = []
    failed: Dict[str, int] = {}
    crossed: List[tuple] = []
    injected: Dict[str, int] = {}
    pool = None
    try:
        pool = SoakPool(
            proxy.address, 8, keepalive=0.5, connect_timeout=0.5, timeout=2.0, name="soak"
        )  # every wait bounded
        pool.wait(timeout=10)

        @retry(max_failures=3, interval=0.01, backoff=2.0)
        def request(token: str) -> bytes:
            return echo(pool, token)

        def worker(n: int) -> None:
            for k in range(1_000_000):  # bounded; the deadline ends it long before
                if stop.is_set():
                    return
                token = f"soak-{n}-{k}"
                try:
                    with gevent.Timeout(3):  # a request stuck in a black hole ends here
                        reply = request(token)
                except (OSError, PoolTimeout, gevent.Timeout) as error:
                    failed[type(error).__name__] = failed.get(type(error).__name__, 0) + 1
                    continue
                if reply != token.encode():
                    crossed.append((token, reply))
                done.append(1)
                gevent.sleep(rng.uniform(0, 0.01))

        def injector() -> None:
            faults = _faults(proxy, redis)
            while not stop.is_set():
                stop.wait(rng.uniform(0.3, 1.2))
                if stop.is_set():
                    return
                name, switch_on, lasts = rng.choice(faults)
                switch_on()
                injected[name] = injected.get(name, 0) + 1
                stop.wait(lasts)
                proxy.heal()

        workers = [gevent.spawn(worker, n) for n in range(WORKERS)]
        chaos = gevent.spawn(injector)
        started = time.monotonic()
        wait_until(lambda: time.monotonic() - started >= SECONDS, timeout=SECONDS + 10, interval=0.5)
        stop.set()
        assert gevent.joinall([chaos, *workers], timeout=15) is not None
        hung = [g for g in [chaos, *workers] if not g.dead]
        proxy.heal()

        check_recovered(pool, proxy=proxy, redis=redis)
        check_closed(pool, proxy=proxy)
    finally:
        if pool is not None:
            pool.close()
        proxy.stop()
        redis.cleanup()
    try:
        leak_check()
        leaks = "ok"
    except AssertionError as error:
        leaks = str(error)
    print(
        f"\nsoak: {len(done)} requests done, {sum(failed.values())} failed {failed}, "
        f"{sum(injected.values())} faults injected {injected}, leak check: {leaks}"
    )
    assert hung == []
    assert crossed == []
    assert leaks == "ok"
    assert len(done) > 1000
    assert sum(injected.values()) >= SECONDS / 4
