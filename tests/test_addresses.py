"""Many servers behind one name: ``address=``, its resolution, the spread of connections over the
addresses, and routing around a dead one.

The servers are LineServers on several loopback addresses (127.0.0.2 ... 127.0.0.9: Linux routes all
of 127/8 to lo) with one port (the ``servers`` fixture); the pools' ``_resolve`` returns the answer the
test sets (doubles.AddressPool).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, List, Optional, Set

import gevent
import pytest
from doubles import IPS, NAME, AddressPool, FastAddressPool, FastReconnect
from gevent import socket
from helpers import LineServer, local_port, raise_in_block, recv_line, request, wait_until

from geventconnpool import Address, ConnectionPool, PoolTimeout, PoolUnavailable
from geventconnpool._addresses import AddressBook, Move, plan_move


def break_one_on(pool: ConnectionPool[socket.socket], ip: str) -> None:
    """Borrow every connection of the pool, break one connected to ``ip``, give the others back."""
    leases = [pool.get(timeout=5) for _ in range(pool.size)]
    conns = [lease.__enter__() for lease in leases]
    victim = next(i for i, c in enumerate(conns) if c.getpeername()[0] == ip)
    for i, lease in enumerate(leases):
        if i == victim:
            lease.__exit__(OSError, OSError("broken"), None)
        else:
            lease.__exit__(None, None, None)


def ports_in(pool: ConnectionPool[socket.socket]) -> Set[int]:
    """The local port of every connection of the pool (borrowed all at once, then given back)."""
    leases = [pool.get(timeout=5) for _ in range(pool.size)]
    ports = {local_port(lease.__enter__()) for lease in leases}
    for lease in leases:
        lease.__exit__(None, None, None)
    return ports


def counts(pool: ConnectionPool[Any]) -> List[int]:
    """The open connections of each address, in the order of IPS."""
    by_ip = {address.ip: n for address, n in pool.connections_by_address().items()}
    return [by_ip[ip] for ip in IPS if ip in by_ip]


# -- the option and the hooks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "error", "message"),
    [
        ("backend.test:80", TypeError, "address must be a \\(host, port\\) pair"),
        ([], TypeError, "address must be a \\(host, port\\) pair"),
        (("backend.test", 80, 1), TypeError, "address must be a \\(host, port\\) pair"),
        ([("a", 80), "b"], TypeError, "address must be a \\(host, port\\) pair"),
        (("", 80), TypeError, "address: the host must be a non-empty str"),
        ((b"backend.test", 80), TypeError, "address: the host must be a non-empty str"),
        (("backend.test", "80"), TypeError, "address: the port must be an int"),
        (("backend.test", 0), ValueError, "address: the port must be between 1 and 65535"),
        ([("a", 80), ("b", 65536)], ValueError, "address: the port must be between 1 and 65535"),
    ],
)
def test_a_bad_address_is_refused_at_once_naming_the_argument(address, error, message, leak_check):
    """A malformed ``address`` raises at construction, with a message that names ``address``."""
    with pytest.raises(error, match=message):
        AddressPool(1, 80, [], address=address)
    leak_check()


@pytest.mark.parametrize("argument", ["resolve_every", "rebalance_every"])
@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (None, TypeError), ("30", TypeError)])
def test_bad_periods_are_refused_naming_the_argument(argument, value, error, leak_check):
    """``resolve_every`` and ``rebalance_every`` are numbers of seconds > 0, checked at construction."""
    with pytest.raises(error, match=argument):
        AddressPool(1, 80, [], **{argument: value})
    leak_check()


class BothHooks(AddressPool):
    def _new_connection(self) -> socket.socket:
        raise AssertionError("never called")


class NoConnect(ConnectionPool[socket.socket]):
    pass


class OnlyConnect(ConnectionPool[socket.socket]):
    def _connect(self, address: Address) -> socket.socket:
        raise AssertionError("never called")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: BothHooks(1, 80, []), "BothHooks overrides _new_connection\\(\\).*override _connect"),
        (lambda: NoConnect(1, address=("h", 80)), "NoConnect must override _connect\\(address\\)"),
        (lambda: OnlyConnect(1), "OnlyConnect must override _new_connection.*needs address="),
    ],
)
def test_the_connect_hook_must_match_the_address_option(make, message, leak_check):
    """With ``address`` a pool overrides _connect() and not _new_connection(); without it, the reverse."""
    with pytest.raises(TypeError, match=message):
        make()
    leak_check()


def test_address_is_a_named_tuple_of_the_package():
    """``geventconnpool.Address`` is a named tuple (host, port, ip) that says it is the package's."""
    address = Address("db.internal", 5432, "10.0.0.7")
    assert address == ("db.internal", 5432, "10.0.0.7")
    assert (address.host, address.port, address.ip) == ("db.internal", 5432, "10.0.0.7")
    assert Address.__module__ == "geventconnpool"


