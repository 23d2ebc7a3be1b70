"""A model-based test: random sequences of loans (with get() or acquire()), returns, discards, kills,
outages, keepalive ticks, resizes, drains and close (with or without a timeout); and, for a pool made with
``address=``, addresses that come, go, die and return.

Hypothesis drives a pool of scripted in-memory connections (the pool treats
connections as black boxes) through random steps, and after every step checks
the pool against a simple model of what it must hold: holders never share a
connection, nothing held or idle is closed, the gauges sum to between
``min_size`` and ``size`` while the pool is open (``size`` for a fixed pool),
the counters agree with the connections made and closed, waiters are served
first come first served, and a closed pool lends nothing.

``GEVENTCONNPOOL_MODEL_EXAMPLES`` sets how many random runs the pool's model
makes (40 by default: tox runs this file in ten environments; its soak env
runs it once more with 300), and the address model half as many.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Dict, List, Optional, Set

import gevent
import pytest
from doubles import FakeConn, FakePool
from gevent.event import AsyncResult, Event
from greenlet import GreenletExit
from helpers import pool_greenlets, wait_until
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from geventconnpool import Address, ConnectionPool, PoolClosed
from geventconnpool._lifecycle import _to_replace, in_flight_limit

KEEPALIVE = 0.02


class Remote:
    """The far end: up or down, and every connection ever made to it."""

    def __init__(self) -> None:
        self.up = True
        self.conns: List[FakeConn] = []

    def connect(self) -> FakeConn:
        """A new connection; ConnectionRefusedError while the remote is down."""
        if not self.up:
            raise ConnectionRefusedError("the remote is down")
        conn = FakeConn(len(self.conns))
        self.conns.append(conn)
        return conn


class Holder:
    """A greenlet that borrows a connection, holds it, and gives it back as told."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.state = "asking"  # asking -> waiting/holding -> done
        self.conn: Optional[FakeConn] = None
        self.command: AsyncResult = AsyncResult()
        self.outcome = ""
        self.greenlet: Optional[gevent.Greenlet] = None
        self.explicit = False  # borrows with acquire() and release() instead of a with block

    def __repr__(self) -> str:
        return f"<holder {self.n} {self.state} {self.conn!r} {self.outcome}>"


def pick(data: st.DataObject, choices: List[Holder]) -> Holder:
    """One of ``choices``, drawn the same way whatever their number.

    On a loaded machine, which holders already hold a connection after a step
    can differ between two runs of one case (the invariants hold either way);
    a ``sampled_from`` over them would then abort the run as a flaky strategy.
    """
    return choices[data.draw(st.integers(min_value=0, max_value=5)) % len(choices)]


def drain_can_go_on(pool: FakePool) -> bool:
    """Whether a drain has an old connection left to replace, and room to (not all taken by held ones)."""
    work = pool._drain
    return (
        work is not None
        and _to_replace(pool, work) > work.in_flight
        and work.in_flight + len(pool._retiring) < in_flight_limit(pool.size)
    )


