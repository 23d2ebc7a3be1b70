"""geventconnpool.otel: the semantic conventions' instruments, read with the real OpenTelemetry SDK."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import pytest
from doubles import IPS, NAME, FastLinePool, exported_addresses_follow, instrumented_pools, metrics_workload
from helpers import LinePool, request

from geventconnpool import Address, PoolClosed
from geventconnpool._lease import Entry

pytest.importorskip("opentelemetry.sdk.metrics", reason="pip install opentelemetry-sdk to run these tests")
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from geventconnpool import otel

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"

# name: (kind, unit), as the semantic conventions (and, for ours, the docs) give them.
INSTRUMENTS = {
    "db.client.connection.count": ("Sum", "{connection}"),
    "db.client.connection.max": ("Sum", "{connection}"),
    "db.client.connection.idle.max": ("Sum", "{connection}"),
    "db.client.connection.idle.min": ("Sum", "{connection}"),
    "db.client.connection.pending_requests": ("Sum", "{request}"),
    "db.client.connection.timeouts": ("Sum", "{timeout}"),
    "db.client.connection.create_time": ("Histogram", "s"),
    "db.client.connection.wait_time": ("Histogram", "s"),
    "db.client.connection.use_time": ("Histogram", "s"),
    "geventconnpool.connection.connecting": ("Sum", "{connection}"),
    "geventconnpool.connection.checkouts": ("Sum", "{checkout}"),
    "geventconnpool.connection.opened": ("Sum", "{connection}"),
    "geventconnpool.connection.failed_connects": ("Sum", "{attempt}"),
    "geventconnpool.connection.discarded": ("Sum", "{connection}"),
    "geventconnpool.connection.recycled": ("Sum", "{connection}"),
    "geventconnpool.connection.closed_while_idle": ("Sum", "{connection}"),
    "geventconnpool.connection.keepalive_failures": ("Sum", "{check}"),
    "geventconnpool.connection.overloaded": ("Sum", "{request}"),
}
ADDRESS_COUNT = "geventconnpool.connection.address.count"  # a pool made with address= only
MONOTONIC = {
    "db.client.connection.timeouts",
    "geventconnpool.connection.checkouts",
    "geventconnpool.connection.opened",
    "geventconnpool.connection.failed_connects",
    "geventconnpool.connection.discarded",
    "geventconnpool.connection.recycled",
    "geventconnpool.connection.closed_while_idle",
    "geventconnpool.connection.keepalive_failures",
    "geventconnpool.connection.overloaded",
}


@pytest.fixture
def reader():
    """A real SDK MeterProvider read by an in-memory reader; yields (reader, provider)."""
    memory = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[memory])
    try:
        yield memory, provider
    finally:
        provider.shutdown()


def collect(memory: InMemoryMetricReader) -> Tuple[Dict[Tuple[str, Tuple[Any, ...]], Any], Dict[str, Any]]:
    """Collect once: ({(name, sorted attributes): data point}, {name: metric}) of the geventconnpool meter."""
    points: Dict[Tuple[str, Tuple[Any, ...]], Any] = {}
    metrics: Dict[str, Any] = {}
    data = memory.get_metrics_data()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            if scope.scope.name != "geventconnpool":
                continue  # some versions of the SDK report metrics of their own
            for metric in scope.metrics:
                metrics[metric.name] = metric
                for point in metric.data.data_points:
                    points[(metric.name, tuple(sorted(point.attributes.items())))] = point
    return points, metrics


def value(points, name: str, pool: str, **extra: str) -> Any:
    """The value (gauges, counters) or the point (histograms) of ``name`` for the pool named ``pool``."""
    attributes = {POOL_NAME: pool}
    if "state" in extra:
        attributes[STATE] = extra["state"]
    point = points[(name, tuple(sorted(attributes.items())))]
    return getattr(point, "value", point)


def addresses_of(points, pool: str) -> Dict[Address, int]:
    """The connections per address that ADDRESS_COUNT reports for the pool named ``pool``."""
    found = {}
    for (name, attributes), point in points.items():
        attributes = dict(attributes)
        if name == ADDRESS_COUNT and attributes.pop(POOL_NAME) == pool:
            assert set(attributes) == {"server.address", "server.port", "network.peer.address"}
            address = Address(
                attributes["server.address"], attributes["server.port"], attributes["network.peer.address"]
            )
            found[address] = point.value
    return found


def expected_from(stats) -> Dict[Tuple[str, str], int]:
    """What each gauge and counter should say, from a stats() snapshot: {(name, state): value}."""
    return {
        ("db.client.connection.count", "idle"): stats.idle,
        ("db.client.connection.count", "used"): stats.in_use,
        ("db.client.connection.max", ""): stats.size,
        ("db.client.connection.idle.max", ""): stats.size,
        ("db.client.connection.idle.min", ""): stats.size,
        ("db.client.connection.pending_requests", ""): stats.waiting,
        ("db.client.connection.timeouts", ""): stats.timeouts,
        ("geventconnpool.connection.connecting", ""): stats.connecting,
        ("geventconnpool.connection.checkouts", ""): stats.checkouts,
        ("geventconnpool.connection.opened", ""): stats.opened,
        ("geventconnpool.connection.failed_connects", ""): stats.failed_connects,
        ("geventconnpool.connection.discarded", ""): stats.discarded,
        ("geventconnpool.connection.recycled", ""): stats.recycled,
        ("geventconnpool.connection.closed_while_idle", ""): stats.closed_while_idle,
        ("geventconnpool.connection.keepalive_failures", ""): stats.keepalive_failures,
        ("geventconnpool.connection.overloaded", ""): stats.overloaded,
    }


def assert_matches_stats(points, pool) -> None:
    stats = pool.stats()
    for (name, state), expected in expected_from(stats).items():
        got = value(points, name, pool.name, **({"state": state} if state else {}))
        assert got == expected, (name, state, got, stats)


def test_names_units_kinds_and_values_after_a_workload(line_server, reader, leak_check):
    """After requests, a broken connection, a caller that waited and one that timed out, every instrument
    has the conventions' name, unit and kind, the pool's name as attribute, and the value stats() gives."""
    memory, provider = reader
    with FastLinePool(line_server, 2, name="otel-lines") as pool:
        otel.instrument(pool, provider, use_time=True)

        def while_waiting() -> None:
            points, _ = collect(memory)
            assert value(points, "db.client.connection.pending_requests", "otel-lines") == 1
            assert value(points, "db.client.connection.count", "otel-lines", state="used") == 2
            assert_matches_stats(points, pool)

        metrics_workload(pool, while_waiting)
        points, metrics = collect(memory)
        assert set(metrics) == set(INSTRUMENTS)
        for name, (kind, unit) in INSTRUMENTS.items():
            metric = metrics[name]
            assert (type(metric.data).__name__, metric.unit) == (kind, unit), name
            if kind == "Sum":
                assert metric.data.is_monotonic == (name in MONOTONIC), name
        assert_matches_stats(points, pool)
        stats = pool.stats()
        assert (stats.timeouts, stats.discarded, stats.opened) == (1, 1, 3)
        create = value(points, "db.client.connection.create_time", "otel-lines")
        assert create.count == stats.opened and create.sum > 0
        wait = value(points, "db.client.connection.wait_time", "otel-lines")
        assert wait.count == 1  # only the caller that waited; the one that timed out got nothing
        use = value(points, "db.client.connection.use_time", "otel-lines")
        assert use.count == stats.checkouts and use.sum > 0
        assert create.explicit_bounds[0] < 0.001  # seconds, with room for sub-millisecond waits
    leak_check()


def test_without_use_time_the_entries_stay_plain_and_there_is_no_use_time(line_server, reader, leak_check):
    """use_time=False (the default) leaves the pool's entry class, and so its checkout, untouched."""
    memory, provider = reader
    with LinePool(line_server, 2, name="plain") as pool:
        assert pool._observers == ()
        otel.instrument(pool, provider)
        pool.wait(timeout=5)
        assert request(pool, b"PING") == b"PONG"
        assert {type(e) for e in pool._entries} == {Entry}
        _, metrics = collect(memory)
        assert "db.client.connection.use_time" not in metrics
        assert "db.client.connection.count" in metrics
    leak_check()


