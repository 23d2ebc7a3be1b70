"""The test doubles that the tests share: fake connections and pools, pools of real sockets that record
what the pool did with their hooks, a callable that fails on cue, a log capture, and quick reconnects.

The fakes serve the pool's own logic, which treats connections as black boxes; every behaviour that
involves the network is pinned with the real LineServer of helpers.py or a real redis-server.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import gevent
import pytest
from gevent import socket
from gevent.event import Event
from helpers import LinePool, LineServer, recv_line, request, wait_until
from redis_server import ProtocolError, TrackingPool

from geventconnpool import Address, ConnectionPool, PoolTimeout

# -- quick reconnects -------------------------------------------------------------------------------


class FastReconnect:
    """Mixin for a pool class: retry a failed connect within milliseconds, so that a test's outage stays
    short.

    Put it first among the bases: ``class P(FastReconnect, ConnectionPool): ...``.
    """

    RECONNECT_DELAY = 0.005
    RECONNECT_MAX_DELAY = 0.02


# -- fake connections and the fake pool ----------------------------------------------------------------


class FakeConn:
    """A scripted connection: its number, when it was made, whether the test broke it, and its closes."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.born = time.monotonic()
        self.broken = False
        self.closed = 0

    def close(self) -> None:
        self.closed += 1

    def __repr__(self) -> str:
        return f"<FakeConn {self.number}{' broken' if self.broken else ''}{' closed' if self.closed else ''}>"


class FalsyConn(FakeConn):
    """A valid connection that is falsy, like an empty container: its ``__len__`` is 0."""

    def __len__(self) -> int:
        return 0


class FakePool(FastReconnect, ConnectionPool[Any]):
    """A pool of FakeConn, or of whatever ``factory()`` returns, whose hooks record their calls and wait at
    gates that the test holds.

    ``_new_connection`` waits for ``connect_gate`` once ``free_connects`` connections were made, and its
    n-th call first sleeps ``connect_delays[n]`` seconds if given.  ``_keepalive`` waits for
    ``keepalive_gate`` (open at first) and fails on a broken FakeConn.  The n-th ``_close_connection``
    waits for ``close_gates[n]`` if the test put one there, then closes as the default does.
    """

    def __init__(
        self,
        size: int,
        *args: Any,
        factory: Optional[Callable[[], Any]] = None,
        free_connects: int = 1000,
        connect_delays: Sequence[float] = (),
        **kwargs: Any,
    ) -> None:
        self.factory = factory
        self.free_connects = free_connects
        self.connect_delays = connect_delays
        self.connect_calls = 0  # counted as each call begins, failed ones included
        self.conns: List[Any] = []  # every connection made, in order
        self.connect_gate = Event()
        self.keepalive_gate = Event()
        self.keepalive_gate.set()
        self.keepalive_calls: List[Any] = []
        self.close_gates: List[Event] = []
        self.close_calls: List[Any] = []
        super().__init__(size, *args, **kwargs)

    def _new_connection(self) -> Any:
        if len(self.conns) >= self.free_connects:
            self.connect_gate.wait()
        call = self.connect_calls
        self.connect_calls += 1
        if call < len(self.connect_delays):
            gevent.sleep(self.connect_delays[call])
        conn = self.factory() if self.factory is not None else FakeConn(len(self.conns))
        if conn is not None:
            self.conns.append(conn)
        return conn

    def _keepalive(self, c: Any) -> None:
        self.keepalive_calls.append(c)
        self.keepalive_gate.wait()
        if getattr(c, "broken", False):
            raise OSError(f"{c!r} is broken")

    def _close_connection(self, c: Any) -> None:
        index = len(self.close_calls)
        self.close_calls.append(c)
        if index < len(self.close_gates):
            self.close_gates[index].wait()
        super()._close_connection(c)

    def open_gates(self) -> None:
        """Open every gate, so that closing the pool cannot block."""
        self.connect_gate.set()
        self.keepalive_gate.set()
        for gate in self.close_gates:
            gate.set()


def holds(seq: Sequence[Any], obj: Any) -> bool:
    """Whether ``obj`` itself (by identity, not equality) is in ``seq``."""
    return any(x is obj for x in seq)


# -- pools of real sockets that record their hooks --------------------------------------------------------


