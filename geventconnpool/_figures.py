"""The figures that the metrics exporters publish, and where each comes from: one table for both.

Private.  The names of the OpenTelemetry semantic conventions for
connection pools (``db.client.connection.*``) where they have one, with
their units and descriptions verbatim; ``geventconnpool.connection.*`` for
what they lack.  The Prometheus name of each is its OpenTelemetry name with
the ``db.client.connection.`` or ``geventconnpool.connection.`` prefix
replaced by ``geventconnpool_connection_`` (and dots by underscores):
``prometheus_client`` adds ``_total`` to counters and the exporter
``_seconds`` to histograms.  :data:`ADDRESS_COUNT`, read from
:meth:`~geventconnpool.ConnectionPool.connections_by_address`, has one series
per address, with the semantic conventions' ``server.*`` and
``network.peer.address`` attributes (the Prometheus labels ``host``,
``port`` and ``ip``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Protocol,
    Tuple,
    TypeVar,
    Union,
)

from geventconnpool._addresses import Address
from geventconnpool._stats import PoolStats

if TYPE_CHECKING:
    import weakref

    from geventconnpool.pool import ConnectionPool

#: The histograms' bucket boundaries, in seconds (for OpenTelemetry, advice that a View overrides).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: The attribute (OpenTelemetry) or label (Prometheus) naming the pool.
POOL_NAME = "db.client.connection.pool.name"
#: The attribute saying whether the connections counted are idle or used.
STATE = "db.client.connection.state"


@dataclass(frozen=True)
class Figure:
    """A gauge or counter read from :meth:`~geventconnpool.ConnectionPool.stats` when it is collected."""

    name: str
    kind: str  # "gauge" (an OpenTelemetry UpDownCounter) or "counter"
    unit: str
    description: str
    read: Callable[[PoolStats], int]
    state: Optional[str] = None  # the value of STATE, for the two halves of db.client.connection.count

    @property
    def prometheus(self) -> str:
        """The Prometheus name, without counters' ``_total``."""
        return prometheus_name(self.name)


@dataclass(frozen=True)
class Duration:
    """A histogram, in seconds, of what the pool tells its observers (see ``_observing.Observer``)."""

    name: str
    description: str
    event: str  # the Observer method that reports it

    @property
    def prometheus(self) -> str:
        """The Prometheus name, with its unit."""
        return prometheus_name(self.name) + "_seconds"


@dataclass(frozen=True)
class AddressFigure:
    """A gauge of each address of the pool's remote end, read from ``connections_by_address()``."""

    name: str
    unit: str
    description: str

    @property
    def prometheus(self) -> str:
        """The Prometheus name."""
        return prometheus_name(self.name)

    #: The Prometheus labels after ``pool``, in the order of :meth:`labels`.
    LABELS = ("host", "port", "ip")

    @staticmethod
    def labels(address: Address) -> Tuple[str, str, str]:
        """The Prometheus label values of ``address`` (the port as its decimal string)."""
        return (address.host, str(address.port), address.ip)

    @staticmethod
    def attributes(address: Address) -> Dict[str, Union[str, int]]:
        """The OpenTelemetry attributes of ``address``, as the semantic conventions name them."""
        return {
            "server.address": address.host,
            "server.port": address.port,
            "network.peer.address": address.ip,
        }


class Exporter(Protocol):
    """What :func:`open_pools` reads of an exporter's record of one pool."""

    @property
    def pool_ref(self) -> weakref.ref[ConnectionPool[Any]]: ...


E = TypeVar("E", bound=Exporter)


def open_pools(exporters: List[E]) -> Iterator[Tuple[E, ConnectionPool[Any]]]:
    """Each exporter of ``exporters`` whose pool is open, with its pool, to read now.

    An exporter whose pool was garbage-collected without ``close()`` is removed from the list.
    """
    for exporter in list(exporters):
        pool = exporter.pool_ref()
        if pool is None:
            exporters.remove(exporter)
        elif not pool.closed:
            yield exporter, pool