def test_a_pool_without_address_has_no_connections_by_address(line_server, leak_check):
    """A pool made without ``address`` opens with _new_connection() as before, and reports no addresses."""
    from helpers import LinePool

    with LinePool(line_server, 2) as pool:
        pool.wait(timeout=5)
        assert pool.connections_by_address() == {}
        assert request(pool, b"PING") == b"PONG"
    leak_check()


# -- spreading -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [12, 11])
def test_connections_spread_over_the_addresses_within_one(servers, size, leak_check):
    """``size`` connections over 3 addresses end within one of each other, at the pool and at the servers,
    and each connection was handed the name, the port and one IP."""
    port = servers[0].port
    with FastAddressPool(size, port, IPS[:3]) as pool:
        pool.wait(timeout=5)
        spread = counts(pool)
        assert sum(spread) == size and max(spread) - min(spread) <= 1, spread
        for server, n in zip(servers, spread):
            server.wait_for_accepted(n)
        assert set(pool.connections_by_address()) == {Address(NAME, port, ip) for ip in IPS[:3]}
        assert pool.resolutions == 1  # the slots that started together shared one resolution
        for _ in range(size):
            assert request(pool, b"PING") == b"PONG"
    leak_check()


def test_a_replacement_goes_to_the_least_loaded_address(servers, leak_check):
    """Connections discarded on one address are replaced on the address with the fewest, so the spread
    stays within one."""
    port = servers[0].port
    with FastAddressPool(6, port, IPS[:3]) as pool:
        pool.wait(timeout=5)
        for _ in range(10):
            raise_in_block(pool, OSError("broken"))
            wait_until(lambda: pool.stats().idle == 6)
            spread = counts(pool)
            assert max(spread) - min(spread) <= 1, spread
        assert pool.stats().discarded == 10
    leak_check()


def test_choose_skips_addresses_in_backoff_and_breaks_ties_at_random():
    """The choice, at made-up times: the least loaded address not in backoff, ties at random; when all are
    in backoff, the one out of it first."""

    class Clocked:
        name = "made-up"
        connect_timeout = None

        def _resolve(self, host: str, port: int) -> List[str]:
            return IPS[:3]

        def _bounded(self, seconds: Optional[float], what: str, hook: Any, *args: Any) -> Any:
            return hook(*args)

        def _reconnect_wait(self, attempt: int) -> float:
            return 10.0 * attempt

    pool = Clocked()
    book = AddressBook(((NAME, 80),), 30.0)
    book.refresh(pool, 0.0)
    a, b, c = book.current()
    random.seed(1)
    picks = set()
    for _ in range(30):
        picks.add(book.choose([], 0.0))
        book.attempt_ended(min(book.opening or [a]))  # forget it again: a tie each time
        book.opening.clear()
    assert picks == {a, b, c}
    assert book.choose([a, b], 0.0) == c  # fewest open: c, now opening
    assert book.choose([a, b], 0.0) in (a, b)  # c counts its connect in flight
    book.opening.clear()
    book.failed(pool, c, OSError("refused"), started=0.0, now=1.0)  # in backoff until 11
    assert book.choose([a, b], 2.0) in (a, b)
    book.opening.clear()
    assert book.choose([a, b], 11.0) == c  # out of backoff
    book.opening.clear()
    book.failed(pool, a, OSError("refused"), started=0.0, now=20.0)  # until 30
    book.failed(pool, b, OSError("refused"), started=0.0, now=21.0)  # until 31
    book.failed(pool, c, OSError("refused"), started=12.0, now=22.0)  # its second failure: until 42
    book.failed(pool, c, OSError("refused"), started=12.0, now=22.5)  # in flight with that one: same
    assert book.all_backing_off(25.0)
    assert book.choose([], 25.0) == a  # the pool is down: the one out of backoff first