class RecordingLinePool(LinePool):
    """A LinePool that records what the pool did with its hooks.

    ``calls`` counts the calls of ``_new_connection`` as they begin, ``created`` holds the sockets it
    returned and ``opened_at`` when (by ``id``); ``dropped`` holds what was handed to
    ``_close_connection`` (which then closes it as the default does) and ``lifetimes`` how long each of
    those had been open.
    """

    def __init__(self, server: LineServer, size: int, *args: Any, **kwargs: Any) -> None:
        self.calls = 0
        self.created: List[socket.socket] = []
        self.opened_at: Dict[int, float] = {}
        self.dropped: List[Any] = []
        self.lifetimes: List[float] = []
        super().__init__(server, size, *args, **kwargs)

    def _new_connection(self) -> socket.socket:
        self.calls += 1
        sock = super()._new_connection()
        self.created.append(sock)
        self.opened_at[id(sock)] = time.monotonic()
        return sock

    def _close_connection(self, c: Any) -> None:
        self.dropped.append(c)
        if id(c) in self.opened_at:
            self.lifetimes.append(time.monotonic() - self.opened_at[id(c)])
        super()._close_connection(c)


class FastLinePool(FastReconnect, RecordingLinePool):
    """A RecordingLinePool that reconnects within milliseconds."""