class PoolMachine(RuleBasedStateMachine):
    """The pool against the model, one random step at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.remote = Remote()
        self.pool: Optional[FakePool] = None
        self.holders: List[Holder] = []
        self.served: List[int] = []  # holder numbers, in the order they got a connection
        self.holding: Dict[int, int] = {}  # how many holders each connection (by number) has now
        self.shared: List[FakeConn] = []  # connections found with two holders at once
        self.discards = 0  # discards the model expects from holders, while the pool is open
        # Broken connections given back while a drain may swap them out first: discarded, or retired.
        self.discards_or_retired = 0
        self.closed = False
        self.min_size: Optional[int] = None  # as given to the pool: None follows its size
        self.served_at_close = 0
        self.closed_under_holders = False  # close(timeout) closed connections still held

    # -- set-up and the holders ---------------------------------------------------------------

    up_is_exact = True  # remote.up says exactly whether a connect can succeed

    @initialize(size=st.integers(min_value=1, max_value=4), min_size=st.none() | st.integers(1, 4))
    def make_pool(self, size: int, min_size: Optional[int]) -> None:
        """A fixed pool, or one with a min_size (elastic below size: it grows for waiting callers)."""
        self.min_size = None if min_size is None else min(min_size, size)
        self.pool = self.new_pool(size, self.min_size)
        self.pool.wait(timeout=5)
        self._settle()  # wait() returns as the last connect ends; a keepalive check may have begun since

    def new_pool(self, size: int, min_size: Optional[int] = None) -> FakePool:
        return FakePool(
            size,
            factory=self.remote.connect,
            keepalive=KEEPALIVE,
            timeout=None,
            name="model",
            min_size=min_size,
        )

    def _use(self, holder: Holder, c: FakeConn) -> None:
        """What a holder does with its connection: hold it until told, then end as told."""
        assert self.pool is not None
        holder.conn = c
        holder.state = "holding"
        self.served.append(holder.n)
        self.holding[c.number] = self.holding.get(c.number, 0) + 1
        if self.holding[c.number] > 1:
            self.shared.append(c)
        try:
            command = holder.command.get()
        finally:
            self.holding[c.number] -= 1
        if command == "discard":
            self.pool.discard(c)
        if command == "error":
            raise ConnectionResetError("the request failed")
        if command == "other":
            raise ValueError("an application error")
        if command == "timeout":
            with gevent.Timeout(0.001):
                Event().wait()

    def _hold(self, holder: Holder) -> None:
        assert self.pool is not None
        holder.state = "waiting"
        try:
            if holder.explicit:
                c = self.pool.acquire()
                breaks = True  # a kill, a timeout or one of exc_classes: as a with block would
                try:
                    self._use(holder, c)
                    breaks = False
                except ValueError:
                    breaks = False
                    raise
                finally:
                    self.pool.release(c, discard=breaks)
            else:
                with self.pool.get() as c:
                    self._use(holder, c)
            holder.outcome = "returned"
        except ConnectionResetError:
            holder.outcome = "error"
        except ValueError:
            holder.outcome = "other"
        except PoolClosed:
            holder.outcome = "closed"
        except gevent.Timeout:
            holder.outcome = "timeout"
        except GreenletExit:
            holder.outcome = "killed"
        finally:
            holder.state = "done"

    def _by_state(self, state: str) -> List[Holder]:
        return [h for h in self.holders if h.state == state]

    def _settle(self) -> None:
        """Let the pool's greenlets run until nothing is in flight: no check running, no holder asking,
        no waiter handed a connection it has not picked up, (remote up) no slot connecting, and no broken
        connection left idle (the keepalive finds each within KEEPALIVE seconds).

        So the state after each step does not depend on how fast the machine is.
        """
        wait_until(self._quiet, timeout=5, message=lambda: repr((self.pool, self.holders)))

    def _quiet(self) -> bool:
        """Whether nothing is in flight (see :meth:`_settle`)."""
        assert self.pool is not None
        if self._by_state("asking"):
            return False
        s = self.pool.stats()
        holding = len(self._by_state("holding"))
        if s.waiting != len(self._by_state("waiting")):
            return False
        if not self.closed_under_holders and not s.in_use <= holding <= s.in_use + s.retiring:
            return False
        if [c for c in self._idle_conns() if c.broken] or self.pool._checking:
            return False  # (a check of a connection that a shrink or a drain retires is in no gauge)
        if not self._drain_at_rest():
            return False  # a drain worker polls for held old connections: it replaces the next soon
        closed = len([c for c in self.remote.conns if c.closed])
        if not self.closed and closed != s.discarded + s.retired + s.recycled:
            return False  # a retired or moved connection is closed in the background
        return self.closed or not self.remote.up or s.connecting == 0

    def _drain_at_rest(self) -> bool:
        """Whether a drain under way can do nothing more until a holder gives back an old connection: none
        of its replacements is opening, and it replaced every old one or waits for retiring ones to come
        back (or for the remote to come back up)."""
        assert self.pool is not None
        work = self.pool._drain
        if work is None or self.closed:
            return True
        if work.in_flight:
            return False
        return not self.remote.up or not drain_can_go_on(self.pool)

    # -- rules ----------------------------------------------------------------------------------

    @precondition(lambda self: len([h for h in self.holders if h.state != "done"]) < 6)
    @rule()
    def get(self) -> None:
        """A greenlet asks for a connection and holds it (or waits for one)."""
        holder = Holder(len(self.holders))
        self.holders.append(holder)
        holder.greenlet = gevent.spawn(self._hold, holder)
        self._settle()
        if self.closed:
            assert holder.outcome == "closed"

    @precondition(lambda self: len([h for h in self.holders if h.state != "done"]) < 6)
    @rule()
    def acquire(self) -> None:
        """A greenlet asks for a connection with acquire(), to release() it later."""
        holder = Holder(len(self.holders))
        holder.explicit = True
        self.holders.append(holder)
        holder.greenlet = gevent.spawn(self._hold, holder)
        self._settle()
        if self.closed:
            assert holder.outcome == "closed"

    def _release(self, data: st.DataObject, command: str) -> None:
        holder = pick(data, self._by_state("holding"))
        if command in ("error", "timeout", "discard"):
            self._expect_discard(holder)
        holder.command.set(command)
        wait_until(lambda: holder.state == "done")
        assert holder.outcome == {"ok": "returned", "discard": "returned"}.get(command, command)
        self._settle()

    def _expect_discard(self, holder: Holder) -> None:
        """Count the discard of a broken connection that a holder gives back."""
        assert self.pool is not None
        if self.closed or self._retiring(holder):
            return  # closed for good instead
        drain = self.pool._drain
        if drain is not None and any(e.conn is holder.conn for e in drain.old):
            self.discards_or_retired += 1  # a drain worker may retire it before the holder gives it back
        else:
            self.discards += 1

    def _retiring(self, holder: Holder) -> bool:
        """Whether the holder's connection is one that a shrink closes for good when it comes back."""
        assert self.pool is not None
        return any(e.conn is holder.conn for e in self.pool._retiring)

    @precondition(lambda self: self._by_state("holding"))
    @rule(data=st.data())
    def discard_and_give_back(self, data: st.DataObject) -> None:
        """A holder calls pool.discard(c), and its block ends normally: the connection is discarded."""
        self._release(data, "discard")

    @precondition(lambda self: not self.closed)
    @rule(size=st.integers(min_value=1, max_value=5))
    def resize(self, size: int) -> None:
        """The pool is resized: idle connections go first, held ones when they come back; an elastic pool
        refuses a size below its min_size, and changes nothing."""
        assert self.pool is not None
        before = self.pool.stats()
        if self.min_size is not None and size < self.min_size:
            with pytest.raises(ValueError, match="min_size"):
                self.pool.resize(size)
            assert self.pool.stats() == before
            return
        self.pool.resize(size)
        assert self.pool.stats().size == size
        self._settle()

    @precondition(lambda self: not self.closed)
    @rule()
    def drain(self) -> None:
        """The pool is drained: with the remote down its canary fails and nothing changes; with it up, every
        connection is replaced make-before-break, held ones when they come back."""
        assert self.pool is not None
        before = self.pool.stats()
        try:
            self.pool.drain()
        except ConnectionRefusedError:
            assert not self.remote.up
            assert self.pool.stats() == before
        else:
            assert self.remote.up or not self.up_is_exact
        self._settle()

    @precondition(lambda self: not self.closed)
    @rule(timeout=st.sampled_from([0.0, 0.01]))
    def close_with_timeout(self, timeout: float) -> None:
        """The pool is closed with a grace period: what is still held after it is closed under its holder."""
        assert self.pool is not None
        waiting = self._by_state("waiting")
        self.pool.close(timeout=timeout)
        self.closed = True
        self.served_at_close = len(self.served)
        self.closed_under_holders = bool(self._held_conns())
        wait_until(lambda: all(h.state == "done" for h in waiting))
        assert all(h.outcome == "closed" for h in waiting)
        assert all(c.closed for c in self.remote.conns)
        self._settle()

    @precondition(lambda self: self._by_state("holding"))
    @rule(data=st.data())
    def give_back(self, data: st.DataObject) -> None:
        """A holder's block ends normally: the connection goes back to the pool."""
        self._release(data, "ok")

    @precondition(lambda self: self._by_state("holding"))
    @rule(data=st.data())
    def give_back_broken(self, data: st.DataObject) -> None:
        """A holder's block raises one of exc_classes: the connection is discarded."""
        self._release(data, "error")

    @precondition(lambda self: self._by_state("holding"))
    @rule(data=st.data())
    def give_back_after_app_error(self, data: st.DataObject) -> None:
        """A holder's block raises another error: the connection goes back to the pool."""
        self._release(data, "other")

    @precondition(lambda self: self._by_state("holding"))
    @rule(data=st.data())
    def time_out_holder(self, data: st.DataObject) -> None:
        """A holder is interrupted by gevent.Timeout mid-request: the connection is discarded."""
        self._release(data, "timeout")

    @precondition(lambda self: self._by_state("holding") or self._by_state("waiting"))
    @rule(data=st.data())
    def kill(self, data: st.DataObject) -> None:
        """A holder or a waiter is killed with Greenlet.kill()."""
        holder = pick(data, self._by_state("holding") + self._by_state("waiting"))
        if holder.state == "holding":
            self._expect_discard(holder)
        assert holder.greenlet is not None
        holder.greenlet.kill()
        assert holder.outcome == "killed"
        self._settle()

    @precondition(lambda self: self.remote.up)
    @rule()
    def remote_down(self) -> None:
        """The remote goes down: every connection breaks, and new connects are refused."""
        self.remote.up = False
        for conn in self.remote.conns:
            conn.broken = True
        self._settle()

    @precondition(lambda self: not self.remote.up)
    @rule()
    def remote_up(self) -> None:
        """The remote comes back: connects succeed again."""
        self.remote.up = True
        self._settle()

    @precondition(lambda self: not self.closed)
    @rule()
    def keepalive_tick(self) -> None:
        """Time passes: every idle connection is checked again, and none held is."""
        idle = {c: self._pings(c) for c in self._idle_conns()}
        held = {c: self._pings(c) for c in self._held_conns()}
        # (or closed: rebalancing over addresses moves an idle connection in its own time)
        wait_until(lambda: all(self._pings(c) > pings or c.closed for c, pings in idle.items()), timeout=5)
        self._settle()
        assert all(self._pings(c) == pings for c, pings in held.items())

    @precondition(lambda self: not self.closed)
    @rule()
    def close(self) -> None:
        """The pool is closed while holders and waiters may remain."""
        assert self.pool is not None
        waiting = self._by_state("waiting")
        self.pool.close()
        self.closed = True
        self.served_at_close = len(self.served)
        wait_until(lambda: all(h.state == "done" for h in waiting))
        assert all(h.outcome == "closed" for h in waiting)
        self._settle()

    # -- the model's view -----------------------------------------------------------------------

    def _pings(self, c: FakeConn) -> int:
        """How many times the pool's _keepalive checked ``c``."""
        assert self.pool is not None
        return sum(1 for checked in self.pool.keepalive_calls if checked is c)

    def _held_conns(self) -> List[FakeConn]:
        return [h.conn for h in self._by_state("holding") if h.conn is not None]

    def _idle_conns(self) -> List[FakeConn]:
        held = {id(c) for c in self._held_conns()}
        return [c for c in self.remote.conns if not c.closed and id(c) not in held]

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def holders_never_share(self) -> None:
        held = self._held_conns()
        assert self.shared == []
        assert len({id(c) for c in held}) == len(held)
        if not self.closed_under_holders:
            assert not [c for c in held if c.closed]

    @invariant()
    def nothing_closed_twice(self) -> None:
        assert all(c.closed <= 1 for c in self.remote.conns)

    @invariant()
    def gauges_and_counters_add_up(self) -> None:
        if self.pool is None:
            return
        s = self.pool.stats()
        holding = len(self._by_state("holding"))
        # A held connection that a shrink retires is no longer part of the pool's size; one that
        # close(timeout) closed under its holder is no longer the pool's at all.
        if self.closed_under_holders:
            assert s.in_use == s.retiring == 0
        else:
            assert s.in_use <= holding <= s.in_use + s.retiring
        assert s.waiting == len(self._by_state("waiting"))
        assert s.opened == len(self.remote.conns)
        if self.closed:
            assert (s.idle, s.connecting) == (0, 0)
            return
        assert s.min_size is not None
        assert s.min_size <= s.idle + s.in_use + s.connecting <= s.size
        if s.min_size == s.size:
            assert s.idle + s.in_use + s.connecting == s.size
        assert s.idle == len(self._idle_conns())
        assert s.opened - s.discarded - s.recycled - s.retired == s.idle + holding
        assert self.discards <= s.discarded - s.keepalive_failures <= self.discards + self.discards_or_retired
        assert len([c for c in self.remote.conns if c.closed]) == s.discarded + s.retired + s.recycled
        if s.waiting:
            assert s.idle == 0
        if self.remote.up:
            assert s.connecting == 0

    @invariant()
    def first_come_first_served(self) -> None:
        assert self.served == sorted(self.served)
        served = set(self.served)
        for earlier in self.holders:
            for later in self.holders[earlier.n + 1 :]:
                if later.n in served and earlier.n not in served:
                    assert earlier.state == "done", (earlier, later)  # it left the queue first

    @invariant()
    def closed_pool_lends_nothing(self) -> None:
        if self.closed:
            assert len(self.served) == self.served_at_close

    def teardown(self) -> None:
        if self.pool is None:
            return
        self.pool.close()
        for holder in self.holders:
            holder.command.set("ok")
        greenlets = [h.greenlet for h in self.holders if h.greenlet is not None]
        gevent.joinall(greenlets, timeout=5)
        assert all(g.dead for g in greenlets)
        assert all(c.closed == 1 for c in self.remote.conns), self.remote.conns
        assert self.pool.stats().in_use == 0
        name = self.pool.name
        wait_until(lambda: not [g for g in pool_greenlets() if name in g.name])