# -- resolution -----------------------------------------------------------------------------------------


def test_resolution_is_asked_again_only_when_older_than_resolve_every(servers, leak_check):
    """Connects reuse the last answer while it is younger than ``resolve_every``; once it is older, the next
    connect resolves again and uses the new answer."""
    port = servers[0].port
    with FastAddressPool(2, port, IPS[:1], resolve_every=60) as pool:
        pool.wait(timeout=5)
        for _ in range(5):
            raise_in_block(pool, OSError("broken"))
            wait_until(lambda: pool.stats().idle == 2)
        assert pool.resolutions == 1
        assert counts(pool) == [2]
    with FastAddressPool(2, port, IPS[:1], resolve_every=0.05) as pool:
        pool.wait(timeout=5)
        pool.answer = IPS[1:2]
        aged = time.monotonic() + 0.1
        wait_until(lambda: time.monotonic() > aged)  # the answer is older than resolve_every now
        raise_in_block(pool, OSError("broken"))
        wait_until(lambda: pool.stats().idle == 2)
        assert pool.resolutions == 2
        assert counts(pool) == [1, 1]  # the replacement went to the new answer; the other stays
    leak_check()


def test_a_failed_resolution_keeps_the_last_answer_and_logs_once(servers, leak_check, pool_log):
    """While the resolver fails, connects go on with the last good answer; the streak writes one WARNING,
    and its end one INFO line."""
    port = servers[0].port
    with FastAddressPool(2, port, IPS[:2], resolve_every=0.001, name="dns") as pool:
        pool.wait(timeout=5)
        pool.answer = OSError("[Errno -3] Temporary failure in name resolution")
        for _ in range(5):
            before = pool.resolutions
            raise_in_block(pool, OSError("broken"))
            wait_until(lambda before=before: pool.stats().idle == 2 and pool.resolutions > before)
        assert sorted(counts(pool)) == [1, 1]
        warnings = [m for m in pool_log.messages(logging.WARNING) if "resolve" in m]
        assert len(warnings) == 1, warnings
        assert "backend.test" in warnings[0] and "127.0.0.2, 127.0.0.3" in warnings[0]
        pool.answer = IPS[:2]
        before = pool.resolutions
        raise_in_block(pool, OSError("broken"))
        wait_until(lambda: pool.stats().idle == 2 and pool.resolutions > before)
        assert any("resolved backend.test" in m for m in pool_log.messages(logging.INFO))
        assert pool.stats().failed_connects == 0
    leak_check()


def test_no_answer_at_all_is_a_failed_connect_with_its_cause(leak_check):
    """A name that never resolved makes every connect fail: the pool is down, with the resolver's error as
    the cause of PoolUnavailable and PoolTimeout."""
    with FastAddressPool(2, 80, [], timeout=0.1) as pool:
        pool.answer = socket.gaierror(-2, "Name or service not known")
        wait_until(lambda: pool.stats().failed_connects >= 2)
        with pytest.raises(PoolTimeout) as timed_out, pool.get():
            pass
        assert isinstance(timed_out.value.__cause__, socket.gaierror)
        pool.fail_fast = True
        with pytest.raises(PoolUnavailable) as unavailable, pool.get():
            pass
        assert isinstance(unavailable.value.__cause__, socket.gaierror)
    leak_check()