class LineTrackingPool(FastReconnect, TrackingPool):
    """A TrackingPool (it knows each connection's client port) speaking the LineServer's protocol."""

    def __init__(self, server: LineServer, size: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(server.address, size, *args, **kwargs)

    def ping(self, c: socket.socket) -> None:
        c.sendall(b"PING\n")
        if recv_line(c) != b"PONG":
            raise ProtocolError("no PONG")


class FastRedisPool(FastReconnect, TrackingPool):
    """A TrackingPool of redis connections that reconnects within milliseconds."""


#: Pool options that switch the pool onto each of its internal lending paths, with periods long
#: enough that no check or recycling happens during a test: the documented behaviour must not depend
#: on them.
FLAVOURS: Dict[str, Dict[str, float]] = {
    "plain": {},
    "keepalive": {"keepalive": 60},
    "check_after": {"check_after": 60},
    "leak_warning": {"leak_warning": 60},
    "max_lifetime": {"max_lifetime": 600},
}


# -- many servers behind one name ---------------------------------------------------------------------

#: The loopback addresses of the ``servers`` fixture (Linux routes all of 127/8 to lo), and the name
#: that AddressPool resolves to the ones its test chooses.
IPS = [f"127.0.0.{n}" for n in range(2, 10)]
NAME = "backend.test"


class AddressPool(ConnectionPool[socket.socket]):
    """A pool of sockets to ``backend.test``, which resolves to whatever the test puts in ``answer``.

    ``answer`` is a list of IPs, or an exception to raise; ``resolutions`` counts the calls of _resolve.
    """

    def __init__(self, size: int, port: int, answer: List[str], **kwargs: Any) -> None:
        self.answer: Union[List[str], BaseException] = answer
        self.resolutions = 0
        kwargs.setdefault("address", (NAME, port))
        super().__init__(size, **kwargs)

    def _resolve(self, host: str, port: int) -> List[str]:
        self.resolutions += 1
        if isinstance(self.answer, BaseException):
            raise self.answer
        return list(self.answer)

    def _connect(self, address: Address) -> socket.socket:
        return socket.create_connection((address.ip, address.port), timeout=5)


class FastAddressPool(FastReconnect, AddressPool):
    """An AddressPool whose addresses come out of backoff within milliseconds."""


@contextmanager
def instrumented_pools(
    servers: List[LineServer],
    line_server: LineServer,
    instrument: Callable[[ConnectionPool[Any]], None],
    size: int,
) -> Iterator[Tuple[FastAddressPool, LinePool]]:
    """Two instrumented pools for the metrics exporters' tests, closed at the end of the block.

    A FastAddressPool of ``size`` named "spread" over the first two of ``servers``, which resolves again
    and rebalances every 0.05 s, and a LinePool of 1 without address named "plain", open already.
    """
    port = servers[0].port
    with (
        FastAddressPool(size, port, IPS[:2], name="spread", resolve_every=0.05, rebalance_every=0.05) as pool,
        LinePool(line_server, 1, name="plain") as plain,
    ):
        instrument(pool)
        instrument(plain)
        plain.wait(timeout=5)
        yield pool, plain


def exported_addresses_follow(pool: AddressPool, exported: Callable[[], Dict[Address, int]]) -> None:
    """Check that an exporter follows a pool of 6 over two addresses that rebalances quickly.

    ``exported()`` is what the exporter publishes of the pool's connections per address.  It must equal
    ``connections_by_address()``: 3 and 3, then 2, 2 and 2 once the name resolves to a third address too.
    """
    assert pool.size == 6 and pool.answer == IPS[:2]

    def agrees(spread: List[int]) -> bool:
        by_address = pool.connections_by_address()
        return exported() == by_address and sorted(by_address.values()) == spread

    def disagreement() -> str:
        return f"exported {exported()}, connections_by_address() {pool.connections_by_address()}"

    wait_until(lambda: agrees([3, 3]), message=disagreement)
    pool.answer = IPS[:3]
    wait_until(lambda: agrees([2, 2, 2]), timeout=10, message=disagreement)


# -- retry's subject ---------------------------------------------------------------------------------------


class Flaky:
    """A callable that fails, then succeeds.

    It raises ``errors`` in turn, then ``failures`` more exceptions made by ``error()`` (``math.inf``:
    for ever), then returns "ok".  It keeps what it raised, its last arguments and when each call began.
    """

    def __init__(
        self, *errors: BaseException, failures: float = 0, error: Callable[[], BaseException] = OSError
    ) -> None:
        self.__name__ = "flaky"
        self.errors = list(errors)
        self.failures = failures
        self.error = error
        self.calls = 0
        self.args: Tuple[Tuple[Any, ...], Dict[str, Any]] = ((), {})
        self.started: List[float] = []
        self.raised: List[BaseException] = []

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        self.calls += 1
        self.args = (args, kwargs)
        self.started.append(time.monotonic())
        if self.errors:
            error = self.errors.pop(0)
        elif self.failures > 0:
            self.failures -= 1
            error = self.error()
        else:
            return "ok"
        self.raised.append(error)
        raise error


# -- a workload for the metrics exporters -------------------------------------------------------------


def metrics_workload(pool: ConnectionPool[Any], while_waiting: Callable[[], object] = lambda: None) -> None:
    """Drive a pool of a LineServer through what its metrics show: three requests, a connection broken in
    its block, a caller that times out while every connection is held, and one that waits until one comes
    back (``while_waiting()`` runs while it waits)."""
    pool.wait(timeout=5)
    for _ in range(3):
        assert request(pool, b"PING") == b"PONG"
    with pytest.raises(OSError), pool.get():
        raise OSError("broken")
    pool.wait(timeout=5)
    release = Event()

    def hold() -> None:
        with pool.get():
            release.wait()

    holders = [gevent.spawn(hold) for _ in range(pool.size)]
    wait_until(lambda: pool.stats().in_use == pool.size)
    with pytest.raises(PoolTimeout):
        pool.get(timeout=0.01)
    waiter = gevent.spawn(request, pool, b"PING")
    wait_until(lambda: pool.stats().waiting == 1)
    while_waiting()
    release.set()
    assert waiter.get(timeout=5) == b"PONG"
    gevent.joinall(holders, timeout=5, raise_error=True)


# -- logs ----------------------------------------------------------------------------------------------------


class LogCapture:
    """What one logger emitted during a test, from DEBUG up, as pytest's ``caplog`` captured it."""

    def __init__(self, caplog: pytest.LogCaptureFixture, name: str) -> None:
        caplog.set_level(logging.DEBUG, logger=name)
        self.caplog = caplog
        self.name = name
        self.logger = logging.getLogger(name)

    def records(self, level: Optional[int] = None) -> List[logging.LogRecord]:
        """The records of this logger, of one level if ``level`` is given."""
        return [
            r for r in self.caplog.records if r.name == self.name and (level is None or r.levelno == level)
        ]

    def messages(self, level: Optional[int] = None) -> List[str]:
        """The messages of :meth:`records`."""
        return [r.getMessage() for r in self.records(level)]

    def entries(self) -> List[Tuple[int, str]]:
        """Every (level, message) of this logger, in order."""
        return [(r.levelno, r.getMessage()) for r in self.records()]

    def clear(self) -> None:
        self.caplog.clear()


LOGGER = "geventconnpool"


class ControlFlow(BaseException):
    """A BaseException that is neither an Exception nor a gevent.Timeout, as some libraries raise."""


class Conn:
    """A black-box connection that the pool can close."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False

    def close(self) -> None:
        self.closed = True


def warnings_of(caplog: pytest.LogCaptureFixture) -> List[str]:
    """The WARNING lines that the pool logged."""
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


class DownPool(LinePool):
    """A line pool that retries failed connects every 0.1 to 0.2 s."""

    RECONNECT_DELAY = 0.2
    RECONNECT_MAX_DELAY = 0.2