def runs(examples: int) -> settings:
    """The settings of a state machine's test: ``examples`` random runs of up to 30 steps, untimed."""
    return settings(
        max_examples=examples,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


EXAMPLES = int(os.environ.get("GEVENTCONNPOOL_MODEL_EXAMPLES", "40"))
# A run takes about 0.3 s, and up to 1 s on a loaded machine.
WATCHDOG = max(120, 3 * EXAMPLES)

PoolMachine.TestCase.settings = runs(EXAMPLES)


@pytest.mark.watchdog(WATCHDOG)
class TestPoolModel(PoolMachine.TestCase):  # type: ignore[misc,valid-type]
    """The pool agrees with the model after every step of random runs."""


# -- address churn ------------------------------------------------------------------------------------------


class Addresses(Remote):
    """Several servers behind one name: the name's current answer, and which servers are up.

    ``up`` says whether the pool can reach any server of the answer; setting it takes every server up or
    down at once (the base machine's outage rules).
    """

    def __init__(self) -> None:
        self.answer = ["10.0.0.1", "10.0.0.2"]
        self.down: Set[str] = set()
        super().__init__()

    @property  # type: ignore[override]
    def up(self) -> bool:
        return any(ip not in self.down for ip in self.answer)

    @up.setter
    def up(self, value: bool) -> None:
        self.down = set() if value else {f"10.0.0.{n}" for n in range(1, 10)}

    def connect_to(self, address: Address) -> FakeConn:
        """A new connection to ``address``; ConnectionRefusedError while its server is down."""
        if address.ip in self.down:
            raise ConnectionRefusedError(f"{address.ip} is down")
        conn = FakeConn(len(self.conns))
        conn.address = address  # type: ignore[attr-defined]
        self.conns.append(conn)
        return conn


class FakeAddressPool(FakePool):
    """A FakePool made with ``address=``: it connects with _connect, and resolves to ``resolver()``."""

    _new_connection = ConnectionPool._new_connection  # a pool with address= connects with _connect only

    def __init__(self, size: int, addresses: Addresses, **kwargs: Any) -> None:
        self.addresses = addresses
        super().__init__(size, address=("backend.test", 80), **kwargs)

    def _connect(self, address: Address) -> Any:
        conn = self.addresses.connect_to(address)
        self.conns.append(conn)
        return conn

    def _resolve(self, host: str, port: int) -> List[str]:
        return list(self.addresses.answer)


class AddressMachine(PoolMachine):
    """The pool with ``address=`` against the same model, while its name's answer and servers change."""

    # A canary may reach a server the pool has not yet seen leave the answer: drain() can succeed while
    # no server of the current answer is up.
    up_is_exact = False

    def __init__(self) -> None:
        super().__init__()
        self.remote: Addresses = Addresses()

    def new_pool(self, size: int, min_size: Optional[int] = None) -> FakePool:
        return FakeAddressPool(
            size,
            self.remote,
            keepalive=KEEPALIVE,
            timeout=None,
            name="model-addresses",
            min_size=min_size,
            resolve_every=0.001,
            rebalance_every=0.01,
        )

    def _quiet(self) -> bool:
        """Nothing in flight, and no connection that the pool dropped still waiting for its close."""
        assert self.pool is not None
        return super()._quiet() and not self.pool._closing

    @precondition(lambda self: len(self.remote.answer) < 4)
    @rule()
    def scale_out(self) -> None:
        """The name starts resolving to one more server."""
        taken = set(self.remote.answer)
        self.remote.answer.append(next(f"10.0.0.{n}" for n in range(1, 10) if f"10.0.0.{n}" not in taken))
        self._settle()

    @precondition(lambda self: len(self.remote.answer) > 1)
    @rule(data=st.data())
    def scale_in(self, data: st.DataObject) -> None:
        """The name stops resolving to one of its servers (which keeps serving what is open)."""
        self.remote.answer.remove(data.draw(st.sampled_from(self.remote.answer)))
        self._settle()

    @precondition(lambda self: [ip for ip in self.remote.answer if ip not in self.remote.down])
    @rule(data=st.data())
    def server_dies(self, data: st.DataObject) -> None:
        """One server of the answer goes down: its connections break, and connects to it are refused."""
        ip = data.draw(st.sampled_from([ip for ip in self.remote.answer if ip not in self.remote.down]))
        self.remote.down.add(ip)
        for conn in self.remote.conns:
            if conn.address.ip == ip:  # type: ignore[attr-defined]
                conn.broken = True
        self._settle()

    @precondition(lambda self: self.remote.down)
    @rule(data=st.data())
    def server_returns(self, data: st.DataObject) -> None:
        """A server that was down accepts connections again."""
        self.remote.down.discard(data.draw(st.sampled_from(sorted(self.remote.down))))
        self._settle()

    @invariant()
    def each_connection_knows_its_address(self) -> None:
        if self.pool is None or self.closed:
            return
        by_address = self.pool.connections_by_address()
        s = self.pool.stats()
        assert sum(by_address.values()) == s.idle + s.in_use
        retiring = {id(e.conn) for e in self.pool._retiring}  # held, out of the pool, closed when back
        open_conns = [c for c in self.remote.conns if not c.closed and id(c) not in retiring]
        assert Counter(c.address for c in open_conns) == Counter(  # type: ignore[attr-defined]
            {a: n for a, n in by_address.items() if n}
        )


AddressMachine.TestCase.settings = runs(max(EXAMPLES // 2, 1))


@pytest.mark.watchdog(WATCHDOG)
class TestAddressModel(AddressMachine.TestCase):  # type: ignore[misc,valid-type]
    """A pool with address= agrees with the model after every step of random address churn."""