def test_localhost_through_gevents_resolver(leak_check):
    """The default _resolve asks gevent's resolver: 'localhost' reaches a server on 127.0.0.1, and each
    connection knows the name it was made for."""
    server = LineServer()
    server.start()
    try:

        class LocalPool(FastReconnect, ConnectionPool[socket.socket]):
            def _connect(self, address: Address) -> socket.socket:
                return socket.create_connection((address.ip, address.port), timeout=5)

        with LocalPool(3, address=("localhost", server.port)) as pool:
            pool.wait(timeout=10)
            by_address = pool.connections_by_address()
            assert by_address[Address("localhost", server.port, "127.0.0.1")] >= 1
            assert all(a.host == "localhost" and a.port == server.port for a in by_address)
            assert sum(by_address.values()) == 3
            assert request(pool, b"PING") == b"PONG"
    finally:
        server.stop()
    leak_check()


# -- a dead address --------------------------------------------------------------------------------------


class SlowBackoffPool(AddressPool):
    """An AddressPool whose reconnect backoff is a minute: whatever happens within a test is not a retry."""

    RECONNECT_DELAY = 60.0
    RECONNECT_MAX_DELAY = 60.0


def test_connects_route_around_a_dead_address_at_once(servers, leak_check, pool_log):
    """With one address refusing connections, the pool fills on the others without waiting any backoff,
    callers see no error, and the dead address is logged once; the pool is not down."""
    servers[1].stop()
    port = servers[0].port
    with SlowBackoffPool(6, port, IPS[:3], fail_fast=True, name="around") as pool:
        pool.wait(timeout=5)  # the backoff is a minute: only routing around fills it in time
        assert counts(pool) == [3, 0, 3]
        assert pool.stats().failed_connects >= 1
        for _ in range(12):
            assert request(pool, b"PING") == b"PONG"
        warnings = pool_log.messages(logging.WARNING)
        assert len(warnings) == 1, warnings
        assert "127.0.0.3" in warnings[0] and "ConnectionRefusedError" in warnings[0]
    leak_check()


def test_drain_routes_its_connections_around_a_dead_address(servers, leak_check):
    """drain() on a pool with address=: a canary or a replacement refused by a dead address is opened on
    another one at once; the drain ends with every connection new, none on the dead address."""
    port = servers[0].port
    with SlowBackoffPool(4, port, IPS[:2], name="drain-around") as pool:
        pool.wait(timeout=5)
        before = ports_in(pool)
        servers[1].stop()
        pool.drain(wait=True)
        wait_until(lambda: counts(pool) == [4, 0])
        assert not ports_in(pool) & before
        assert request(pool, b"PING") == b"PONG"
    leak_check()


def test_an_address_killed_under_load_is_routed_around_and_rejoins(servers, leak_check):
    """When one address's server dies, its connections are replaced on the others at once; callers of a
    pool with connections elsewhere see no error; once it is back, new connections go to it again."""
    port = servers[0].port
    with FastAddressPool(6, port, IPS[:3], fail_fast=True) as pool:
        pool.wait(timeout=5)
        assert counts(pool) == [2, 2, 2]
        servers[2].stop()  # refuses connects, and cuts the open ones
        wait_until(
            lambda: counts(pool) == [3, 3, 0] and pool.stats().idle == 6, message=lambda: str(counts(pool))
        )
        for _ in range(12):
            assert request(pool, b"PING") == b"PONG"
        servers[2].start()
        for _ in range(10):  # each replacement goes to the least loaded address, once out of backoff
            spread = counts(pool)
            break_one_on(pool, IPS[spread.index(max(spread))])
            wait_until(lambda: pool.stats().idle == 6)
            if counts(pool) == [2, 2, 2]:
                break
        assert counts(pool) == [2, 2, 2]
        servers[2].wait_for_accepted(4)
    servers[2].stop()  # its new listening socket is no leak
    leak_check()