def prometheus_name(name: str) -> str:
    """The Prometheus name of an OpenTelemetry name of this table."""
    for prefix in ("db.client.connection.", "geventconnpool.connection."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return "geventconnpool_connection_" + name.replace(".", "_")


_CONNECTIONS = "{connection}"
_COUNT = "The number of connections that are currently in state described by the `state` attribute."

FIGURES: Tuple[Figure, ...] = (
    Figure("db.client.connection.count", "gauge", _CONNECTIONS, _COUNT, lambda s: s.idle, "idle"),
    Figure("db.client.connection.count", "gauge", _CONNECTIONS, _COUNT, lambda s: s.in_use, "used"),
    Figure(
        "db.client.connection.max",
        "gauge",
        _CONNECTIONS,
        "The maximum number of open connections allowed.",
        lambda s: s.size,
    ),
    # Idle when nobody uses them, the pool keeps up to size connections open, and
    # closes idle ones (max_idle) only down to min_size: its bounds on idle ones.
    Figure(
        "db.client.connection.idle.max",
        "gauge",
        _CONNECTIONS,
        "The maximum number of idle open connections allowed.",
        lambda s: s.size,
    ),
    Figure(
        "db.client.connection.idle.min",
        "gauge",
        _CONNECTIONS,
        "The minimum number of idle open connections allowed.",
        lambda s: s.size if s.min_size is None else s.min_size,
    ),
    Figure(
        "db.client.connection.pending_requests",
        "gauge",
        "{request}",
        "The number of current pending requests for an open connection.",
        lambda s: s.waiting,
    ),
    Figure(
        "db.client.connection.timeouts",
        "counter",
        "{timeout}",
        "The number of connection timeouts that have occurred trying to obtain a connection from the pool.",
        lambda s: s.timeouts,
    ),
    Figure(
        "geventconnpool.connection.connecting",
        "gauge",
        _CONNECTIONS,
        "The number of connections being opened, or waiting to retry after a failed attempt.",
        lambda s: s.connecting,
    ),
    Figure(
        "geventconnpool.connection.checkouts",
        "counter",
        "{checkout}",
        "The number of connections lent by get().",
        lambda s: s.checkouts,
    ),
    Figure(
        "geventconnpool.connection.opened",
        "counter",
        _CONNECTIONS,
        "The number of connections opened.",
        lambda s: s.opened,
    ),
    Figure(
        "geventconnpool.connection.failed_connects",
        "counter",
        "{attempt}",
        "The number of failed attempts to open a connection.",
        lambda s: s.failed_connects,
    ),
    Figure(
        "geventconnpool.connection.discarded",
        "counter",
        _CONNECTIONS,
        "The number of connections closed because they broke.",
        lambda s: s.discarded,
    ),
    Figure(
        "geventconnpool.connection.recycled",
        "counter",
        _CONNECTIONS,
        "The number of connections closed because they reached max_lifetime.",
        lambda s: s.recycled,
    ),
    Figure(
        "geventconnpool.connection.closed_while_idle",
        "counter",
        _CONNECTIONS,
        "The number of idle connections found closed by the remote end (watch_idle), and replaced.",
        lambda s: s.closed_while_idle,
    ),
    Figure(
        "geventconnpool.connection.keepalive_failures",
        "counter",
        "{check}",
        "The number of keepalive or check_after checks that found a connection broken.",
        lambda s: s.keepalive_failures,
    ),
    Figure(
        "geventconnpool.connection.overloaded",
        "counter",
        "{request}",
        "The number of get() calls refused at once with PoolOverloaded, because max_waiting callers waited.",
        lambda s: s.overloaded,
    ),
)

ADDRESS_COUNT = AddressFigure(
    "geventconnpool.connection.address.count",
    _CONNECTIONS,
    "The number of open connections to each address of the pool's remote end.",
)

CREATE_TIME = Duration(
    "db.client.connection.create_time", "The time it took to create a new connection.", "connected"
)
WAIT_TIME = Duration(
    "db.client.connection.wait_time", "The time it took to obtain an open connection from the pool.", "waited"
)
USE_TIME = Duration(
    "db.client.connection.use_time",
    "The time between borrowing a connection and returning it to the pool.",
    "used",
)
