"""OpenTelemetry metrics, named as the semantic conventions say: ``pip install geventconnpool[otel]``.

::

    from geventconnpool import otel

    otel.instrument(pool)  # the global MeterProvider, or meter_provider=...

Gauges and counters are observable instruments, read from
:meth:`~geventconnpool.ConnectionPool.stats` when the SDK collects them:
they cost nothing per checkout.  The histograms ``create_time`` and
``wait_time`` are recorded on the pool's slow paths only (a new connection,
a caller that had to wait); ``use_time``, the one figure that needs the
clock on every checkout, is off unless asked for.  Every instrument carries
``db.client.connection.pool.name`` = the pool's :attr:`~geventconnpool.ConnectionPool.name`.

.. list-table::
   :header-rows: 1

   * - Instrument
     - Kind
     - Unit
     - Value (of :class:`~geventconnpool.PoolStats`)
   * - ``db.client.connection.count``
     - UpDownCounter
     - ``{connection}``
     - ``idle``, and ``in_use``, with ``db.client.connection.state`` = ``idle`` or ``used``
   * - ``db.client.connection.max``
     - UpDownCounter
     - ``{connection}``
     - ``size``
   * - ``db.client.connection.idle.max``
     - UpDownCounter
     - ``{connection}``
     - ``size`` (all may be idle)
   * - ``db.client.connection.idle.min``
     - UpDownCounter
     - ``{connection}``
     - ``size`` (the pool keeps them all open)
   * - ``db.client.connection.pending_requests``
     - UpDownCounter
     - ``{request}``
     - ``waiting``
   * - ``db.client.connection.timeouts``
     - Counter
     - ``{timeout}``
     - ``timeouts``
   * - ``db.client.connection.create_time``
     - Histogram
     - ``s``
     - each successful connect attempt
   * - ``db.client.connection.wait_time``
     - Histogram
     - ``s``
     - each ``get()`` that had to wait
   * - ``db.client.connection.use_time``
     - Histogram
     - ``s``
     - each ``with pool.get()`` block (``use_time=True`` only)
   * - ``geventconnpool.connection.connecting``
     - UpDownCounter
     - ``{connection}``
     - ``connecting``
   * - ``geventconnpool.connection.checkouts``
     - Counter
     - ``{checkout}``
     - ``checkouts``
   * - ``geventconnpool.connection.opened``
     - Counter
     - ``{connection}``
     - ``opened``
   * - ``geventconnpool.connection.failed_connects``
     - Counter
     - ``{attempt}``
     - ``failed_connects``
   * - ``geventconnpool.connection.discarded``
     - Counter
     - ``{connection}``
     - ``discarded``
   * - ``geventconnpool.connection.recycled``
     - Counter
     - ``{connection}``
     - ``recycled``
   * - ``geventconnpool.connection.closed_while_idle``
     - Counter
     - ``{connection}``
     - ``closed_while_idle``
   * - ``geventconnpool.connection.keepalive_failures``
     - Counter
     - ``{check}``
     - ``keepalive_failures``
   * - ``geventconnpool.connection.overloaded``
     - Counter
     - ``{request}``
     - ``overloaded``
   * - ``geventconnpool.connection.address.count``
     - UpDownCounter
     - ``{connection}``
     - each value of :meth:`~geventconnpool.ConnectionPool.connections_by_address`,
       with ``server.address`` = its ``host``, ``server.port`` = its ``port``
       and ``network.peer.address`` = its ``ip`` (a pool made with ``address=`` only)

The UpDownCounters and Counters are observable (asynchronous) instruments.
``wait_time`` leaves out the callers served at once, which took no time to
speak of: its count is the number of waits, not of checkouts.

.. versionadded:: 1.1
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Histogram, Meter, MeterProvider, Observation

from geventconnpool import _arguments
from geventconnpool._figures import (
    ADDRESS_COUNT,
    BUCKETS,
    CREATE_TIME,
    FIGURES,
    POOL_NAME,
    STATE,
    USE_TIME,
    WAIT_TIME,
    Duration,
    Figure,
    open_pools,
)
from geventconnpool._observing import observe, unobserve
from geventconnpool._version import __version__
from geventconnpool.pool import ConnectionPool

__all__ = ["instrument", "uninstrument"]


class _Exporter:
    """One instrumented pool: its attributes, held weakly, and the observer the pool tells durations to."""

    def __init__(self, meter: _MeterState, pool: ConnectionPool[Any], use_time: bool) -> None:
        self.meter = meter
        self.pool_ref = weakref.ref(pool)
        self.attributes = {POOL_NAME: pool.name}
        self.use_time = use_time
        self.create_time = meter.histogram(CREATE_TIME)
        self.wait_time = meter.histogram(WAIT_TIME)
        self.use_time_histogram = meter.histogram(USE_TIME) if use_time else None

    def connected(self, seconds: float) -> None:
        self.create_time.record(seconds, self.attributes)

    def waited(self, seconds: float) -> None:
        self.wait_time.record(seconds, self.attributes)

    def used(self, seconds: float) -> None:
        if self.use_time_histogram is not None:
            self.use_time_histogram.record(seconds, self.attributes)

    def closed(self) -> None:
        self.meter.exporters.remove(self)


class _MeterState:
    """The instruments of one meter, registered once and shared by every pool instrumented on it.

    OpenTelemetry gives an instrument registered twice under one name the
    callbacks of the first registration only, so each callback reads every
    pool of the meter.
    """

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.exporters: List[_Exporter] = []
        self.histograms: Dict[str, Histogram] = {}
        by_name: Dict[str, List[Figure]] = {}
        for figure in FIGURES:
            by_name.setdefault(figure.name, []).append(figure)
        for name, figures in by_name.items():
            first = figures[0]
            create = (
                meter.create_observable_up_down_counter
                if first.kind == "gauge"
                else meter.create_observable_counter
            )
            create(name, callbacks=[self._reader(figures)], unit=first.unit, description=first.description)
        meter.create_observable_up_down_counter(
            ADDRESS_COUNT.name,
            callbacks=[self._read_addresses],
            unit=ADDRESS_COUNT.unit,
            description=ADDRESS_COUNT.description,
        )

    def _reader(self, figures: List[Figure]) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def read(options: CallbackOptions) -> Iterable[Observation]:
            observations = []
            for exporter, pool in open_pools(self.exporters):
                stats = pool.stats()
                for figure in figures:
                    attributes = exporter.attributes
                    if figure.state is not None:
                        attributes = {**attributes, STATE: figure.state}
                    observations.append(Observation(figure.read(stats), attributes))
            return observations

        return read

    def _read_addresses(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(count, {**exporter.attributes, **ADDRESS_COUNT.attributes(address)})
            for exporter, pool in open_pools(self.exporters)
            for address, count in pool.connections_by_address().items()
        ]

    def histogram(self, duration: Duration) -> Histogram:
        """The histogram of ``duration``, registered on first use."""
        if duration.name not in self.histograms:
            self.histograms[duration.name] = self.meter.create_histogram(
                duration.name,
                unit="s",
                description=duration.description,
                explicit_bucket_boundaries_advisory=BUCKETS,
            )
        return self.histograms[duration.name]


_meters: Dict[Meter, _MeterState] = {}


def instrument(
    pool: ConnectionPool[Any], meter_provider: Optional[MeterProvider] = None, use_time: bool = False
) -> None:
    """Export ``pool``'s metrics through OpenTelemetry, until :func:`uninstrument` or the pool's close.

    :param pool: the pool; its :attr:`~geventconnpool.ConnectionPool.name`
        becomes the ``db.client.connection.pool.name`` attribute, and must
        differ from the names of the other pools instrumented on the same provider.
    :param meter_provider: the provider of the ``geventconnpool`` meter;
        ``None`` uses the global one (``opentelemetry.metrics.set_meter_provider``).
    :param use_time: also record ``db.client.connection.use_time``, how long
        each ``with pool.get()`` block held its connection.  It reads the clock
        twice per checkout and records a histogram on every return, which
        costs more than the checkout itself (see :doc:`performance`).
    :raises TypeError: ``pool`` is no :class:`~geventconnpool.ConnectionPool`, or ``use_time`` no bool.
    :raises ValueError: ``pool`` is instrumented already, or another pool of the same name on this provider.
    :raises ~geventconnpool.PoolClosed: the pool is closed.

    .. versionadded:: 1.1
    """
    if not isinstance(pool, ConnectionPool):
        raise TypeError(f"pool must be a ConnectionPool, not {pool!r}")
    use_time = _arguments.flag(use_time, "use_time")
    if _exporter_of(pool) is not None:
        raise ValueError(f"pool {pool.name!r} is instrumented for OpenTelemetry already")
    provider = metrics.get_meter_provider() if meter_provider is None else meter_provider
    meter = provider.get_meter("geventconnpool", __version__)
    if meter not in _meters:
        _meters[meter] = _MeterState(meter)
    state = _meters[meter]
    if any(other.attributes[POOL_NAME] == pool.name for other in state.exporters):
        raise ValueError(f"a pool named {pool.name!r} is instrumented on this meter provider already")
    exporter = _Exporter(state, pool, use_time)
    observe(pool, exporter)
    state.exporters.append(exporter)


def uninstrument(pool: ConnectionPool[Any]) -> None:
    """Stop exporting ``pool``'s metrics through OpenTelemetry; do nothing if they are not.

    The instruments stay registered (OpenTelemetry cannot remove them) and
    report nothing more for this pool.

    .. versionadded:: 1.1
    """
    exporter = _exporter_of(pool)
    if exporter is not None:
        unobserve(pool, exporter)
        exporter.closed()


def _exporter_of(pool: ConnectionPool[Any]) -> Optional[_Exporter]:
    for state in _meters.values():
        for exporter in state.exporters:
            if exporter.pool_ref() is pool:
                return exporter
    return None