def test_uninstrument_and_close_stop_the_export(line_server, reader, leak_check):
    """uninstrument() stops a pool's export and gives its entries their class back; close() stops it too."""
    memory, provider = reader
    with LinePool(line_server, 1, name="first") as first, LinePool(line_server, 1, name="second") as second:
        first.wait(timeout=5)
        plain = type(next(iter(first._entries)))
        otel.instrument(first, provider, use_time=True)
        otel.instrument(second, provider)
        assert type(next(iter(first._entries))) is not plain
        points, _ = collect(memory)
        assert value(points, "db.client.connection.max", "first") == 1
        assert value(points, "db.client.connection.max", "second") == 1

        otel.uninstrument(first)
        otel.uninstrument(first)  # twice: nothing more
        assert type(next(iter(first._entries))) is plain and first._observers == ()
        points, _ = collect(memory)
        assert ("db.client.connection.max", ((POOL_NAME, "first"),)) not in points
        assert value(points, "db.client.connection.max", "second") == 1
        second.close()
        assert second._observers == ()
        points, _ = collect(memory)
        assert ("db.client.connection.max", ((POOL_NAME, "second"),)) not in points
        otel.instrument(first, provider)  # again, after uninstrument
    leak_check()


def test_bad_arguments_fail_at_once(line_server, reader):
    """instrument() names what is wrong: not a pool, use_time no bool, twice, a closed pool, a name taken."""
    _, provider = reader
    with pytest.raises(TypeError, match="pool must be a ConnectionPool"):
        otel.instrument(object(), provider)  # type: ignore[arg-type]
    with LinePool(line_server, 1, name="twice") as pool:
        with pytest.raises(TypeError, match="use_time"):
            otel.instrument(pool, provider, use_time="yes")  # type: ignore[arg-type]
        otel.instrument(pool, provider)
        with pytest.raises(ValueError, match="'twice' is instrumented"):
            otel.instrument(pool, provider)
    with pytest.raises(PoolClosed):
        otel.instrument(pool, provider)
    with LinePool(line_server, 1, name="same") as one, LinePool(line_server, 1, name="same") as other:
        otel.instrument(one, provider)
        with pytest.raises(ValueError, match="a pool named 'same' is instrumented"):
            otel.instrument(other, provider)