def test_all_addresses_down_is_an_outage_as_today(servers, leak_check, pool_log):
    """When every address refuses, the pool is down: fail_fast raises PoolUnavailable at once, a PoolTimeout
    has the last connect error as its cause, and it serves again when one address is back."""
    for server in servers[:3]:
        server.stop()
    port = servers[0].port
    with FastAddressPool(3, port, IPS[:3], timeout=0.1, name="all-down") as pool:
        wait_until(lambda: pool.stats().failed_connects >= 6)
        with pytest.raises(PoolTimeout, match="last connect error") as timed_out, pool.get():
            pass
        assert isinstance(timed_out.value.__cause__, ConnectionRefusedError)
        pool.fail_fast = True
        with pytest.raises(PoolUnavailable) as unavailable, pool.get():
            pass
        assert isinstance(unavailable.value.__cause__, ConnectionRefusedError)
        assert any("failed to open a connection" in m for m in pool_log.messages(logging.WARNING))
        servers[1].start()
        pool.wait(timeout=5)
        assert counts(pool) == [0, 3, 0]
        assert request(pool, b"PING") == b"PONG"
    servers[1].stop()  # its new listening socket is no leak
    leak_check()


# -- rebalancing ------------------------------------------------------------------------------------------


def test_plan_move_narrows_the_spread_only_when_it_is_off_by_more_than_one():
    """A move goes from the most loaded address with an idle connection to the least loaded ready one, and
    only when they differ by more than one."""
    a, b, c, d = (Address(NAME, 80, ip) for ip in IPS[:4])
    assert plan_move({a: 3, b: 3, c: 0}, [a, b, c], [a, b, c]) in (Move(a, c), Move(b, c))
    assert plan_move({a: 4, b: 2}, [a, b], [a, b]) == Move(a, b)
    assert plan_move({a: 2, b: 2, c: 1}, [a, b, c], [a, b, c]) is None  # within one already
    assert plan_move({a: 1, b: 1, c: 1, d: 0}, [a, b, c], [a, b, c, d]) is None  # a move only shifts the gap
    assert plan_move({a: 3, b: 3, c: 0}, [a, b], [a, b]) is None  # c is in backoff: not ready
    assert plan_move({a: 3, b: 1, c: 0}, [b], [a, b, c]) is None  # a's connections are all in use
    assert plan_move({a: 3, c: 0}, [], [c]) is None


def test_a_new_address_gets_its_share_one_move_per_period_with_no_caller_error(servers, leak_check, pool_log):
    """When the name starts resolving to a third address, idle connections move to it, at most one per
    ``rebalance_every``, each replacement open before the old one closes, while callers see no error."""
    port = servers[0].port
    with FastAddressPool(6, port, IPS[:2], resolve_every=0.05, rebalance_every=0.1) as pool:
        pool.wait(timeout=5)
        assert counts(pool) == [3, 3]
        errors: List[BaseException] = []
        connecting: List[int] = []
        done = False

        def caller() -> None:
            for _ in range(5000):
                if done:
                    return
                try:
                    assert request(pool, b"PING") == b"PONG"
                except Exception as error:
                    errors.append(error)
                connecting.append(pool.stats().connecting)
                gevent.sleep(0.001)

        callers = [gevent.spawn(caller) for _ in range(3)]
        pool.answer = IPS[:3]
        wait_until(lambda: counts(pool) == [2, 2, 2], timeout=10, message=lambda: str(counts(pool)))
        done = True
        gevent.joinall(callers, timeout=5)
        assert errors == []
        assert set(connecting) == {0}  # the old connection leaves the pool only once the new one is in it
        debug = pool_log.records(logging.DEBUG)
        moves = [r.created for r in debug if "moving a connection" in r.getMessage()]
        assert len(moves) == 2
        assert pool.stats().recycled == 2  # a move closes the old connection on the pool's own schedule
        assert moves[1] - moves[0] >= 0.1 * 0.9  # at most one per period (with a margin for the clocks)
        assert pool.stats().failed_connects == 0
        assert pool_log.messages(logging.WARNING) == []
    leak_check()


