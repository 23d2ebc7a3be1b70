"""Prometheus metrics for a pool, with ``prometheus_client``: ``pip install geventconnpool[prometheus]``.

::

    from geventconnpool import prometheus

    prometheus.instrument(pool)  # the default registry, or registry=...

The figures are those of :mod:`geventconnpool.otel`, under the names that
OpenTelemetry's name with ``geventconnpool_connection_`` in place of
``db.client.connection.`` or ``geventconnpool.connection.`` gives, every
one with a ``pool`` label (the pool's :attr:`~geventconnpool.ConnectionPool.name`):

- gauges ``geventconnpool_connection_count`` (label ``state`` = ``idle`` or
  ``used``), ``_max``, ``_idle_max``, ``_idle_min``, ``_pending_requests``,
  ``_connecting``;
- gauge ``geventconnpool_connection_address_count``, for a pool made with
  ``address=``: the open connections to each address
  (:meth:`~geventconnpool.ConnectionPool.connections_by_address`), with the
  labels ``host``, ``port`` and ``ip`` besides ``pool``;
- counters ``geventconnpool_connection_timeouts_total``, ``_checkouts_total``,
  ``_opened_total``, ``_failed_connects_total``, ``_discarded_total``,
  ``_recycled_total``, ``_closed_while_idle_total``, ``_keepalive_failures_total``, ``_overloaded_total``;
- histograms ``geventconnpool_connection_create_time_seconds``,
  ``_wait_time_seconds`` (only callers that waited) and, with
  ``use_time=True``, ``_use_time_seconds``.

In one process, a collector reads :meth:`~geventconnpool.ConnectionPool.stats`
at each scrape, and the histograms, which the exporter keeps in plain
numbers (one bisect per observation, where ``prometheus_client``'s own
histogram takes a lock and walks its buckets: about 20,000 instructions per
wait under ``patch_all()``).  In ``prometheus_client``'s multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR`` set, as under gunicorn with several workers),
where custom collectors are not allowed, the histograms are
``prometheus_client``'s own, and a greenlet of the exporter's sets
the gauges (``multiprocess_mode="livesum"``: a scrape shows the sum over the
live workers) and increments the counters by what ``stats()`` gained, every
:data:`INTERVAL` seconds: never on the checkout path.  An address that left
the pool's answer, with no connection to it left open, is set to 0 once and
then left alone; closing the pool sets all its gauges to 0.  With ``gunicorn
--preload``, call :func:`instrument` in a ``post_fork`` hook, so that each
worker exports its own pool and the master, which lives on, exports nothing.

.. versionadded:: 1.1
"""

from __future__ import annotations

import itertools
import logging
import os
import weakref
from bisect import bisect_left
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import gevent
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from geventconnpool import _arguments
from geventconnpool._addresses import Address
from geventconnpool._figures import (
    ADDRESS_COUNT,
    BUCKETS,
    CREATE_TIME,
    FIGURES,
    USE_TIME,
    WAIT_TIME,
    Duration,
    Figure,
    open_pools,
)
from geventconnpool._observing import observe, unobserve
from geventconnpool._stats import PoolStats
from geventconnpool.pool import ConnectionPool

__all__ = ["INTERVAL", "instrument", "uninstrument"]

logger = logging.getLogger("geventconnpool")

#: Seconds between two updates of the gauges and counters in multiprocess mode.
INTERVAL = 0.25