def test_the_global_meter_provider_is_the_default(line_server, leak_check):
    """Without meter_provider, instrument() uses OpenTelemetry's global provider (the API's no-op one)."""
    with LinePool(line_server, 1, name="global") as pool:
        otel.instrument(pool)
        pool.wait(timeout=5)
        assert request(pool, b"PING") == b"PONG"
    leak_check()


def test_the_connections_to_each_address_follow_connections_by_address(
    servers, line_server, reader, leak_check
):
    """A pool made with address= reports its open connections per address, with the conventions'
    server.address, server.port (an int) and network.peer.address, as connections_by_address() counts
    them, also once the name resolves to a new address; a pool without address reports none; close()
    stops the export."""
    memory, provider = reader
    with instrumented_pools(servers, line_server, lambda p: otel.instrument(p, provider), 6) as (pool, _):
        exported_addresses_follow(pool, lambda: addresses_of(collect(memory)[0], "spread"))
        points, metrics = collect(memory)
        assert set(addresses_of(points, "spread")) == {Address(NAME, servers[0].port, ip) for ip in IPS[:3]}
        metric = metrics[ADDRESS_COUNT]
        assert (type(metric.data).__name__, metric.unit, metric.data.is_monotonic) == (
            "Sum",
            "{connection}",
            False,
        )
        assert "address of the pool's remote end" in metric.description
        assert addresses_of(points, "plain") == {}
        assert value(points, "db.client.connection.max", "plain") == 1
    points, _ = collect(memory)
    assert addresses_of(points, "spread") == {}
    leak_check()