def test_connections_to_an_address_that_left_the_answer_retire_when_idle_or_back(servers, leak_check):
    """Once the name stops resolving to an address, its idle connections are closed and replaced on the
    others; one held by a caller is left alone until it comes back, and closed on its way back."""
    port = servers[0].port
    with FastAddressPool(4, port, IPS[:2], resolve_every=0.05, rebalance_every=0.05) as pool:
        pool.wait(timeout=5)
        assert counts(pool) == [2, 2]
        leases = [pool.get() for _ in range(4)]
        conns = [lease.__enter__() for lease in leases]
        held = next(i for i, c in enumerate(conns) if c.getpeername()[0] == IPS[1])
        for i, lease in enumerate(leases):
            if i != held:
                lease.__exit__(None, None, None)
        pool.answer = IPS[:1]
        wait_until(lambda: counts(pool) == [3, 1], message=lambda: str(counts(pool)))
        assert servers[1].closed >= 1
        conns[held].sendall(b"PING\n")
        assert recv_line(conns[held]) == b"PONG"  # the holder is left alone
        leases[held].__exit__(None, None, None)
        assert conns[held].fileno() == -1  # closed as it came back, not kept for the next caller
        wait_until(lambda: counts(pool) == [4], message=lambda: str(counts(pool)))
        assert list(pool.connections_by_address()) == [Address(NAME, port, IPS[0])]
        assert pool.stats().recycled == 2
        for _ in range(4):
            assert request(pool, b"PING") == b"PONG"
    leak_check()


def test_a_shrink_while_connections_to_a_departed_address_are_held_retires_them(servers, leak_check):
    """Both held connections go to addresses that left the answer, then the pool shrinks to 1: one of them
    is retired (closed for good when back), the other replaced on the new address; the gauges never go
    negative on the way."""
    port = servers[0].port
    with FastAddressPool(2, port, IPS[:2], resolve_every=0.05, rebalance_every=0.05) as pool:
        pool.wait(timeout=5)
        leases = [pool.get() for _ in range(2)]
        for lease in leases:
            lease.__enter__()
        pool.answer = IPS[2:3]
        # The leases are the pool's entries: the rebalancing pass has marked both, to be recycled when back.
        wait_until(lambda: all(lease.pool is not pool for lease in leases))
        pool.resize(1)
        s = pool.stats()
        assert (s.size, s.in_use, s.connecting, s.retiring) == (1, 1, 0, 1)
        for lease in leases:
            lease.__exit__(None, None, None)
        wait_until(
            lambda: pool.connections_by_address() == {Address(NAME, port, IPS[2]): 1},
            message=lambda: str(pool.connections_by_address()),
        )
        s = pool.stats()
        assert (s.idle, s.in_use, s.connecting, s.retiring, s.retired, s.recycled) == (1, 0, 0, 0, 1, 1)
        assert request(pool, b"PING") == b"PONG"
    leak_check()


@pytest.mark.parametrize("how", ["raises", "discard", "release"])
def test_a_held_connection_to_an_address_that_left_which_breaks_counts_as_discarded(servers, how, leak_check):
    """A held connection to an address that left the answer, which its holder then finds broken (its
    block raises one of exc_classes, it calls discard(), or release(c, discard=True)), is closed and
    replaced as a broken one: counted in discarded, not recycled."""
    port = servers[0].port
    with FastAddressPool(2, port, IPS[:2], resolve_every=0.05, rebalance_every=0.05) as pool:
        pool.wait(timeout=5)
        leases = [pool.get() for _ in range(2)]
        conns = [lease.__enter__() for lease in leases]
        held = next(i for i, c in enumerate(conns) if c.getpeername()[0] == IPS[1])
        leases[1 - held].__exit__(None, None, None)
        if how == "release":  # the same connection, lent again by acquire()
            leases[held].__exit__(None, None, None)
            conn = pool.acquire()
            while conn.getpeername()[0] != IPS[1]:
                other, conn = conn, pool.acquire()
                pool.release(other)
            entry = next(e for e in pool._entries if e.conn is conn)
        else:
            conn, entry = conns[held], leases[held]
        pool.answer = IPS[:1]
        # The entry holding the connection: the rebalancing pass has marked it, to be recycled when back.
        wait_until(lambda: entry.pool is not pool)
        if how == "discard":
            pool.discard(conn)
            entry.__exit__(None, None, None)
        elif how == "release":
            pool.release(conn, discard=True)
        else:
            entry.__exit__(OSError, OSError("broken"), None)
        assert conn.fileno() == -1
        wait_until(lambda: counts(pool) == [2], message=lambda: str(counts(pool)))
        stats = pool.stats()
        assert (stats.discarded, stats.recycled) == (1, 0)
    leak_check()
