"""The checks that end every reliability scenario: is the pool whole again, and does the network agree?"""

from __future__ import annotations

from typing import Any, List, Optional

from faultproxy import FaultProxy
from helpers import pool_greenlets, wait_until
from redis_server import RedisServer, TrackingPool


def _ping_while_holding_all(
    pool: TrackingPool, left: int, held: List[Any], broken: List[BaseException]
) -> None:
    """Hold ``left`` more connections (nested), then PING each; a broken one is discarded by its block."""
    if left == 0:
        assert len({id(c) for c in held}) == len(held), "one connection lent twice"
        return
    try:
        with pool.get(timeout=10) as c:
            held.append(c)
            _ping_while_holding_all(pool, left - 1, held, broken)
            pool.ping(c)
    except OSError as error:
        broken.append(error)


def check_recovered(
    pool: TrackingPool, proxy: Optional[FaultProxy] = None, redis: Optional[RedisServer] = None
) -> None:
    """The pool holds ``size`` healthy connections again, and the network agrees with it."""
    for _ in range(pool.size + 3):
        pool.wait(timeout=10)
        broken: List[BaseException] = []
        _ping_while_holding_all(pool, pool.size, [], broken)
        if not broken:
            break
    else:
        raise AssertionError(f"the pool still lends broken connections: {broken!r}")
    s = pool.stats()
    assert (s.idle, s.in_use, s.connecting, s.waiting) == (pool.size, 0, 0, 0), s
    assert s.opened - s.discarded - s.recycled == s.idle + s.in_use, s
    owned = pool.owned_ports()
    assert len(owned) == pool.size
    upstream = owned
    if proxy is not None:
        assert set(pool.opened_ports) <= proxy.seen_ports()
        wait_until(
            lambda: proxy.open_ports() == owned,
            message=lambda: f"proxy has {sorted(proxy.open_ports())}, pool owns {sorted(owned)}",
        )
        upstream = {link.server_port for link in proxy.open_links()}
    if redis is not None:
        wait_until(
            lambda: redis.client_ports() == upstream,
            interval=0.05,
            message=lambda: f"redis has {sorted(redis.client_ports())}, expected {sorted(upstream)}",
        )


def check_closed(pool: TrackingPool, proxy: Optional[FaultProxy] = None) -> None:
    """close() closed every connection the pool opened and stopped its greenlets."""
    pool.close()
    assert all(sock.fileno() == -1 for sock in pool.sockets)
    assert sorted(pool.closed_ports) == sorted(pool.opened_ports), "a connection closed twice or never"
    s = pool.stats()
    assert (s.idle, s.in_use, s.connecting, s.waiting) == (0, 0, 0, 0), s
    wait_until(lambda: not [g for g in pool_greenlets() if pool.name in g.name])
    if proxy is not None:
        wait_until(lambda: not proxy.open_ports() & set(pool.opened_ports))