def _multiprocess() -> bool:
    """Whether ``prometheus_client`` runs in multiprocess mode (as it decides it)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))  # noqa: SIM112


# The buckets' "le" labels, as prometheus_client writes them for these bounds.
_BOUNDS = [repr(float(b)) for b in BUCKETS] + ["+Inf"]


class _Tally:
    """One process: a histogram of one pool in plain numbers, which the collector reads at each scrape.

    ``prometheus_client``'s own histogram takes a lock and walks its buckets
    at each observation (about 20,000 instructions per wait under
    ``patch_all()``, where the lock is gevent's); this is one bisect.
    """

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # per bucket, not cumulative; the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> List[Tuple[str, float]]:
        """The cumulative buckets, as ``HistogramMetricFamily.add_metric`` takes them."""
        # One copy first: a scrape from a thread of its own sees one state, even if not the sum's.
        cumulative = list(itertools.accumulate(list(self.counts)))
        return list(zip(_BOUNDS, cumulative))


class _Exporter:
    """One instrumented pool, held weakly: the observer the pool tells durations to, and its updates."""

    def __init__(self, state: _RegistryState, pool: ConnectionPool[Any], use_time: bool) -> None:
        self.state = state
        self.pool_ref = weakref.ref(pool)
        self.name = pool.name
        self.use_time = use_time
        self.create_time = self._histogram(CREATE_TIME)
        self.wait_time = self._histogram(WAIT_TIME)
        self.use_time_histogram = self._histogram(USE_TIME) if use_time else None
        self.greenlet: Optional[gevent.Greenlet[Any, Any]] = None
        # Multiprocess mode: each figure's series, made now so that a scrape
        # shows every one from the start, and what the counters were given so far.
        self.series: Dict[Figure, Any] = {}
        self.counted: Dict[Figure, int] = {}
        self.addresses: List[Address] = []  # those with a series, to zero when they leave
        if state.multiprocess:
            for figure in FIGURES:
                self.series[figure] = state.series_of(figure, self.name)

    def _histogram(self, duration: Duration) -> Union[_Tally, Any]:
        """One process: a tally of the collector's; multiprocess mode: this pool's series of the histogram."""
        if self.state.multiprocess:
            return self.state.histogram(duration).labels(pool=self.name)
        return _Tally()

    def tallies(self) -> List[Tuple[Duration, _Tally]]:
        """One process: the durations this pool tallies, with their tallies."""
        found = [(CREATE_TIME, self.create_time), (WAIT_TIME, self.wait_time)]
        if self.use_time_histogram is not None:
            found.append((USE_TIME, self.use_time_histogram))
        return found

    def connected(self, seconds: float) -> None:
        self.create_time.observe(seconds)

    def waited(self, seconds: float) -> None:
        self.wait_time.observe(seconds)

    def used(self, seconds: float) -> None:
        if self.use_time_histogram is not None:
            self.use_time_histogram.observe(seconds)

    def closed(self) -> None:
        """Stop: from the pool's close() (which must not switch here) or from uninstrument()."""
        self.state.exporters.remove(self)
        if self.greenlet is not None:
            self.greenlet.kill(block=False)
            self.greenlet = None
            for figure in FIGURES:
                if figure.kind == "gauge":  # this pool no longer holds any connection
                    self.series[figure].set(0)
            self.publish_addresses({})

    def publish(self, stats: PoolStats) -> None:
        """Multiprocess mode: set the gauges, and add to the counters what ``stats`` gained."""
        for figure, series in self.series.items():
            value = figure.read(stats)
            if figure.kind == "gauge":
                series.set(value)
                continue
            gained = value - self.counted.get(figure, 0)
            if gained < 0:  # the counters restarted (a forked child): all of it is new
                gained = value
            if gained:
                series.inc(gained)
            self.counted[figure] = value

    def publish_addresses(self, by_address: Dict[Address, int]) -> None:
        """Multiprocess mode: set the gauge of each address, and 0 once for those no longer there."""
        gauge = self.state.gauges[ADDRESS_COUNT.name]
        for address in self.addresses:
            if address not in by_address:
                gauge.labels(self.name, *ADDRESS_COUNT.labels(address)).set(0)
        for address, count in by_address.items():
            gauge.labels(self.name, *ADDRESS_COUNT.labels(address)).set(count)
        self.addresses = list(by_address)


def _publish_loop(exporter_ref: weakref.ref[_Exporter]) -> None:
    """Multiprocess mode: publish the pool's figures every INTERVAL, until it or the exporter is gone."""
    while True:
        exporter = exporter_ref()
        pool = None if exporter is None else exporter.pool_ref()
        if exporter is None or pool is None or pool.closed:
            if exporter is not None and exporter in exporter.state.exporters:  # collected without close()
                exporter.state.exporters.remove(exporter)
            return
        try:
            exporter.publish(pool.stats())
            exporter.publish_addresses(pool.connections_by_address())
        except Exception:
            logger.exception("pool %r: could not update its Prometheus metrics", pool.name)
        del exporter, pool
        gevent.sleep(INTERVAL)


class _RegistryState:
    """The metrics of one registry, made once and shared by every pool instrumented on it."""

    def __init__(self, registry: CollectorRegistry, multiprocess: bool) -> None:
        self.registry = registry
        self.multiprocess = multiprocess
        self.exporters: List[_Exporter] = []
        self.histograms: Dict[str, Histogram] = {}
        self.gauges: Dict[str, Gauge] = {}
        self.counters: Dict[str, Counter] = {}
        if multiprocess:
            for figure in FIGURES:
                if figure.name in self.gauges or figure.name in self.counters:
                    continue
                if figure.kind == "gauge":
                    labels = ["pool", "state"] if figure.state is not None else ["pool"]
                    self.gauges[figure.name] = Gauge(
                        figure.prometheus,
                        figure.description,
                        labels,
                        registry=registry,
                        multiprocess_mode="livesum",
                    )
                else:
                    self.counters[figure.name] = Counter(
                        figure.prometheus, figure.description, ["pool"], registry=registry
                    )
            self.gauges[ADDRESS_COUNT.name] = Gauge(
                ADDRESS_COUNT.prometheus,
                ADDRESS_COUNT.description,
                ["pool", *ADDRESS_COUNT.LABELS],
                registry=registry,
                multiprocess_mode="livesum",
            )
        else:
            registry.register(_Collector(self))

    def series_of(self, figure: Figure, pool_name: str) -> Any:
        """Multiprocess mode: the gauge's or counter's series of ``figure`` for the pool ``pool_name``."""
        if figure.kind == "counter":
            return self.counters[figure.name].labels(pool=pool_name)
        gauge = self.gauges[figure.name]
        if figure.state is not None:
            return gauge.labels(pool=pool_name, state=figure.state)
        return gauge.labels(pool=pool_name)

    def histogram(self, duration: Duration) -> Histogram:
        """The histogram of ``duration``, registered on first use."""
        if duration.name not in self.histograms:
            self.histograms[duration.name] = Histogram(
                duration.prometheus,
                duration.description,
                ["pool"],
                registry=self.registry,
                buckets=BUCKETS,
            )
        return self.histograms[duration.name]


class _Collector:
    """One process: every pool's figures of a registry, read from ``stats()`` and tallies at each scrape."""

    def __init__(self, state: _RegistryState) -> None:
        self.state = state

    def describe(self) -> Iterable[Metric]:
        return list(self._families().values())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        for exporter, pool in open_pools(self.state.exporters):
            stats = pool.stats()
            for figure in FIGURES:
                labels = [exporter.name] if figure.state is None else [exporter.name, figure.state]
                families[figure.name].add_metric(labels, figure.read(stats))
            for address, count in pool.connections_by_address().items():
                families[ADDRESS_COUNT.name].add_metric(
                    [exporter.name, *ADDRESS_COUNT.labels(address)], count
                )
            for duration, tally in exporter.tallies():
                families[duration.name].add_metric([exporter.name], tally.buckets(), tally.total)
        return list(families.values())

    def _families(self) -> Dict[str, Any]:
        families: Dict[str, Any] = {}
        for figure in FIGURES:
            if figure.name in families:
                continue
            if figure.kind == "gauge":
                labels = ["pool", "state"] if figure.state is not None else ["pool"]
                families[figure.name] = GaugeMetricFamily(
                    figure.prometheus, figure.description, labels=labels
                )
            else:
                families[figure.name] = CounterMetricFamily(
                    figure.prometheus, figure.description, labels=["pool"]
                )
        families[ADDRESS_COUNT.name] = GaugeMetricFamily(
            ADDRESS_COUNT.prometheus, ADDRESS_COUNT.description, labels=["pool", *ADDRESS_COUNT.LABELS]
        )
        for duration in (CREATE_TIME, WAIT_TIME, USE_TIME):
            families[duration.name] = HistogramMetricFamily(
                duration.prometheus, duration.description, labels=["pool"]
            )
        return families


_registries: Dict[CollectorRegistry, _RegistryState] = {}


def instrument(
    pool: ConnectionPool[Any], registry: Optional[CollectorRegistry] = None, use_time: bool = False
) -> None:
    """Export ``pool``'s metrics to Prometheus, until :func:`uninstrument` or the pool's close.

    :param pool: the pool; its :attr:`~geventconnpool.ConnectionPool.name`
        becomes the ``pool`` label, and must differ from the names of the
        other pools instrumented on the same registry.
    :param registry: the :class:`prometheus_client.CollectorRegistry`; ``None``
        uses ``prometheus_client.REGISTRY``.
    :param use_time: also observe ``geventconnpool_connection_use_time_seconds``,
        how long each ``with pool.get()`` block held its connection, at the
        cost of two clock reads and a histogram update per checkout.
    :raises TypeError: ``pool`` is no :class:`~geventconnpool.ConnectionPool`, or ``use_time`` no bool.
    :raises ValueError: ``pool``, or another pool of the same name, is instrumented on this registry already.
    :raises ~geventconnpool.PoolClosed: the pool is closed.

    .. versionadded:: 1.1
    """
    if not isinstance(pool, ConnectionPool):
        raise TypeError(f"pool must be a ConnectionPool, not {pool!r}")
    use_time = _arguments.flag(use_time, "use_time")
    registry = REGISTRY if registry is None else registry
    if registry not in _registries:
        _registries[registry] = _RegistryState(registry, _multiprocess())
    state = _registries[registry]
    for other in state.exporters:
        if other.name == pool.name:
            raise ValueError(f"a pool named {pool.name!r} is instrumented on this registry already")
    exporter = _Exporter(state, pool, use_time)
    observe(pool, exporter)
    state.exporters.append(exporter)
    if state.multiprocess:
        exporter.greenlet = gevent.spawn(_publish_loop, weakref.ref(exporter))
        exporter.greenlet.name = f"geventconnpool {pool.name} prometheus"


def uninstrument(pool: ConnectionPool[Any]) -> None:
    """Stop exporting ``pool``'s metrics to Prometheus, on every registry; do nothing if they are not.

    .. versionadded:: 1.1
    """
    for state in _registries.values():
        for exporter in list(state.exporters):
            if exporter.pool_ref() is pool:
                unobserve(pool, exporter)
                exporter.closed()
